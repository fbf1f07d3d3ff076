"""Bad input to ``python -m sampling.sample``: one ``error:`` line naming the cause and the fix,
exit code 2, no traceback, nothing written (the run folder and the inputs are byte-identical
afterwards).

A tiny pixel-space DiT (2 DDPM steps) keeps each call well under a second. The resume cases start
from a finished 4-image run made once per module and copied into each test.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from cli_cases import assert_refused, call, refused_without_side_effects, snapshot

from shd_diffusion.commands.sample import main
from shd_diffusion.shards import shard_path
from shd_diffusion.cli import BadInput
from shd_diffusion.models import create_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _run_args(ckpt: Path, out: Path) -> list[str]:
    """A valid command: 4 images in shards of 2, batch 2, 2 steps, pixel space."""
    return ["--checkpoint", str(ckpt), "--out", str(out), "--num-samples", "4", "--steps", "2",
            "--shard-size", "2", "--batch-size", "2", "--vae", "none", "--cfg-scale", "2.0"]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder and a finished run of :func:`_run_args` (made once, copied per test)."""
    root = tmp_path_factory.mktemp("template")
    model = create_model("DiT-S/2", input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, in_channels=1)
    model.save_pretrained(root / "in" / "ckpt")
    from conftest import reset_accelerate_state

    reset_accelerate_state()
    assert main(_run_args(root / "in" / "ckpt", root / "out" / "run")) == 0
    reset_accelerate_state()
    return root


@pytest.fixture
def world(template: Path, tmp_path: Path) -> dict[str, Path]:
    """``in`` (checkpoint + bad files) and ``out`` (a finished run in ``out/run``), fresh copies."""
    shutil.copytree(template, tmp_path, dirs_exist_ok=True)
    # Resumes name the checkpoint the run was made with (its path is part of the manifest).
    return {"in": tmp_path / "in", "out": tmp_path / "out", "ckpt": tmp_path / "in" / "ckpt",
            "run_ckpt": template / "in" / "ckpt"}


def _new(w: dict[str, Path], *extra: str) -> list[str]:
    """A fresh run into out/new with ``extra`` appended (later options win)."""
    return [*_run_args(w["ckpt"], w["out"] / "new"), *extra]


def _resume(w: dict[str, Path], *extra: str) -> list[str]:
    """Rerun into the finished out/run with ``extra`` appended."""
    return [*_run_args(w["run_ckpt"], w["out"] / "run"), *extra]


def _file(w: dict[str, Path], name: str, data: bytes) -> str:
    (w["in"] / name).write_bytes(data)
    return str(w["in"] / name)


def _ckpt(w: dict[str, Path], path: str) -> list[str]:
    return [*_new(w), "--checkpoint", path]


