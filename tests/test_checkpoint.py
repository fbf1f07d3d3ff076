"""Checkpointing (shd_diffusion.checkpoint): atomic writes, pruning, safe loads, RNG, resume."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shd_diffusion import checkpoint as ckpt
from shd_diffusion.checkpoint import (
    CheckpointError,
    PreemptionHandler,
    capture_rng_state,
    check_resume_compatible,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from shd_diffusion.fileio import atomic_path
from shd_diffusion.optim import EMA, build_optimizer, build_scheduler


def _state(value: float) -> dict:
    return {"step": int(value), "weights": {"w": torch.full((64, 64), value)}, "meta": ["a", (1, 2.5, None)]}


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- save / load

def test_save_load_round_trip(tmp_path):
    path = save_checkpoint(_state(7.0), tmp_path, step=7)
    assert path == tmp_path / "checkpoints" / "step_00000007.pt"
    assert _names(tmp_path) == ["step_00000007.pt"]  # no temp file left behind
    assert latest_checkpoint(tmp_path) == path
    loaded = load_checkpoint(path)
    assert loaded["meta"] == ["a", (1, 2.5, None)]
    assert torch.equal(loaded["weights"]["w"], torch.full((64, 64), 7.0))
    assert latest_checkpoint(tmp_path / "nothing_here") is None
    # Permissions follow the umask like any new file (mkstemp would force 0600).
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = save_checkpoint(_state(1.0), tmp_path, step=1)
    def save_half_then_die(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")  # some bytes reach the temp file first
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(ckpt.torch, "save", save_half_then_die)
    with pytest.raises(OSError, match="quota"):
        save_checkpoint(_state(2.0), tmp_path, step=2)
    monkeypatch.undo()
    assert _names(tmp_path) == ["step_00000001.pt"]  # the partial temp file was removed

    # The write completes but the rename fails (e.g. killed right before it).
    def no_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", no_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_state(2.0), tmp_path, step=2)
    monkeypatch.undo()
    assert _names(tmp_path) == ["step_00000001.pt"]
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first)["step"] == 1


def test_hard_kill_temp_file_is_ignored_then_cleaned(tmp_path):
    first = save_checkpoint(_state(1.0), tmp_path, step=1)
    # SIGKILL mid-write: the writer's temp file is made and half written, and no cleanup runs
    # (the context is entered and never left; `killed` stays referenced so nothing closes it).
    killed = atomic_path(first.with_name("step_00000002.pt"))
    stale = killed.__enter__()
    stale.write_bytes(first.read_bytes()[:500])
    legacy = tmp_path / "checkpoints" / ".tmp-step_00000002.4242.abcd1234.tmp"  # the older naming
    legacy.write_bytes(first.read_bytes()[:500])
    assert latest_checkpoint(tmp_path) == first
    save_checkpoint(_state(2.0), tmp_path, step=2)
    assert not stale.exists() and not legacy.exists()
    assert killed is not None


def test_keep_last_prunes_but_never_the_new_file(tmp_path):
    for step in range(1, 6):
        save_checkpoint(_state(step), tmp_path, step=step, keep_last=2)
    assert _names(tmp_path) == ["step_00000004.pt", "step_00000005.pt"]
    # An older step written after newer ones is kept (and warned about), newer ones too.
    with pytest.warns(UserWarning, match="already has step 5"):
        save_checkpoint(_state(1.0), tmp_path, step=1, keep_last=2)
    assert "step_00000001.pt" in _names(tmp_path)
    save_checkpoint(_state(6.0), tmp_path, step=6, keep_last=None)
    assert len(_names(tmp_path)) == 4
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(_state(7.0), tmp_path, step=7, keep_last=0)


class _Custom:
    pass


@pytest.mark.parametrize(
    "state, message",
    [
        ({"rng": {"numpy": np.zeros(3)}}, r"state\['rng'\]\['numpy'\] is a numpy.ndarray"),
        ({"loss": np.float32(1.0)}, r"state\['loss'\] is a numpy.float32"),
        ({"extra": [1, _Custom()]}, r"state\['extra'\]\[1\] is a .*_Custom"),
        ({"counts": defaultdict(int)}, r"state\['counts'\] is a collections.defaultdict"),
        ({"by_pair": {(0, 1): 2}}, r"state\['by_pair'\] has a key \(0, 1\)"),
    ],
)
def test_unsafe_state_rejected_before_writing(tmp_path, state, message):
    with pytest.raises(TypeError, match=message):
        save_checkpoint(state, tmp_path, step=1)
    assert not (tmp_path / "checkpoints").exists() or _names(tmp_path) == []


def test_corrupt_newest_falls_back_with_warning(tmp_path):
    good = save_checkpoint(_state(1.0), tmp_path, step=1)
    truncated = save_checkpoint(_state(2.0), tmp_path, step=2)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    garbage = tmp_path / "checkpoints" / "step_00000003.pt"
    garbage.write_bytes(random.Random(1).randbytes(1000))
    unsafe = tmp_path / "checkpoints" / "step_00000004.pt"
    torch.save({"x": np.zeros(2)}, unsafe)  # written by someone bypassing save_checkpoint

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint") as record:
        assert latest_checkpoint(tmp_path) == good
    assert len(record) == 3
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(truncated)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------- RNG

def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
            torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()  # leaves gauss caches (python gauss_next, numpy has_gauss) in a non-trivial state
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path, step=0)
    expected = [_draw() for _ in range(3)]
    _draw()
    restore_rng_state(load_checkpoint(path)["rng"])
    assert [_draw() for _ in range(3)] == expected


# ----------------------------------------------------------------------------- resume checks

@dataclass
class _ModelCfg:
    hidden_size: int = 384
    patch_size: tuple[int, int] = (2, 2)
    decode_layer: int = 6


def test_check_resume_compatible_names_the_field():
    saved = {"model": {"hidden_size": 384, "patch_size": [2, 2], "decode_layer": 6}, "train": {"lr": 1e-4}}
    current = {"model": _ModelCfg(hidden_size=256), "train": {"lr": 5e-4}}
    fields = ["model.patch_size", "model.hidden_size", "model.decode_layer"]
    with pytest.raises(ValueError) as err:
        check_resume_compatible(saved, current, fields)
    assert str(err.value) == (
        "cannot resume: model.hidden_size changed from 384 to 256; revert it, or "
        "start a new run (another train.run_name, or an empty folder)"
    )
    # Tuple vs list is not a change; non-shape fields (lr) are not checked.
    check_resume_compatible(saved, {"model": _ModelCfg(), "train": {"lr": 5e-4}}, fields)
    with pytest.raises(ValueError, match="model.depth changed from <missing> to 12"):
        check_resume_compatible(saved, {"model": {"depth": 12}}, ["model.depth"])


def test_resume_check_compares_plain_values():
    # Tuples and lists compare alike (YAML gives lists, dataclasses tuples); dataclasses like dicts.
    check_resume_compatible({"model": {"patch_size": [2, 2]}}, {"model": _ModelCfg()}, ["model.patch_size"])
    with pytest.raises(TypeError, match=r"model.path: PosixPath|model.path: WindowsPath"):
        check_resume_compatible({"model": {"path": "x"}}, {"model": {"path": Path("x")}}, ["model.path"])


# ----------------------------------------------------------------------------- preemption

@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_preemption_handler_sets_flag_and_restores(signame):
    sig = getattr(signal, signame)
    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(sig, previous)
    try:
        with PreemptionHandler() as handler:
            assert not handler.requested
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 2.0
            while not handler.requested and time.monotonic() < deadline:
                time.sleep(0.001)
            assert handler.requested and handler.signum == sig
            assert seen == []  # our handler replaced the previous one
        assert signal.getsignal(sig) is previous
    finally:
        signal.signal(sig, old)


# ----------------------------------------------------------------------------- exact resume

def _train(model, opt, sched, ema, steps, start):
    for step in range(start, start + steps):
        x = torch.randn(8, 4)  # data noise from the global RNG: must resume too
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)


def _fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    opt = build_optimizer(model.parameters(), "adan", lr=1e-2)
    return model, opt, build_scheduler(opt, warmup_steps=4), EMA(model, decay=0.9)


def test_interrupted_run_resumes_bitwise(tmp_path):
    model, opt, sched, ema = _fresh()
    _train(model, opt, sched, ema, 6, start=0)

    model2, opt2, sched2, ema2 = _fresh()
    _train(model2, opt2, sched2, ema2, 3, start=0)
    save_checkpoint(
        {"step": 3, "model": model2.state_dict(), "ema": ema2.state_dict(), "opt": opt2.state_dict(),
         "sched": sched2.state_dict(), "rng": capture_rng_state()},
        tmp_path, step=3,
    )
    del model2, opt2, sched2, ema2
    torch.manual_seed(123)  # the new process starts from a different RNG state

    model3, opt3, sched3, ema3 = _fresh()
    state = load_checkpoint(latest_checkpoint(tmp_path))
    model3.load_state_dict(state["model"])
    ema3.load_state_dict(state["ema"])
    opt3.load_state_dict(state["opt"])
    sched3.load_state_dict(state["sched"])
    restore_rng_state(state["rng"])
    _train(model3, opt3, sched3, ema3, 3, start=state["step"])

    for a, b in zip(model.state_dict().values(), model3.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema3.state_dict().values()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == opt3.param_groups[0]["lr"] == 1e-2


# ----------------------------------------------------------------------------- health, resume points


def _history(losses: list[float], grad: float = 1.0) -> list[tuple[int, float, float]]:
    return [(s + 1, loss, grad) for s, loss in enumerate(losses)]


def test_checkpoint_health_needs_the_first_step_on_its_weights_within_the_factor():
    flat = [1.0] * 20
    assert ckpt.checkpoint_health(_history(flat), 10, factor=10.0) is True
    assert ckpt.checkpoint_health(_history(flat[:10]), 10, factor=10.0) is None  # step 11 not known yet
    spike = flat[:10] + [10.5] + [1.0] * 19  # step 11 = the first loss on checkpoint 10's weights
    assert ckpt.checkpoint_health(_history(spike), 10, factor=10.0) is False
    assert ckpt.checkpoint_health(_history(spike), 10, factor=11.0) is True
    assert ckpt.checkpoint_health(_history(spike), 11, factor=10.0) is False  # step 11 is among its recent ones
    assert ckpt.checkpoint_health(_history(spike), 11 + ckpt.HEALTH_RECENT, factor=10.0) is True  # out of reach
    nan = flat[:10] + [float("nan")]
    assert ckpt.checkpoint_health(_history(nan), 10, factor=10.0) is False
    steep_grad = [(s, 1.0, 1.0) for s in range(1, 11)] + [(11, 1.0, 50.0)]
    assert ckpt.checkpoint_health(steep_grad, 10, factor=10.0) is False


def test_resume_points_and_setting_aside_later_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(_state(step), tmp_path, step, keep_last=None)
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step_00000004.pt"
    assert ckpt.resolve_resume(tmp_path, "none") is None
    assert ckpt.resolve_resume(tmp_path, "step=2") == tmp_path / "checkpoints" / "step_00000002.pt"
    with pytest.raises(CheckpointError, match="steps held in .*: 1, 2, 3, 4"):
        ckpt.resolve_resume(tmp_path, "step=9")

    moved = ckpt.set_aside_later(tmp_path, 2)
    assert moved == tmp_path / "checkpoints" / "after_step_00000002"
    assert sorted(p.name for p in moved.iterdir()) == ["step_00000003.pt", "step_00000004.pt"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    assert latest_checkpoint(tmp_path).name == "step_00000002.pt"  # auto now follows the resumed branch
    assert ckpt.set_aside_later(tmp_path, 2) is None  # nothing later any more
    save_checkpoint(_state(3), tmp_path, 3, keep_last=None)
    assert ckpt.set_aside_later(tmp_path, 2).name == "after_step_00000002-2"  # never overwrites the first
    assert load_checkpoint(moved / "step_00000003.pt")["step"] == 3


def test_pruning_keeps_a_protected_checkpoint(tmp_path):
    first = save_checkpoint(_state(1), tmp_path, 1, keep_last=1)
    save_checkpoint(_state(2), tmp_path, 2, keep_last=1, protect=[first])
    save_checkpoint(_state(3), tmp_path, 3, keep_last=1, protect=[first])
    assert _names(tmp_path) == ["step_00000001.pt", "step_00000003.pt"]


@pytest.mark.parametrize("failure", ["oserror", "torch_runtime_error"])
def test_full_disk_is_enospc_naming_the_checkpoint(tmp_path, monkeypatch, failure):
    import errno

    good = save_checkpoint(_state(1), tmp_path, 1)

    def full(obj, f, *args, **kwargs):
        f.write(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError) as info:
        save_checkpoint(_state(2), tmp_path, 2)
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("step_00000002.pt")
    assert _names(tmp_path) == ["step_00000001.pt"]  # no temp file, the previous one intact
    assert load_checkpoint(good)["step"] == 1


def test_unreadable_checkpoint_messages_never_advise_weights_only_false(tmp_path):
    """torch's refusal text suggests weights_only=False; what we print names only the cause."""
    import datetime

    from shd_diffusion.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "step_00000001.pt").write_bytes(bytes(range(256)) * 4)  # random-looking bytes
    torch.save({"obj": datetime.timedelta(days=1)}, ckpt_dir / "step_00000002.pt")  # an object, not tensors
    for name, cause in (("step_00000001.pt", "not a weights-only torch file"),
                        ("step_00000002.pt", "pickles other objects")):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(ckpt_dir / name)
        assert cause in str(info.value) and "likely succeed" not in str(info.value)
    with pytest.warns(UserWarning) as record:
        assert latest_checkpoint(tmp_path) is None
    text = " ".join(str(w.message) for w in record)
    assert "skipping" in text and "likely succeed" not in text and "weights_only` set to `False" not in text
