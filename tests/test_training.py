"""Teacher-student training loop (shd_diffusion.training) on tiny models and the demo data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shd_diffusion.config import load_config
from shd_diffusion.train_config import ExperimentConfig
from shd_diffusion.training import (
    NonFiniteLossError,
    Trainer,
    batch_generator,
    build_model,
    make_accelerator,
    sample_generators,
    train,
)

REPO = Path(__file__).resolve().parents[1]

# Tiny pixel-space models on the embedded animal-mnist data (1 x 32 x 32, 10 classes).
DIT_STUDENT = ["student.name=DiT-S/4", "student.hidden_size=32", "student.depth=2", "student.num_heads=2"]
DIT_TEACHER = ["teacher.model.name=DiT-S/4", "teacher.model.hidden_size=48", "teacher.model.depth=4",
               "teacher.model.num_heads=4"]
MDT_STUDENT = ["student.name=MDTv2-S/2", "student.patch_size=4", "student.hidden_size=32", "student.depth=4",
               "student.num_heads=2", "student.decode_layer=2"]
MDT_TEACHER = ["teacher.model.name=MDTv2-S/2", "teacher.model.patch_size=4", "teacher.model.hidden_size=48",
               "teacher.model.depth=6", "teacher.model.num_heads=4", "teacher.model.decode_layer=2"]
COMMON = ["data.kind=animal_mnist", "data.image_size=32", "data.num_workers=0", "train.precision=fp32",
          "train.global_batch_size=4", "train.log_every=1", "train.checkpoint_every=1000",
          "optim.lr=1e-3", "train.ema_decay=0.9"]


def _shared(prefix: str) -> list[str]:
    return [f"{prefix}.in_channels=1", f"{prefix}.num_classes=10"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_cfg(tmp_path: Path, mode: str, family: str = "dit", extra: list[str] = ()) -> ExperimentConfig:
    """A tiny config; writes a random teacher checkpoint when the mode needs one."""
    student, teacher = (DIT_STUDENT, DIT_TEACHER) if family == "dit" else (MDT_STUDENT, MDT_TEACHER)
    overrides = [*COMMON, *student, *_shared("student"), *teacher, *_shared("teacher.model"),
                 f"distill.mode={mode}", f"train.output_dir={tmp_path / 'runs'}", "train.run_name=t", *extra]
    cfg = load_config(ExperimentConfig, None, overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if mode != "none" and cfg.teacher.checkpoint is None:
        ckpt = tmp_path / f"teacher_{family}.pt"
        if not ckpt.exists():
            torch.manual_seed(123)
            torch.save(build_model(cfg.teacher.model).state_dict(), ckpt)
        cfg.teacher.checkpoint = str(ckpt)
    return cfg


def make_trainer(cfg: ExperimentConfig, tmp_path: Path) -> Trainer:
    run_dir = tmp_path / "runs" / "t"
    return Trainer(cfg, run_dir, make_accelerator(cfg, run_dir, log=False))


def fixed_batch(trainer: Trainer, n: int = 4):
    x, y = next(trainer._batches())
    gens = lambda: sample_generators(0, list(range(n)), trainer.device)  # noqa: E731
    return x[:n], y[:n], gens


EXPECTED_TERMS = {
    "none": {"diffusion"},
    "kd": {"diffusion", "kd"},
    "kd_shd": {"diffusion", "kd", "shd"},
    "shd": {"diffusion", "shd"},
    "kd_feat": {"diffusion", "kd", "feature"},
    "kd_selfcorr": {"diffusion", "kd", "feature"},
}


@pytest.mark.parametrize(
    "mode, family, extra",
    [
        ("none", "dit", []),
        ("kd", "dit", []),
        ("kd_shd", "dit", []),
        ("shd", "dit", []),
        ("kd_feat", "dit", []),
        ("kd_selfcorr", "dit", []),
        ("kd_shd", "dit", ["distill.squeeze=constant"]),
        ("kd_shd", "dit", ["distill.squeeze=hard"]),
        ("kd_shd", "dit", ["distill.squeeze=matching"]),
        ("kd_shd", "mdt", ["distill.temperature=2.0"]),
    ],
)
def test_every_mode_lowers_its_loss_on_a_fixed_batch(tmp_path, mode, family, extra):
    cfg = make_cfg(tmp_path, mode, family, extra)
    trainer = make_trainer(cfg, tmp_path)
    x0, y, gens = fixed_batch(trainer)
    if cfg.distill.squeeze == "matching":
        trainer._maybe_match_heads(x0, y)
        assert all(sorted(i for g in layer for i in g) == list(range(4)) for layer in trainer.groups)

    def loss() -> tuple[torch.Tensor, set[str]]:
        st = trainer.compute_terms(x0, y, gens(), batch_generator(0, 0, 0, 0, trainer.device))
        return st.total.mean(), set(st.terms)

    with torch.no_grad():
        before, names = loss()
    expected = EXPECTED_TERMS[mode] | ({"diffusion_masked"} if family == "mdt" else set())
    assert names == expected
    for _ in range(25):
        value, _ = loss()
        trainer.acc.backward(value)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after, _ = loss()
    assert torch.isfinite(after)
    assert after < 0.9 * before, (float(before), float(after))


def test_shd_and_kd_vanish_when_student_is_the_teacher(tmp_path):
    # Same architecture (H_s == H_t: identity squeeze) and the student starts from the teacher's
    # weights: every map and output agrees, so KD and SHD must be exactly zero (up to rounding).
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["distill.temperature=2.0"])
    for k in ("hidden_size", "depth", "num_heads"):
        setattr(cfg.student, k, getattr(cfg.teacher.model, k))
    trainer = make_trainer(cfg, tmp_path)
    student = trainer.acc.unwrap_model(trainer.side).student
    student.load_state_dict(trainer.teacher.state_dict())
    student.eval()  # the teacher runs in eval mode; dropout-free models make this a no-op check
    x0, y, gens = fixed_batch(trainer)
    with torch.no_grad():
        st = trainer.compute_terms(x0, y, gens(), batch_generator(0, 0, 0, 0, trainer.device))
    assert float(st.terms["kd"].abs().max()) < 1e-10
    assert float(st.terms["shd"].abs().max()) < 1e-6
    assert all(torch.allclose(a, torch.ones_like(a)) for a in st.alphas)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    side = trainer.acc.unwrap_model(trainer.side)
    out = {f"model.{k}": v.clone() for k, v in side.student.state_dict().items()}
    out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    for i, st in trainer.optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                out[f"opt.{i}.{k}"] = v.clone()
    return out


@pytest.mark.parametrize("family", ["dit", "mdt"])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, family):
    extra = ["train.steps=4", "optim.warmup_steps=2"]
    straight_cfg = make_cfg(tmp_path / "a", "kd_shd", family, extra)
    straight = train(straight_cfg, tmp_path / "a" / "runs" / "t", resume="none", progress=False,
                     accelerator=make_accelerator(straight_cfg, tmp_path, log=False))
    assert straight.step == 4

    cfg = make_cfg(tmp_path / "b", "kd_shd", family, extra)
    run_dir = tmp_path / "b" / "runs" / "t"
    first = train(cfg, run_dir, resume="auto", max_steps=2, progress=False,
                  accelerator=make_accelerator(cfg, run_dir, log=False))
    assert first.step == 2 and (run_dir / "checkpoints" / "step_00000002.pt").exists()
    del first
    resumed = train(cfg, run_dir, resume="auto", progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    assert resumed.step == 4
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_a_changed_shape_field(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["train.steps=1"])
    run_dir = tmp_path / "runs" / "t"
    train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    changed = make_cfg(tmp_path, "none", "dit", ["train.steps=2", "student.hidden_size=64"])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="student.hidden_size"):
        train(changed, run_dir, progress=False, accelerator=make_accelerator(changed, run_dir, log=False))


def test_preemption_signal_saves_and_stops(tmp_path):
    cfg = make_cfg(tmp_path, "kd", "dit", ["train.steps=10"])
    trainer = make_trainer(cfg, tmp_path)
    original = trainer.compute_terms

    def compute_and_signal(*args, **kwargs):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    trainer.compute_terms = compute_and_signal
    trainer.fit(progress=False)
    assert trainer.step == 3
    assert sorted(p.name for p in (trainer.run_dir / "checkpoints").glob("*.pt")) == ["step_00000003.pt"]


def test_non_finite_loss_stops_and_names_the_last_checkpoint(tmp_path):
    cfg = make_cfg(tmp_path, "none", "dit", ["train.steps=3", "train.checkpoint_every=1"])
    trainer = make_trainer(cfg, tmp_path)
    original = trainer.compute_terms

    def poisoned(*args, **kwargs):
        st = original(*args, **kwargs)
        if trainer.step == 2:
            st.total = st.total * float("nan")
        return st

    trainer.compute_terms = poisoned
    with pytest.raises(NonFiniteLossError, match=r"step 2.*step_00000002\.pt"):
        trainer.fit(progress=False)
    assert (trainer.run_dir / "checkpoints" / "step_00000002.pt").exists()


def test_clear_errors_for_bad_teacher_setups(tmp_path):
    cfg = make_cfg(tmp_path, "kd", "dit")
    cfg.teacher.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        make_trainer(cfg, tmp_path)

    cfg = make_cfg(tmp_path, "kd", "dit")
    cfg.teacher.model.hidden_size = 64  # checkpoint has 48
    with pytest.raises(ValueError, match="hidden"):
        make_trainer(cfg, tmp_path)

    grid = make_cfg(tmp_path, "kd_shd", "dit", ["teacher.model.name=DiT-S/2", "teacher.checkpoint=null"])
    grid.teacher.checkpoint = None
    torch.save(build_model(grid.teacher.model).state_dict(), tmp_path / "t2.pt")
    grid.teacher.checkpoint = str(tmp_path / "t2.pt")
    with pytest.raises(ValueError, match="token grid"):
        make_trainer(grid, tmp_path)

    heads = make_cfg(tmp_path, "kd_shd", "dit", ["student.num_heads=8", "student.hidden_size=64"])
    with pytest.raises(ValueError, match="8 heads"):
        make_trainer(heads, tmp_path)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train_mdt_shd.py"), *args],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


def test_script_dry_run_and_config_errors(tmp_path):
    ok = run_script("--config", str(REPO / "configs" / "mdtv2_s2_from_xl2.yaml"), "--dry-run", "distill.shd_beta=0.25")
    assert ok.returncode == 0, ok.stderr
    assert "shd_beta: 0.25" in ok.stdout and "name: MDTv2-XL/2" in ok.stdout
    assert "# run folder: runs/mdtv2_s2_from_xl2-" in ok.stdout

    bad = run_script("--config", str(REPO / "configs" / "demo_teacher.yaml"), "--dry-run", "train.stepz=3")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line, no traceback
    assert "unknown config key train.stepz" in bad.stderr

    typed = run_script("--config", str(REPO / "configs" / "demo_teacher.yaml"), "--dry-run", "distill.temperature=0.5")
    assert typed.returncode == 2 and "temperature must be >= 1" in typed.stderr


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(ExperimentConfig, path)


DDP_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_training import make_cfg, fixed_batch
from shd_diffusion.training import Trainer, make_accelerator, sample_generators, batch_generator
from pathlib import Path
tmp = Path({tmp!r})
cfg = make_cfg(tmp, "kd_shd", "dit", ["train.global_batch_size=8"])
acc = make_accelerator(cfg, tmp / "runs" / "t", log=False)
trainer = Trainer(cfg, tmp / "runs" / "t", acc)
x, y = next(trainer._batches())
gens = sample_generators(0, trainer._positions(0, x.shape[0]), trainer.device)
st = trainer.compute_terms(x, y, gens, batch_generator(0, 0, acc.process_index, 0, trainer.device))
acc.backward(st.total.mean())
grads = {{n: p.grad.clone() for n, p in acc.unwrap_model(trainer.side).named_parameters() if p.grad is not None}}
assert acc.num_processes == {n}, acc.num_processes
if acc.is_main_process:
    torch.save(grads, tmp / f"grads_{{acc.num_processes}}.pt")
# Tear the gloo group down before exit: a process that exits with it alive aborts in C++
# ("terminate called without an active exception"); train() and the CLIs do the same.
acc.end_training()
"""


def test_two_process_gloo_run_matches_one_process_gradients(tmp_path):
    # make the teacher once, so both launches load the same file
    make_cfg(tmp_path, "kd_shd", "dit")
    script = tmp_path / "ddp_step.py"
    # Without CUDA, accelerate's multi-process launch runs DDP on the CPU with gloo (MULTI_CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for n in (1, 2):
        mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
        script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path), n=n))
        proc = subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one = torch.load(tmp_path / "grads_1.pt", weights_only=True)
    two = torch.load(tmp_path / "grads_2.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one) > 10
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-4, msg=k)


def test_ema_sample_grid_and_tensorboard_logs(tmp_path):
    cfg = make_cfg(tmp_path, "kd_shd", "dit", ["train.steps=2"])
    run_dir = tmp_path / "runs" / "t"
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=True))
    assert list(run_dir.rglob("events.out.tfevents*")), "no TensorBoard event file"
    assert (run_dir / "config.yaml").exists()
    path = trainer.sample_grid(num=4, steps="3")
    from PIL import Image

    img = Image.open(path)
    assert img.size[0] > 32 and img.size[1] > 32  # a 2 x 2 grid of 32 x 32 samples with padding