def _edit(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _truncate_shard(w: dict[str, Path]) -> list[str]:
    shard = shard_path(w["out"] / "run", 1)
    _edit(shard, shard.read_bytes()[:-40])  # the pixel data cut short, the index array intact
    (w["out"] / "run" / "samples_4x8x8x3.npz").unlink()
    return ["--assemble", str(w["out"] / "run")]


def _manifest(w: dict[str, Path], data: bytes) -> list[str]:
    _edit(w["out"] / "run" / "shards" / "manifest.json", data)
    return _resume(w)


def _missing_shard(w: dict[str, Path]) -> list[str]:
    shard_path(w["out"] / "run", 0).unlink()
    return ["--assemble", str(w["out"] / "run")]


def _shards_is_a_file(w: dict[str, Path]) -> list[str]:
    (w["out"] / "new").mkdir()
    (w["out"] / "new" / "shards").write_text("x")
    return _new(w)


Case = Callable[[dict], list[str]]
CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    # --- checkpoints
    ("checkpoint-missing", lambda w: _ckpt(w, str(w["in"] / "nope.pt")), ("nope.pt",)),
    ("checkpoint-empty", lambda w: _ckpt(w, _file(w, "empty.pt", b"")), ("empty.pt", "empty")),
    ("checkpoint-random-bytes", lambda w: _ckpt(w, _file(w, "junk.pt", random.Random(1).randbytes(64) + b"\x00" * 64)), ("junk.pt",)),
    ("checkpoint-truncated-zip", lambda w: _ckpt(w, _file(w, "cut.pt", b"PK\x03\x04" + b"\x00" * 30)), ("cut.pt",)),
    ("checkpoint-folder-without-model", lambda w: _ckpt(w, str(w["in"])), ("has no config.json",)),
    ("model-arg-with-a-folder", lambda w: _new(w, "--model-arg", "input_size=16"), ("--model-arg", "drop --model-arg")),
    ("checkpoint-empty-string", lambda w: _ckpt(w, ""), ("--checkpoint and --out are required",)),
    # --- numbers
    ("cfg-below-one", lambda w: _new(w, "--cfg-scale", "0.5"), ("--cfg-scale", ">= 1", "0.5")),
    ("cfg-nan", lambda w: _new(w, "--cfg-scale", "nan"), ("--cfg-scale", "finite")),
    ("cfg-inf", lambda w: _new(w, "--cfg-scale", "inf"), ("--cfg-scale", "finite")),
    ("seed-negative", lambda w: _new(w, "--seed", "-1"), ("--seed", "-1")),
    ("seed-too-large", lambda w: _new(w, "--seed", str(2**64)), ("--seed",)),
    ("steps-zero", lambda w: _new(w, "--steps", "0"), ("--steps", "> 0")),
    ("steps-above-1000", lambda w: _new(w, "--steps", "1001"), ("--steps 1001", "1000")),
    ("num-samples-zero", lambda w: _new(w, "--num-samples", "0"), ("--num-samples",)),
    ("batch-size-negative", lambda w: _new(w, "--batch-size", "-2"), ("--batch-size",)),
    ("shard-size-zero", lambda w: _new(w, "--shard-size", "0"), ("--shard-size",)),
    ("vae-batch-size-zero", lambda w: _new(w, "--vae-batch-size", "0"), ("--vae-batch-size",)),
    ("scale-pow-nan", lambda w: _new(w, "--scale-pow", "nan"), ("--scale-pow",)),
    ("scale-pow-zero", lambda w: _new(w, "--scale-pow", "0"), ("--scale-pow",)),
    ("dist-timeout-zero", lambda w: _new(w, "--dist-timeout-min", "0"), ("--dist-timeout-min",)),
    ("compile-mode-without-compile", lambda w: _new(w, "--compile-mode", "reduce-overhead"), ("--compile",)),
    ("vae-none-ok-but-no-out", lambda w: [a for a in _new(w) if a not in ("--out", str(w["out"] / "new"))],
     ("--checkpoint and --out are required",)),
    ("vae-missing-folder", lambda w: _new(w, "--vae", str(w["in"] / "novae")), ("novae", "--vae PATH")),
    ("vae-not-a-vae", lambda w: _new(w, "--vae", str(w["in"])), ("could not load the VAE", "--vae PATH")),
    # --- output paths
    ("out-is-a-file", lambda w: [*_new(w), "--out", _file(w, "taken", b"x")], ("taken", "is a file")),
    ("out-under-a-file", lambda w: [*_new(w), "--out", _file(w, "taken", b"x") + "/sub"], ("taken", "is a file")),
    ("png-dir-is-a-file", lambda w: _new(w, "--png-dir", _file(w, "png", b"x")), ("--png-dir", "is a file")),
    ("shards-is-a-file", _shards_is_a_file, ("shards", "is a file")),
    # --- resume refusals (every manifest field a user can change on the command line)
    ("resume-other-seed", lambda w: _resume(w, "--seed", "1"), ("seed: 0 -> 1", "new --out")),
    ("resume-other-batch-size", lambda w: _resume(w, "--batch-size", "1"), ("batch_size: 2 -> 1",)),
    ("resume-other-cfg", lambda w: _resume(w, "--cfg-scale", "3.0"), ("cfg_scale: 2.0 -> 3.0",)),
    ("resume-other-steps", lambda w: _resume(w, "--steps", "3"), ("steps: 2 -> 3",)),
    ("resume-other-count", lambda w: _resume(w, "--num-samples", "6"), ("num_samples: 4 -> 6",)),
    ("resume-other-shard-size", lambda w: _resume(w, "--shard-size", "4", "--batch-size", "2"),
     ("shard_size: 2 -> 4",)),
    ("resume-other-labels", lambda w: _resume(w, "--labels", "uniform"), ("labels: 'balanced' -> 'uniform'",)),
    ("resume-other-precision", lambda w: _resume(w, "--precision", "bf16"), ("precision: 'fp32' -> 'bf16'",)),
    ("resume-other-clip", lambda w: _resume(w, "--clip-denoised", "off"), ("clip_denoised: True -> False",)),
    ("resume-other-ema", lambda w: _resume(w, "--no-use-ema"), ("use_ema: True -> False",)),
    ("manifest-not-json", lambda w: _manifest(w, b"{not json"), ("manifest.json", "not valid JSON")),
    ("manifest-not-a-manifest", lambda w: _manifest(w, b"[1, 2]"), ("manifest.json", "not a sampling manifest")),
    # --- assembling
    ("assemble-truncated-shard", _truncate_shard, ("shard_000001.npz", "unreadable", "rerun")),
    ("assemble-not-a-run", lambda w: ["--assemble", str(w["in"])], ("manifest.json", "not found")),
    ("assemble-missing-folder", lambda w: ["--assemble", str(w["in"] / "nope")], ("nope", "not found")),
    ("assemble-missing-shard", _missing_shard, ("1 of 2 shards missing", "rerun")),
]


