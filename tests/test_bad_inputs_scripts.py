"""Bad input to ``scripts/inspect_checkpoint.py`` and ``scripts/extract_latents.py``: one
``error:`` line naming the cause and the fix, exit code 2, no traceback, nothing written.

The extraction cases use a tiny local AutoencoderKL and 4 small PNGs; a refusal must come before
``--out`` is even created.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import pytest
import torch
from cli_cases import assert_refused, call, snapshot
from test_data import write_image

from shd_diffusion.cli import BadInput
from shd_diffusion.models import create_model

REPO = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INSPECT = _script("inspect_checkpoint")
EXTRACT = _script("extract_latents")
TINY = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10, in_channels=1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture
def world(tmp_path: Path, vae_dir: Path) -> dict[str, Path]:
    """``in``: a DiT state dict, 4 images in 2 classes, the VAE; ``out``: where outputs would go."""
    inp = tmp_path / "in"
    inp.mkdir()
    torch.save(create_model("DiT-S/2", **TINY).state_dict(), inp / "dit.pt")
    rng = np.random.default_rng(0)
    for j in range(4):
        write_image(inp / "images" / f"c{j % 2}" / f"{j}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (tmp_path / "out").mkdir()
    return {"in": inp, "out": tmp_path / "out", "vae": vae_dir}


def _file(w: dict[str, Path], name: str, data: bytes) -> str:
    (w["in"] / name).write_bytes(data)
    return str(w["in"] / name)


def _inspect(w: dict[str, Path], *args: str) -> list[str]:
    return [str(w["in"] / "dit.pt"), *args]


def _pickled_object(w: dict[str, Path]) -> list[str]:
    torch.save({"model": Path("x")}, w["in"] / "obj.pt")  # refused by the weights-only unpickler
    return [str(w["in"] / "obj.pt")]


Case = Callable[[dict], list[str]]
INSPECT_CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    ("missing", lambda w: [str(w["in"] / "nope.pt")], ("nope.pt", "not found")),
    ("empty", lambda w: [_file(w, "e.pt", b"")], ("e.pt", "empty")),
    ("random-bytes", lambda w: [_file(w, "r.pt", random.Random(1).randbytes(100))], ("r.pt",)),
    ("pickled-object", _pickled_object, ("obj.pt",)),
    ("a-folder", lambda w: [str(w["in"] / "images")], ("images",)),
    ("decode-layer-without-model", lambda w: _inspect(w, "--decode-layer", "2"), ("--decode-layer", "--model")),
    ("input-size-zero", lambda w: _inspect(w, "--model", "DiT-S/2", "--input-size", "0"), ("--input-size", "> 0")),
    ("input-size-not-patchable", lambda w: _inspect(w, "--model", "DiT-S/2", "--input-size", "7"),
     ("cannot build DiT-S/2", "patch_size")),
    ("decode-layer-not-splitting", lambda w: _inspect(w, "--model", "MDTv2-S/2", "--decode-layer", "3"),
     ("cannot build MDTv2-S/2", "decode_layer")),
]


def _extract(w: dict[str, Path], *extra: str) -> list[str]:
    """A valid extraction of the 4 images into out/lat, with ``extra`` appended (later wins)."""
    return ["--data", str(w["in"] / "images"), "--out", str(w["out"] / "lat"), "--vae", str(w["vae"]),
            "--image-size", "16", "--batch-size", "2", "--shard-size", "2", "--device", "cpu",
            "--num-workers", "0", *extra]


def _captions(w: dict[str, Path], uncaptioned: int = 0, lines: Sequence[str] = ()) -> str:
    """An imagefolder of 2 captioned images (+ ``uncaptioned`` without a line) under in/captions."""
    root = w["in"] / "captions"
    rng = np.random.default_rng(1)
    for j in range(2 + uncaptioned):
        write_image(root / f"{j}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    rows = [json.dumps({"file_name": f"{j}.png", "text": "a cat"}) for j in range(2)]
    (root / "metadata.jsonl").write_text("\n".join([*rows, *lines]) + "\n")
    return str(root)


def _prompts(w: dict[str, Path], text: str) -> str:
    (w["in"] / "prompts.txt").write_text(text)
    return str(w["in"] / "prompts.txt")


def _dit_pipeline(w: dict[str, Path]) -> str:
    """A pipeline folder whose transformer class has no text-to-image family (diffusers' DiT)."""
    folder = w["in"] / "dit_pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                         "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    return str(folder)


def _t2i(w: dict[str, Path], mode: str, source: str, *extra: str, pipeline: str | None = "default") -> list[str]:
    """A text-to-image extraction (``mode`` --captions / --prompts) into out/lat, ``extra`` appended."""
    pipe = [] if pipeline is None else ["--pipeline", str(w["in"] / "no_pipeline") if pipeline == "default" else pipeline]
    return [mode, source, *pipe, "--out", str(w["out"] / "lat"), "--image-size", "16", "--device", "cpu", *extra]


def _corrupt_image(w: dict[str, Path]) -> list[str]:
    (w["in"] / "images" / "c0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return _extract(w)


EXTRACT_CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    ("data-missing", lambda w: _extract(w, "--data", str(w["in"] / "nope")), ("nope",)),
    ("data-is-a-file", lambda w: _extract(w, "--data", str(w["in"] / "dit.pt")), ("dit.pt",)),
    ("data-without-classes", lambda w: _extract(w, "--data", str(w["in"] / "images" / "c0")), ("c0",)),
    ("corrupt-image", _corrupt_image, ("0.png",)),
    ("vae-missing", lambda w: _extract(w, "--vae", str(w["in"] / "novae")), ("novae", "--vae")),
    ("vae-not-a-vae", lambda w: _extract(w, "--vae", str(w["in"] / "images")), ("images", "--vae")),
    ("out-is-a-file", lambda w: _extract(w, "--out", str(w["in"] / "dit.pt")), ("dit.pt", "is a file")),
    ("image-size-zero", lambda w: _extract(w, "--image-size", "0"), ("--image-size", "> 0")),
    ("batch-size-zero", lambda w: _extract(w, "--batch-size", "0"), ("--batch-size",)),
    ("shard-size-negative", lambda w: _extract(w, "--shard-size", "-1"), ("--shard-size",)),
    ("workers-negative", lambda w: _extract(w, "--num-workers", "-1"), ("--num-workers",)),
    ("max-shards-zero", lambda w: _extract(w, "--max-shards", "0"), ("--max-shards",)),
    ("scale-factor-nan", lambda w: _extract(w, "--scale-factor", "nan"), ("--scale-factor", "finite")),
    ("device-bogus", lambda w: _extract(w, "--device", "gpu0"), ("--device", "gpu0")),
    ("required-missing", lambda w: ["--data", str(w["in"] / "images")], ("--out",)),
    # --- text-to-image modes (--captions / --prompts with --pipeline); refused before the pipeline loads
    ("captions-missing-for-images", lambda w: _t2i(w, "--captions", _captions(w, uncaptioned=1)),
     ("1 images", "no line in metadata.jsonl", "add a caption line")),
    ("captions-listing-a-missing-image", lambda w: _t2i(w, "--captions", _captions(w, lines=['{"file_name": "x.png", '
                                                                                            '"text": "a"}'])),
     ("x.png", "not in", "add the image or remove the line")),
    ("captions-without-pipeline", lambda w: _t2i(w, "--captions", _captions(w), pipeline=None),
     ("--captions needs --pipeline",)),
    ("pipeline-without-family", lambda w: _t2i(w, "--captions", _captions(w), pipeline=_dit_pipeline(w)),
     ("DiTTransformer2DModel", "no text-to-image family", "PixArtTransformer2DModel")),
    ("pipeline-missing", lambda w: _t2i(w, "--captions", _captions(w), pipeline=str(w["in"] / "nowhere")),
     ("could not read the pipeline", "nowhere")),
    ("vae-with-captions", lambda w: _t2i(w, "--captions", _captions(w), "--vae", str(w["vae"])),
     ("--vae is for class folders", "drop --vae")),
    ("scale-factor-with-prompts", lambda w: _t2i(w, "--prompts", _prompts(w, "a cat\n"), "--scale-factor", "0.18215"),
     ("--scale-factor is for class folders", "drop --scale-factor")),
    ("steps-with-captions", lambda w: _t2i(w, "--captions", _captions(w), "--steps", "4"),
     ("--steps belongs to --prompts", "drop --steps")),
    ("both-flips-with-prompts", lambda w: _t2i(w, "--prompts", _prompts(w, "a cat\n"), "--both-flips"),
     ("--both-flips", "--prompts")),
    ("pipeline-with-class-folders", lambda w: _extract(w, "--pipeline", str(w["in"])),
     ("--pipeline belongs to --captions / --prompts", "drop --pipeline")),
    ("prompts-empty", lambda w: _t2i(w, "--prompts", _prompts(w, "\n  \n")), ("holds no prompts", "one prompt per line")),
    ("prompts-missing", lambda w: _t2i(w, "--prompts", str(w["in"] / "nope.txt")), ("nope.txt", "not found")),
    ("data-and-captions", lambda w: _extract(w, "--captions", _captions(w)), ("--captions", "not allowed with")),
    ("text-batch-size-zero", lambda w: _t2i(w, "--captions", _captions(w), "--text-batch-size", "0"),
     ("--text-batch-size", "> 0")),
]


def _refused(main: Callable, w: dict, build: Case, needles: tuple[str, ...]) -> None:
    argv = build(w)
    before = snapshot(w["in"], w["out"])
    outcome = call(main, argv)
    assert_refused(outcome, *needles)
    assert snapshot(w["in"], w["out"]) == before  # nothing written, nothing lost
    assert not (w["out"] / "lat").exists()


@pytest.mark.parametrize("build, needles", [c[1:] for c in INSPECT_CASES], ids=[c[0] for c in INSPECT_CASES])
def test_inspect_checkpoint_refuses_cleanly(world: dict, build: Case, needles: tuple[str, ...]) -> None:
    _refused(INSPECT.main, world, build, needles)


@pytest.mark.parametrize("build, needles", [c[1:] for c in EXTRACT_CASES], ids=[c[0] for c in EXTRACT_CASES])
def test_extract_latents_refuses_cleanly(world: dict, build: Case, needles: tuple[str, ...], fresh_accelerate) -> None:
    _refused(EXTRACT.main, world, build, needles)


def test_inspect_answers_for_a_good_file(world: dict) -> None:
    # The control for the table: the same file inspects (0); a registry config it does not fit
    # is the check's answer (1, printed on stdout), not bad input.
    ok = call(INSPECT.main, _inspect(world))
    assert ok.code == 0 and "32 tensors" in ok.stdout, ok.stderr
    no = call(INSPECT.main, _inspect(world, "--model", "DiT-S/2", "--input-size", "8"))
    assert no.code == 1 and "does not load into DiT-S/2" in no.stdout and not no.stderr


def test_corrupt_image_in_a_later_shard_keeps_the_finished_ones(world: dict, fresh_accelerate) -> None:
    (world["in"] / "images" / "c1" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # in shard 1 of 2
    assert_refused(call(EXTRACT.main, _extract(world)), "3.png")
    assert sorted(p.name for p in (world["out"] / "lat").iterdir()) == ["shard_00000.safetensors"]


@pytest.mark.parametrize("device, needles", [("cuda", ("--device cuda", "not available", "--device cpu")),
                                             ("cuda:1", ("--device cuda:1", "not available"))])
def test_extract_on_a_missing_gpu_is_one_line(world: dict, monkeypatch: pytest.MonkeyPatch, device: str,
                                              needles: tuple[str, ...], fresh_accelerate) -> None:
    # A machine without a GPU (simulated, so the row runs on every machine): before, a RuntimeError
    # traceback from the first tensor moved to the device.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(EXTRACT.main, world, lambda w: _extract(w, "--device", device), needles)


def test_extract_control_and_debug(world: dict, fresh_accelerate) -> None:
    assert call(EXTRACT.main, _extract(world)).code == 0  # the table's base command is valid
    assert (world["out"] / "lat" / "index.json").is_file()
    with pytest.raises(BadInput, match="--batch-size"):
        EXTRACT.main(_extract(world, "--batch-size", "0", "--debug"))


@pytest.mark.parametrize("name", ["inspect_checkpoint", "extract_latents"])
@pytest.mark.slow
def test_real_entry_points_print_one_line(world: dict, name: str) -> None:
    nope = str(world["in"] / "nope")
    args = [nope + ".pt"] if name == "inspect_checkpoint" else _extract(world, "--data", nope)
    proc = subprocess.run([sys.executable, f"scripts/{name}.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:") and "nope" in proc.stderr
