"""The text-to-image command lines through ``main(argv)`` on tiny offline pipelines.

``scripts/extract_latents.py --captions / --prompts``, ``python -m sampling.sample --pipeline`` and
``python -m sampling.score --clip``: each command's output equals the library call it wraps
(``t2i_extract``, ``t2i_sampling``, ``evaluation.clip_score``), so the flags reach the library
unchanged. Tiny random PixArt-Sigma / FLUX.1 pipelines from ``t2i_builders``, a tiny CLIP, offline.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_cases import call  # noqa: E402
from t2i_builders import SEQ, SIZE, build_pipeline, caption_folder, tiny_clip  # noqa: E402

from shd_diffusion import t2i_sampling as ts  # noqa: E402
from shd_diffusion.commands import extract_latents, sample, score  # noqa: E402
from shd_diffusion.data import TextLatentDataset  # noqa: E402
from shd_diffusion.evaluation import clip_score as cs  # noqa: E402
from shd_diffusion.t2i_extract import extract_text_latents, generate_text_latents  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread", "fresh_accelerate")

CAPTIONS = ["a photo of a cat", "a red car", "", "the big tree on the house", "a small blue dog"]
PROMPTS = ["a red car", "a photo of a cat", "the big tree"]
PIXART_CALL = ["--pipeline-arg", f"max_sequence_length={SEQ}", "--pipeline-arg", "use_resolution_binning=false"]


def pixart_student(pipeline: Path, folder: Path) -> Path:
    """A 1-head student of the tiny PixArt teacher (head dim 8 -> width 8), random weights, saved."""
    from diffusers import PixArtTransformer2DModel

    from shd_diffusion.models.diffusers_t2i import student_from_teacher

    student = student_from_teacher(PixArtTransformer2DModel.from_pretrained(pipeline / "transformer"),
                                   num_attention_heads=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    student.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("t2i_cli")
    pixart, flux = build_pipeline(root, "pixart"), build_pipeline(root, "flux")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"root": root, "pixart": pixart, "flux": flux, "captions": caption_folder(root / "captions", CAPTIONS),
            "prompts": root / "prompts.txt", "student": pixart_student(pixart, root / "student"),
            "clip": tiny_clip(root / "clip")}


def _same_datasets(a: Path, b: Path) -> None:
    da, db = TextLatentDataset(a, hflip=False), TextLatentDataset(b, hflip=False)
    assert len(da) == len(db)
    for i in range(len(da)):
        (xa, ca), (xb, cb) = da[i], db[i]
        assert torch.equal(xa, xb) and ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)
    assert all(torch.equal(da.empty_conditioning[k], db.empty_conditioning[k]) for k in da.empty_conditioning)


def test_extract_captions_command_writes_what_the_library_writes(world, tmp_path):
    out = tmp_path / "lat"
    argv = ["--captions", str(world["captions"]), "--pipeline", str(world["pixart"]), "--out", str(out),
            "--image-size", str(SIZE), "--batch-size", "2", "--shard-size", "2", "--max-sequence-length", str(SEQ),
            "--device", "cpu", "--dtype", "float32"]
    done = call(extract_latents.main, argv)
    assert done.code == 0, done.stderr
    ds = TextLatentDataset(out, hflip=False)
    assert len(ds) == 5 and ds.latent_shape == (4, SIZE // 2, SIZE // 2)
    assert set(ds.cond_spec) == {"prompt_embeds", "prompt_mask"} and ds[0][1]["prompt_embeds"].shape == (SEQ, 12)
    extract_text_latents(world["captions"], tmp_path / "lib", world["pixart"], image_size=SIZE, batch_size=2,
                         shard_size=2, max_sequence_length=SEQ, dtype="float32", progress=False)
    _same_datasets(out, tmp_path / "lib")
    stamp = (out / "shard_00000.safetensors").stat().st_mtime_ns
    again = call(extract_latents.main, argv)  # a rerun resumes: nothing re-encoded
    assert again.code == 0 and (out / "shard_00000.safetensors").stat().st_mtime_ns == stamp


def test_extract_prompts_command_renders_then_extracts_as_the_library(world, tmp_path):
    images = tmp_path / "rendered"
    argv = ["--prompts", str(world["prompts"]), "--pipeline", str(world["flux"]), "--out", str(tmp_path / "lat"),
            "--images-out", str(images), "--image-size", str(SIZE), "--shard-size", "2", "--steps", "2",
            "--guidance", "3.5", "--seed", "4", "--max-sequence-length", str(SEQ), "--device", "cpu"]
    done = call(extract_latents.main, argv)
    assert done.code == 0, done.stderr
    assert sorted(p.name for p in images.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    generate_text_latents(world["prompts"], tmp_path / "lib", world["flux"], image_size=SIZE, num_inference_steps=2,
                          guidance_scale=3.5, seed=4, max_sequence_length=SEQ, shard_size=2, progress=False)
    for i in range(3):
        a, b = (np.array(Image.open(d / f"{i:06d}.png")) for d in (images, tmp_path / "lib_images"))
        assert np.array_equal(a, b) and a.std() > 1
    _same_datasets(tmp_path / "lat", tmp_path / "lib")


def test_sample_pipeline_command_equals_the_library_call(world, tmp_path):
    out = tmp_path / "samples"
    argv = ["--pipeline", str(world["pixart"]), "--checkpoint", str(world["student"]), "--prompts",
            str(world["prompts"]), "--out", str(out), "--num-samples", "4", "--steps", "2", "--guidance-scale", "4.5",
            "--height", str(SIZE), "--width", str(SIZE), "--seed", "1", "--batch-size", "2", "--shard-size", "2",
            *PIXART_CALL]
    done = call(sample.main, argv)
    assert done.code == 0, done.stderr
    config = ts.teacher_transformer_config(world["pixart"])
    student, _ = ts.load_student(world["student"], config)
    sampler = ts.PromptSampler(ts.load_pipeline(world["pixart"], student), PROMPTS, num_inference_steps=2,
                               guidance_scale=4.5, seed=1, height=SIZE, width=SIZE,
                               pipeline_kwargs={"max_sequence_length": SEQ, "use_resolution_binning": False})
    ts.sample_prompts(sampler, tmp_path / "lib", num_samples=4, shard_size=2, batch_size=2)
    name = f"samples_4x{SIZE}x{SIZE}x3.npz"
    with np.load(out / name) as a, np.load(ts.assemble_prompts(tmp_path / "lib")) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].std() > 1
        assert a["prompts"].tolist() == [PROMPTS[i % 3] for i in range(4)] == b["prompts"].tolist()
        assert a["arr_1"].tolist() == [0, 1, 2, 0]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["teacher"] == str(world["pixart"]) and manifest["guidance_scale"] == 4.5
    # --assemble of a text-to-image folder keeps the prompts; a rerun resumes with nothing to render.
    (out / name).unlink()
    assert call(sample.main, ["--assemble", str(out)]).code == 0
    with np.load(out / name) as a:
        assert a["prompts"].tolist() == [PROMPTS[i % 3] for i in range(4)]
    assert call(sample.main, argv).code == 0


def test_score_command_puts_clip_score_beside_fid(world, tmp_path, monkeypatch):
    from shd_diffusion.evaluation import scoring
    from shd_diffusion.evaluation.inception import WeightsInfo

    class Pixels(torch.nn.Module):  # a stand-in Inception: deterministic features of the pixels
        def forward(self, x):
            f = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # (B, 48)
            return (torch.cat([f, f.square() / 255], 1),)  # (B, 96)

    info = WeightsInfo("stand-in", "0" * 64, False, "stand-in has no logits")
    monkeypatch.setattr(scoring, "_feature_extractor", lambda w, d: (Pixels(), info, [scoring.POOL]))
    rng = np.random.default_rng(0)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(4),
             prompts=np.array(["a cat", "a dog", "red car", "blue sky"]))
    ref = tmp_path / "ref"
    ref.mkdir()
    for i, img in enumerate(rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(img).save(ref / f"{i}.png")
    fid_args = ["--ref", str(ref), "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--kid-subsets", "2",
                "--kid-subset-size", "2", "--pr-k", "1", "--is-splits", "1", "--no-progress"]
    done = call(score.main, [str(samples), *fid_args, "--clip", str(world["clip"]), "--clip-batch-size", "3",
                             "--json", str(tmp_path / "both.json")])
    assert done.code == 0, done.stderr
    assert "CLIP score" in done.stdout and "FID" in done.stdout
    both = json.loads((tmp_path / "both.json").read_text())
    assert call(score.main, [str(samples), *fid_args, "--json", str(tmp_path / "fid.json")]).code == 0
    fid = json.loads((tmp_path / "fid.json").read_text())
    clip = cs.clip_score(samples, str(world["clip"]), batch_size=3, device="cpu", progress=False)
    assert math.isfinite(both["fid"]) and both["fid"] == fid["fid"] and both["kid_mean"] == fid["kid_mean"]
    assert both["clip_score"] == clip["clip_score"] and both["clip"] == clip["clip"]
    assert both["provenance"] == {**fid["provenance"], **clip["provenance"]} and "clip_score" in both["provenance"]
    assert both["settings"]["clip_batch_size"] == 3
    # --clip without --ref: CLIP score alone, the library's report; prompts given by file override the file's.
    (tmp_path / "p.txt").write_text("a cat\na dog\nred car\nblue sky\n")
    alone = call(score.main, [str(samples), "--clip", str(world["clip"]), "--clip-batch-size", "3", "--clip-prompts",
                              str(tmp_path / "p.txt"), "--device", "cpu", "--no-progress", "--json", str(tmp_path / "c.json")])
    assert alone.code == 0, alone.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["clip_score"] == clip["clip_score"] and "fid" not in report
