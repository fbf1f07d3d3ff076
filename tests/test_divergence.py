"""Divergence: the stop names a checkpoint worth resuming, and resuming it continues exactly there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_cases import assert_refused, call
from test_bad_inputs_train import train_script
from test_training import COMMON, DIT_STUDENT, _shared

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _argv(out: Path, name: str, *extra: str) -> list[str]:
    return [*COMMON, *DIT_STUDENT, *_shared("student"), "distill.mode=none", "train.checkpoint_every=1",
            "train.keep_last=2", "train.log_with=none", f"train.output_dir={out}", f"train.run_name={name}",
            "--no-progress", *extra]


def _max_weight(path: Path) -> float:
    state = torch.load(path, weights_only=True)["model"]
    return max(float(v.abs().max()) for v in state.values() if v.is_floating_point())


def test_lr_1e6_names_no_poisoned_checkpoint(tmp_path):
    # The case: the first update with lr = 1e6 already puts weights near 1e6, so the
    # checkpoint written right after it must not be offered as the one to resume.
    outcome = call(train_script.main, _argv(tmp_path, "r", "optim.lr=1e6", "train.steps=6"))
    assert_refused(outcome, "non-finite", "no checkpoint is healthy", "step_00000001.pt", "optim.lr", code=3)
    saved = sorted((tmp_path / "r" / "checkpoints").glob("step_*.pt"))
    assert saved and _max_weight(saved[-1]) > 1e5  # the poisoned weights are there, and were not named


@pytest.mark.slow
def test_resume_from_the_last_healthy_checkpoint_continues_exactly(tmp_path):
    ok = ["optim.lr=1e-3", "train.steps=6"]
    assert call(train_script.main, _argv(tmp_path, "ref", *ok)).code == 0  # the uninterrupted run
    assert call(train_script.main, _argv(tmp_path, "r", "optim.lr=1e-3", "train.steps=3")).code == 0
    # Steps 4.. with lr = 1e6: step 4's update poisons the weights, a later step is non-finite.
    blown = call(train_script.main, _argv(tmp_path, "r", "optim.lr=1e6", "train.steps=6"))
    assert_refused(blown, "healthy checkpoint", "step_00000003.pt", "--resume step=3", code=3)
    ckpts = tmp_path / "r" / "checkpoints"
    poisoned = sorted(p.name for p in ckpts.glob("step_*.pt") if int(p.stem[5:]) > 3)
    assert poisoned and (ckpts / "step_00000003.pt").exists()  # keep_last=2 did not prune the healthy one
    # Resume exactly there with a sane lr: the later checkpoints are set aside, not deleted.
    resumed = call(train_script.main, _argv(tmp_path, "r", *ok, "--resume", "step=3"))
    assert resumed.code == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000003.pt" in resumed.stdout
    assert sorted(p.name for p in (ckpts / "after_step_00000003").iterdir()) == poisoned
    assert sorted(p.name for p in ckpts.glob("step_*.pt")) == ["step_00000005.pt", "step_00000006.pt"]
    ref = torch.load(tmp_path / "ref" / "checkpoints" / "step_00000006.pt", weights_only=True)
    got = torch.load(ckpts / "step_00000006.pt", weights_only=True)
    for part in ("model", "ema"):
        assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), part
    assert not (tmp_path / "r" / "tensorboard").exists()  # train.log_with=none


def test_health_survives_a_log_interval_longer_than_the_window():
    from shd_diffusion.checkpoint import HEALTH_WINDOW
    from shd_diffusion.training import RunHealth

    # The loop's bookkeeping without a model: identity all-reduce, one checkpoint at step 10, then
    # one log interval of 5 windows (train.log_every > HEALTH_WINDOW) before the next host sync.
    health, step = RunHealth(factor=10.0), 0
    for steps, checkpoint in ((10, True), (5 * HEALTH_WINDOW, False)):
        health.pending = [torch.tensor([1.0, 1.0])] * steps
        step += steps
        health.sync(lambda t: t, step)
        if checkpoint:
            health.unjudged.append(step)
    assert health.verdicts == {10: True} and health.unjudged == []
    assert len(health.history) == 2 * HEALTH_WINDOW  # bounded
