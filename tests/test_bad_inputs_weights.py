"""Non-finite weights are refused where they are loaded, by every entry point that loads a model.

A NaN or inf anywhere in a model samples black images, scores a meaningless FID, distils garbage
and exports a broken pipeline, all with exit 0. One check in the one loader
(:func:`shd_diffusion.models.loading.check_finite_weights`, applied by every function of
:mod:`shd_diffusion.models.sources`) refuses them: sampling (``--checkpoint``), export (its
checkpoint argument) and training (``teacher.checkpoint``) each end in one ``error:`` line that
names the tensor, exit 2, and nothing written. A control row per entry point: the same file with
finite weights is accepted (proves the refusal is the non-finite entry, not the setup).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from cli_cases import call, refused_without_side_effects
from test_training import COMMON, DIT_STUDENT, DIT_TEACHER, _shared

from shd_diffusion.commands.sample import main as sample_main
from shd_diffusion.commands.export import main as export_main
from shd_diffusion.models import create_model
from shd_diffusion.models.loading import WeightsError, check_finite_weights

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

_spec = importlib.util.spec_from_file_location("train_mdt_shd_weights", REPO / "scripts" / "train_mdt_shd.py")
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

SAMPLE_ARCH = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, in_channels=1)
# The teacher of tests/test_training.py's tiny DiT configs (DIT_TEACHER).
TEACHER_ARCH = dict(input_size=32, hidden_size=48, depth=4, num_heads=4, num_classes=10, in_channels=1)
BAD_TENSOR = "blocks.1.attn.qkv.weight"  # deep inside the model: not the first tensor the loader meets
BAD_VALUES = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _state(name: str, arch: dict, bad: float | None) -> dict[str, torch.Tensor]:
    """A tiny model's state dict, with one entry of :data:`BAD_TENSOR` set to ``bad`` (None: intact)."""
    state = create_model(name, **arch).state_dict()
    if bad is not None:
        state[BAD_TENSOR].view(-1)[5] = bad
    return state


def _sample(tmp: Path, bad: float | None) -> list[str]:
    """``python -m sampling.sample`` from a save_pretrained folder."""
    model = create_model("DiT-S/2", **SAMPLE_ARCH)
    model.load_state_dict(_state("DiT-S/2", SAMPLE_ARCH, bad))
    model.save_pretrained(tmp / "in" / "ckpt")
    return ["--checkpoint", str(tmp / "in" / "ckpt"), "--out", str(tmp / "out" / "run"), "--num-samples", "2",
            "--steps", "2", "--shard-size", "2", "--batch-size", "2", "--vae", "none"]


def _export(tmp: Path, bad: float | None) -> list[str]:
    """``scripts/export.py`` from a training checkpoint whose EMA weights (the exported ones) are bad."""
    (tmp / "in").mkdir(parents=True)
    torch.save({"ema": _state("DiT-S/2", SAMPLE_ARCH, bad), "step": 1,
                "config": {"student": {"name": "DiT-S/2", **SAMPLE_ARCH}}}, tmp / "in" / "step.pt")
    return [str(tmp / "in" / "step.pt"), "--out", str(tmp / "out" / "export")]


def _train(tmp: Path, bad: float | None) -> list[str]:
    """``scripts/train_mdt_shd.py`` distilling from a bad ``teacher.checkpoint`` (a plain state dict)."""
    (tmp / "in").mkdir(parents=True)
    torch.save(_state("DiT-S/4", TEACHER_ARCH, bad), tmp / "in" / "teacher.pt")
    return [*COMMON, *DIT_STUDENT, *_shared("student"), *DIT_TEACHER, *_shared("teacher.model"), "distill.mode=kd",
            f"teacher.checkpoint={tmp / 'in' / 'teacher.pt'}", "train.steps=1", f"train.output_dir={tmp / 'out'}",
            "train.run_name=r", "train.log_with=none", "--no-progress"]


ENTRY_POINTS = {"sample": (sample_main, _sample), "export": (export_main, _export), "train": (train_script.main, _train)}


@pytest.mark.parametrize("value", list(BAD_VALUES))
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path, entry: str, value: str) -> None:
    main, build = ENTRY_POINTS[entry]
    argv = build(tmp_path, BAD_VALUES[value])
    (tmp_path / "out").mkdir(exist_ok=True)
    outcome = refused_without_side_effects(main, argv, [tmp_path / "in", tmp_path / "out"], BAD_TENSOR, "non-finite")
    assert len([ln for ln in outcome.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert not any((tmp_path / "out").iterdir())  # no run folder, no export folder


@pytest.mark.parametrize("entry", ["sample", "export"])
def test_the_same_finite_weights_are_accepted(tmp_path: Path, entry: str) -> None:
    # The control of the table above (training with a finite teacher is tests/test_training.py's).
    main, build = ENTRY_POINTS[entry]
    (tmp_path / "out").mkdir()
    outcome = call(main, build(tmp_path, None))
    assert outcome.code == 0, outcome.stderr


def test_check_lists_every_bad_tensor_and_ignores_integer_buffers() -> None:
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
             "index": torch.arange(4), "half": torch.tensor([float("nan")], dtype=torch.bfloat16)}
    with pytest.raises(WeightsError, match=r"src holds non-finite weights \(NaN or inf\) in 3: b, c, half"):
        check_finite_weights(state, "src")
    check_finite_weights({k: v for k, v in state.items() if k in ("a", "index")}, "src")  # finite: no error