@pytest.mark.parametrize("build, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_cleanly_before_any_work(world: dict, build: Case, needles: tuple[str, ...]) -> None:
    outcome = refused_without_side_effects(main, build(world), [world["in"], world["out"]], *needles)
    assert len([ln for ln in outcome.stderr.splitlines() if ln.startswith("error:")]) == 1


def test_resume_with_the_same_settings_is_accepted(world: dict) -> None:
    # The control for the resume rows above: only the named change makes them refuse.
    outcome = call(main, _resume(world))
    assert outcome.code == 0, outcome.stderr
    assert "0 to sample" in outcome.stdout


def test_read_only_out_folder(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests may run as root, for whom chmod does not make a folder read-only: the permission
    # check is what is replaced, the refusal path is the real one.
    locked = world["out"] / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real_access(p, mode, **kw))
    before = snapshot(world["out"])
    assert_refused(call(main, [*_new(world), "--out", str(locked)]), "locked", "permission denied")
    assert snapshot(world["out"]) == before


def test_full_disk_names_the_shard_and_keeps_the_finished_ones(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real_savez, calls = np.savez, []

    def savez_then_full(f, **arrays):  # the first shard fits, the second finds the disk full
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_savez(f, **arrays)

    monkeypatch.setattr(np, "savez", savez_then_full)
    out = world["out"] / "new"
    assert_refused(call(main, _new(world)), "no space left", "shard_000001.npz")
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["manifest.json", "shard_000000.npz"]  # no temp


def test_seed_refusal_leaves_the_corrected_command_free_to_run(world: dict) -> None:
    assert_refused(call(main, _new(world, "--seed", "-1")), "--seed")
    assert not (world["out"] / "new").exists()  # no manifest that would refuse the fix
    assert call(main, _new(world, "--seed", "1")).code == 0


def test_debug_shows_the_traceback(world: dict) -> None:
    with pytest.raises(BadInput, match="--cfg-scale"):
        main(_new(world, "--cfg-scale", "nan", "--debug"))


@pytest.mark.slow
def test_real_entry_point_prints_one_line(world: dict) -> None:
    cmd = [sys.executable, "-m", "sampling.sample", *_ckpt(world, str(world["in"] / "nope.pt"))]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:") and "nope.pt" in proc.stderr
    assert not (world["out"] / "new").exists()


# ------------------------------------------------------------------- text-to-image (--pipeline)


@pytest.fixture(scope="module")
def t2i_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny PixArt-Sigma pipeline, a 1-head student folder, and training checkpoints of a student whose
    teacher_overrides do not fit (width 16 for 3 heads of 8) or that is class-conditional."""
    import torch
    from t2i_builders import build_pipeline
    from test_t2i_commands import pixart_student

    root = tmp_path_factory.mktemp("t2i_template")
    pixart = build_pipeline(root, "pixart")
    weights = {"pos_embed.proj.weight": torch.zeros(1)}  # never reached: the student's shape is refused first
    base = {"step": 1, "model": weights, "ema": weights, "optimizer": {}, "scheduler": {}, "groups": [], "rng": {}}
    (root / "bad_width" / "checkpoints").mkdir(parents=True)
    torch.save({**base, "config": {"student": {"name": "from_teacher", "teacher_overrides": {
        "num_attention_heads": 3, "cross_attention_dim": 16}}}}, root / "bad_width" / "checkpoints" / "step_00000001.pt")
    (root / "dit_pipeline" / "transformer").mkdir(parents=True)
    (root / "dit_pipeline" / "transformer" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"}')
    (root / "prompts.txt").write_text("a red car\na photo of a cat\n")
    (root / "empty.txt").write_text("\n  \n")
    return {"root": root, "pixart": pixart, "student": pixart_student(pixart, root / "student")}


def _t2i(w: dict[str, Path], *extra: str) -> list[str]:
    """A valid text-to-image run into out/new (2 prompts, 2 steps), ``extra`` appended (later wins)."""
    root = w["root"]
    return ["--pipeline", str(w["pixart"]), "--checkpoint", str(w["student"]), "--prompts", str(root / "prompts.txt"),
            "--out", str(w["out"] / "new"), "--steps", "2", "--height", "16", "--width", "16",
            "--pipeline-arg", "max_sequence_length=8", "--pipeline-arg", "use_resolution_binning=false", *extra]


T2I_CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    ("pipeline-class-without-family", lambda w: _t2i(w, "--pipeline", str(w["root"] / "dit_pipeline")),
     ("DiTTransformer2DModel",)),
    ("pipeline-missing", lambda w: _t2i(w, "--pipeline", str(w["root"] / "nowhere")), ("--pipeline", "nowhere")),
    ("prompts-empty", lambda w: _t2i(w, "--prompts", str(w["root"] / "empty.txt")),
     ("empty.txt", "holds no prompts", "one prompt per line")),
    ("prompts-missing", lambda w: _t2i(w, "--prompts", str(w["root"] / "nope.txt")), ("nope.txt", "not found")),
    ("pipeline-without-prompts", lambda w: [a for a in _t2i(w) if a not in ("--prompts", str(w["root"] / "prompts.txt"))],
     ("--pipeline needs --prompts",)),
    ("student-width-not-heads", lambda w: _t2i(w, "--checkpoint", str(w["root"] / "bad_width")),
     ("cross_attention_dim 16", "num_attention_heads 3 x attention_head_dim 8 = 24")),
    ("class-flag-with-pipeline", lambda w: _t2i(w, "--cfg-scale", "3.8"),
     ("--cfg-scale is for class-conditional", "--guidance-scale", "drop --cfg-scale")),
    ("model-with-pipeline", lambda w: _t2i(w, "--model", "DiT-S/2"), ("--model is for class-conditional",)),
    ("pipeline-flag-without-pipeline", lambda w: [*_new(w), "--guidance-scale", "4.5"],
     ("--guidance-scale is for text-to-image", "--pipeline")),
    ("prompts-without-pipeline", lambda w: [*_new(w), "--prompts", str(w["root"] / "prompts.txt")],
     ("--prompts is for text-to-image", "--pipeline")),
    ("pipeline-arg-not-json", lambda w: _t2i(w, "--pipeline-arg", "negative_prompt=blurry"), ("not JSON", "quote")),
    ("pipeline-arg-set-by-the-sampler", lambda w: _t2i(w, "--pipeline-arg", "num_inference_steps=3"),
     ("num_inference_steps", "set by the sampler")),
    ("pipeline-arg-unknown", lambda w: _t2i(w, "--pipeline-arg", "strength=0.5"), ("takes no argument 'strength'",)),
    ("guidance-scale-nan", lambda w: _t2i(w, "--guidance-scale", "nan"), ("--guidance-scale", "finite")),
    ("height-zero", lambda w: _t2i(w, "--height", "0"), ("--height", "> 0")),
]


@pytest.mark.parametrize("build, needles", [c[1:] for c in T2I_CASES], ids=[c[0] for c in T2I_CASES])
def test_t2i_refused_cleanly_before_any_work(t2i_template: dict, world: dict, build: Case,
                                             needles: tuple[str, ...]) -> None:
    w = {**t2i_template, **world}
    outcome = refused_without_side_effects(main, build(w), [t2i_template["root"], world["in"], world["out"]], *needles)
    assert len([ln for ln in outcome.stderr.splitlines() if "error:" in ln]) == 1
