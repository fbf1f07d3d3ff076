"""Bad input to ``python -m sampling.score``: one ``error:`` line naming the cause and the fix,
exit code 2, no traceback, nothing written.

The Inception network is replaced by one that fails the test if it ever runs, so every refusal in
the table is shown to come before any feature is computed (no work is lost to a late refusal). The
weights cases at the end use the real loading code.
"""

from __future__ import annotations

import json
import pathlib
import urllib.error
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from cli_cases import assert_refused, call, refused_without_side_effects, snapshot

from shd_diffusion.commands import score as score_cli
from shd_diffusion.commands.score import main
from shd_diffusion.evaluation import scoring
from shd_diffusion.evaluation.inception import WeightsInfo
from shd_diffusion.evaluation.images import ScoreError
from shd_diffusion.evaluation.scoring import RefStats

N = 5  # images per set: enough for FID and k=3 precision/recall
SHA = "f" * 64  # the fake weights' sha256


class _NoForward(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        raise AssertionError("an Inception forward ran before the refusal")


def _png_folder(d: Path, corrupt: str | None = None) -> Path:
    from PIL import Image

    d.mkdir()
    for i in range(N):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"im{i}.png")
    if corrupt:
        good = (d / "im0.png").read_bytes()
        (d / corrupt).write_bytes(good[: len(good) // 2])  # a PNG cut short: header fine, data missing
    return d


def _truncated_member(path: Path, images: np.ndarray) -> None:
    np.savez(path, images)
    with zipfile.ZipFile(path) as zf:
        raw = zf.read("arr_0.npy")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", raw[:-7])


def _absurd_header(path: Path) -> None:
    """An arr_0 whose header declares 5 x 100000 x 100000 x 3 uint8 (150 GB) over a few bytes."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False,
                                               "shape": (5, 100000, 100000, 3)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", buf.getvalue() + b"\x00" * 64)


def _bad_crc(path: Path, images: np.ndarray) -> None:
    np.savez(path, images)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # a pixel byte of the stored member: the zip's CRC-32 no longer matches
    path.write_bytes(bytes(data))


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Valid inputs, fake weights whose extractor must never run, and the folders to watch."""
    images = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)  # (N, H, W, 3)
    inp = tmp_path / "in"
    inp.mkdir()
    np.savez(inp / "samples.npz", images)
    feats = np.random.default_rng(1).normal(size=(N, 4)).astype(np.float32)  # no FID is ever computed here
    mu, sigma = feats.mean(0).astype(np.float64), np.cov(feats, rowvar=False)
    RefStats(mu, sigma, feats, (8, 8), SHA, "synthetic").save(inp / "stats.npz")
    (inp / "w.pth").write_bytes(b"fake weights: never read")
    real_inspect = scoring.inspect_weights
    fake = WeightsInfo(str(inp / "w.pth"), SHA, False, "fake weights have no logits")
    monkeypatch.setattr(scoring, "inspect_weights",
                        lambda p: fake if Path(p) == inp / "w.pth" else real_inspect(p))
    monkeypatch.setattr(scoring, "load_feature_extractor", lambda *a, **k: _NoForward())
    return {"in": inp, "out": tmp_path / "out", "images": images, "stats": (mu, sigma)}


def _argv(w: dict, samples: str = "samples.npz", ref: str = "stats.npz", *extra: str) -> list[str]:
    inp = w["in"]
    return [str(inp / samples), "--ref", str(inp / ref), "--inception-weights", str(inp / "w.pth"),
            "--cache-dir", str(w["out"] / "cache"), "--json", str(w["out"] / "scores.json"),
            "--kid-subset-size", str(N), "--no-progress", "--device", "cpu", *extra]


def _adm(w: dict, name: str, **stored: np.ndarray) -> str:
    """An ADM-layout reference in the inputs: arr_0 = the samples' images, plus ``stored`` arrays."""
    return _npz(w, name, w["images"], **stored)


def _npz(w: dict, name: str, *arrays: np.ndarray, **named: np.ndarray) -> str:
    np.savez(w["in"] / name, *arrays, **named)
    return name


def _bytes(w: dict, name: str, data: bytes) -> str:
    (w["in"] / name).write_bytes(data)
    return name


def _made(w: dict, name: str, make: Callable[[Path], object]) -> str:
    make(w["in"] / name)
    return name


def _t2i(w: dict, name: str = "t2i.npz") -> str:
    """A text-to-image sample file: the images and one prompt per image."""
    return _npz(w, name, w["images"], np.arange(N), prompts=np.array([f"prompt {i}" for i in range(N)]))


def _not_clip(w: dict) -> str:
    """A model folder whose config is a T5's (a pipeline's text encoder), not CLIP."""
    (w["in"] / "t5").mkdir(exist_ok=True)
    (w["in"] / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    return str(w["in"] / "t5")


def _text(w: dict, text: str) -> str:
    (w["in"] / "prompts.txt").write_text(text)
    return str(w["in"] / "prompts.txt")


def _out_file(w: dict, name: str) -> str:
    """A plain file inside the (otherwise empty) output folder, for output paths that are taken."""
    w["out"].mkdir(exist_ok=True)
    (w["out"] / name).write_text("x")
    return str(w["out"] / name)


def _head(w: dict, name: str, size: int) -> bytes:
    return (w["in"] / name).read_bytes()[:size]


Case = Callable[[dict], list[str]]
CASES: list[tuple[str, Case, tuple[str, ...]]] = [
    # --- samples
    ("samples-random-bytes", lambda w: _argv(w, _bytes(w, "j.npz", b"\x00junk" * 50)),
     ("j.npz", "not a readable .npz", "np.savez")),
    ("samples-truncated-file", lambda w: _argv(w, _bytes(w, "t.npz", _head(w, "samples.npz", 150))),
     ("t.npz", "not a readable .npz")),
    ("samples-truncated-member", lambda w: _argv(w, _made(w, "t.npz", lambda p: _truncated_member(p, w["images"]))),
     ("t.npz", "truncated")),
    ("samples-absurd-header", lambda w: _argv(w, _made(w, "h.npz", _absurd_header)),
     ("h.npz", "declares shape (5, 100000, 100000, 3)", "truncated or corrupt")),
    ("samples-bad-crc", lambda w: _argv(w, _made(w, "c.npz", lambda p: _bad_crc(p, w["images"]))),
     ("c.npz", "corrupt", "re-create")),
    ("samples-missing-arr_0", lambda w: _argv(w, _npz(w, "k.npz", images=w["images"])), ("no 'arr_0'", "np.savez")),
    ("samples-float", lambda w: _argv(w, _npz(w, "f.npz", w["images"] / 255.0)), ("dtype float64", "uint8")),
    ("samples-is-a-folder", lambda w: _argv(w, "."), ("is a folder", ".npz")),
    ("samples-missing", lambda w: _argv(w, "nope.npz"), ("nope.npz", "not found")),
    ("samples-empty", lambda w: _argv(w, _npz(w, "e.npz", w["images"][:0])), ("no images",)),
    # --- reference
    ("ref-missing", lambda w: _argv(w, ref="nope.npz"), ("--ref", "not found")),
    ("ref-truncated-npz", lambda w: _argv(w, ref=_bytes(w, "r.npz", _head(w, "stats.npz", 300))),
     ("--ref", "r.npz", "not a readable .npz", "re-")),
    ("ref-stats-only", lambda w: _argv(w, ref=_npz(w, "r.npz", mu=np.zeros(3), sigma=np.eye(3))),
     ("no 'arr_0'", "precision/recall")),
    ("ref-mu-without-sigma", lambda w: _argv(w, ref=_adm(w, "r.npz", mu=np.zeros(2048))),
     ("stores 'mu' but not 'sigma'", "--recompute-ref-stats")),
    ("ref-stored-wrong-shape", lambda w: _argv(w, ref=_adm(w, "r.npz", mu=np.ones(7), sigma=np.eye(7))),
     ("(7,)", "expected (2048,)", "--recompute-ref-stats")),
    ("ref-stored-nan", lambda w: _argv(w, ref=_adm(w, "r.npz", mu=np.full(2048, np.nan),
                                                   sigma=np.eye(2048, dtype=np.float16))),
     ("NaN", "--recompute-ref-stats")),
    ("ref-stored-pickle", lambda w: _argv(w, ref=_adm(w, "r.npz", mu=np.array([{"a": 1}], dtype=object),
                                                      sigma=np.zeros(1))), ("pickled Python objects", "refused")),
    ("ref-spatial-half", lambda w: _argv(w, ref=_adm(w, "r.npz", mu=np.zeros(1), sigma=np.zeros(1), mu_s=np.zeros(1))),
     ("'mu_s' but not 'sigma_s'",)),
    ("ref-corrupt-png", lambda w: _argv(w, ref=_made(w, "pngs", lambda p: _png_folder(p, corrupt="broken.png"))),
     ("broken.png", "corrupt or truncated", "replace or remove")),
    ("ref-not-a-png", lambda w: _argv(w, ref=_made(w, "pngs", lambda p: (_png_folder(p), (p / "z.png").write_text("")))),
     ("z.png", "corrupt or truncated")),
    ("ref-empty-folder", lambda w: _argv(w, ref=_made(w, "none", Path.mkdir)), ("none", "has no .png/.jpg/.jpeg images")),
    ("ref-stats-file-incomplete", lambda w: _argv(w, ref=_npz(w, "r.npz", format=np.array(scoring.STATS_FORMAT))),
     ("r.npz", "unreadable", "pass the reference images")),
    ("ref-other-weights", lambda w: _argv(w, ref=_made(w, "o.npz", RefStats(
        *w["stats"], np.zeros((N, 4), np.float32), (8, 8), "0" * 64, "x").save)),
     ("computed with Inception weights", "--inception-weights")),
    ("ref-size-mismatch", lambda w: _argv(w, _npz(w, "s16.npz", np.zeros((N, 16, 16, 3), np.uint8))),
     ("16x16", "--allow-size-mismatch")),
    ("cache-dir-is-a-file", lambda w: _argv(w, ref=_adm(w, "a.npz")) + ["--cache-dir", _out_file(w, "c")],
     ("--cache-dir", "is a file")),
    # --- settings
    ("batch-size-0", lambda w: _argv(w) + ["--batch-size", "0"], ("--batch-size 0", ">= 1")),
    ("batch-size-not-int", lambda w: _argv(w) + ["--batch-size", "two"], ("--batch-size", "invalid int")),
    ("pr-k-0", lambda w: _argv(w) + ["--pr-k", "0"], ("--pr-k 0", ">= 1", "k = 3")),
    ("pr-batch-size-0", lambda w: _argv(w) + ["--pr-batch-size", "0"], ("--pr-batch-size 0",)),
    ("is-splits-0", lambda w: _argv(w) + ["--is-splits", "0"], ("--is-splits 0",)),
    ("kid-subsets-0", lambda w: _argv(w) + ["--kid-subsets", "0"], ("--kid-subsets 0",)),
    ("kid-subset-size-1", lambda w: _argv(w) + ["--kid-subset-size", "1"], ("--kid-subset-size 1", "at least 2")),
    ("kid-subset-too-big", lambda w: _argv(w) + ["--kid-subset-size", "6"], ("KID with subset size 6", "N <= 5")),
    ("pr-k-too-big", lambda w: _argv(w) + ["--pr-k", "5"], ("k=5 neighbours", "at least 6")),
    ("seed-negative", lambda w: _argv(w) + ["--seed", "-1"], ("--seed -1", ">= 0")),
    ("seed-too-big", lambda w: _argv(w) + ["--seed", str(2**32)], ("--seed", "2**32")),
    ("device-unknown", lambda w: _argv(w) + ["--device", "gpu0"], ("--device 'gpu0'", "cpu")),
    # --- outputs: refused before any score is computed, so none is lost
    ("json-is-a-folder", lambda w: _argv(w) + ["--json", str(Path(_out_file(w, "x")).parent)],
     ("--json", "is a folder", "file path")),
    ("json-under-a-file", lambda w: _argv(w) + ["--json", str(w["in"] / "samples.npz" / "s.json")],
     ("--json", "is a file")),
    ("json-overwrites-samples", lambda w: _argv(w) + ["--json", str(w["in"] / "samples.npz")],
     ("--json", "samples", "overwrite")),
    # --- CLIP score: refused before any Inception or CLIP forward
    ("clip-not-a-clip-model", lambda w: _argv(w, _t2i(w)) + ["--clip", _not_clip(w)],
     ("is a t5 model, not CLIP", "openai/clip-vit-large-patch14")),
    ("clip-missing-offline", lambda w: _argv(w, _t2i(w)) + ["--clip", str(w["in"] / "noclip")],
     ("--clip", "noclip", "no model config found")),
    ("clip-samples-without-prompts", lambda w: _argv(w) + ["--clip", _not_clip(w)],
     ("no 'prompts' member", "--clip-prompts")),
    ("clip-prompts-count", lambda w: _argv(w) + ["--clip", _not_clip(w), "--clip-prompts", _text(w, "a cat\n")],
     (f"holds {N} images but 1 prompts", "one prompt per image")),
    ("clip-prompts-empty", lambda w: _argv(w) + ["--clip", _not_clip(w), "--clip-prompts", _text(w, "\n")],
     ("--clip-prompts", "holds no prompts")),
    ("clip-prompts-without-clip", lambda w: _argv(w) + ["--clip-prompts", _text(w, "a\n")],
     ("--clip-prompts needs --clip",)),
    ("clip-batch-size-0", lambda w: _argv(w, _t2i(w)) + ["--clip", _not_clip(w), "--clip-batch-size", "0"],
     ("--clip-batch-size 0", ">= 1")),
    ("no-ref-no-clip", lambda w: [a for a in _argv(w) if a not in ("--ref", str(w["in"] / "stats.npz"))],
     ("--ref is required", "--clip")),
    ("fid-flag-without-ref", lambda w: [str(w["in"] / _t2i(w)), "--clip", _not_clip(w), "--pr-k", "2"],
     ("--pr-k is a FID setting", "--ref")),
]


@pytest.mark.parametrize(("build", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_cleanly_before_any_work(world: dict, build: Case, needles: tuple[str, ...]) -> None:
    outcome = refused_without_side_effects(main, build(world), [world["in"], world["out"]], *needles)
    assert len([ln for ln in outcome.stderr.splitlines() if ln.startswith("error:")]) <= 1


def test_cuda_device_without_cuda(world: dict) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    assert_refused(call(main, _argv(world) + ["--device", "cuda"]), "CUDA is not available", "--device cpu")


def test_debug_shows_the_traceback(world: dict) -> None:
    with pytest.raises(ScoreError, match="--pr-k 0"):
        main(_argv(world) + ["--pr-k", "0", "--debug"])


# ---------------------------------------------------------------------------- weights (real loading)


def _weights_argv(tmp_path: Path, weights: list[str]) -> list[str]:
    np.savez(tmp_path / "s.npz", np.zeros((N, 8, 8, 3), np.uint8))
    return [str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), *weights, "--kid-subset-size", str(N),
            "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "j.json"), "--no-progress"]


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (None, ("nope.pth", "not found", "convert_inception.py --out")),
        (b"", ("not a readable torch.save file", "convert_inception.py")),
        (b"\x80\x02garbage" * 20, ("not a readable torch.save file", "convert_inception.py")),
        ("pickle", ("Python objects besides tensors", "could run code", "convert_inception.py")),
        ("no-fc", ("no fc.weight", "convert_inception.py")),
    ],
    ids=["missing", "empty", "random-bytes", "pickled-object", "no-fc"],
)
def test_bad_weights_files(tmp_path: Path, content: object, needles: tuple[str, ...]) -> None:
    path = tmp_path / ("nope.pth" if content is None else "w.pth")
    if content == "pickle":
        torch.save({"fc.weight": pathlib.PurePosixPath("x")}, path)  # refused by the weights-only unpickler
    elif content == "no-fc":
        torch.save({"conv.weight": torch.ones(2)}, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    argv = _weights_argv(tmp_path, ["--inception-weights", str(path)])
    before = snapshot(tmp_path)
    outcome = call(main, argv)
    assert_refused(outcome, *needles)
    assert "weights_only=False" not in outcome.stderr  # never advise unsafe loading of a foreign file
    assert snapshot(tmp_path) == before


def test_missing_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", offline)  # never download in tests
    argv = _weights_argv(tmp_path, [])
    before = snapshot(tmp_path)
    outcome = call(main, argv)
    assert_refused(outcome, "cannot download", "convert_inception.py", "--inception-weights")
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ failures after the scores exist


class _PixelFeatures(torch.nn.Module):
    """A stand-in Inception: each image's pixels, tiled to 2048 values (distinct, deterministic)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        flat = x.flatten(1).float() / 255  # (B, 3 * H * W)
        return (flat.repeat(1, 2048 // flat.shape[1] + 1)[:, :2048],)  # (B, 2048)


def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(28, "No space left on device", str(args[0]) if args else "?")


def test_full_disk_keeps_the_scores(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json cannot be written after scoring (the disk filled): the report goes to stdout, exit 2,
    no partial file. A cache write that fails only costs the cache."""
    monkeypatch.setattr(scoring, "load_feature_extractor", lambda *a, **k: _PixelFeatures())
    monkeypatch.setattr(score_cli, "atomic_write_text", _enospc)
    monkeypatch.setattr(RefStats, "save", _enospc)
    argv = _argv(world, ref=_adm(world, "a.npz"))  # arr_0 only: its statistics are computed, then cached
    outcome = call(main, argv)
    assert_refused(outcome, "could not write --json", "no space left", "printed to stdout")
    report = json.loads(outcome.stdout)
    assert report["fid_protocol"] == "reference-images" and abs(report["fid"]) < 1e-6  # arr_0 = the samples
    assert "could not cache the reference statistics" in outcome.stderr
    assert not world["out"].exists() or not any(world["out"].rglob("*.json"))


def test_recompute_is_the_way_past_bad_stored_stats(world: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The refusal of malformed stored statistics advises --recompute-ref-stats: that must work."""
    monkeypatch.setattr(scoring, "load_feature_extractor", lambda *a, **k: _PixelFeatures())
    ref = _adm(world, "r.npz", mu=np.ones(7), sigma=np.eye(7))
    assert_refused(call(main, _argv(world, ref=ref)), "--recompute-ref-stats")
    outcome = call(main, _argv(world, ref=ref) + ["--recompute-ref-stats"])
    assert outcome.code == 0, outcome.stderr
    report = json.loads((world["out"] / "scores.json").read_text())
    assert report["fid_protocol"] == "recomputed-from-arr_0" and abs(report["fid"]) < 1e-6  # arr_0 = the samples
    assert report["sfid"] is None and "--recompute-ref-stats" in report["sfid_unavailable_reason"]
