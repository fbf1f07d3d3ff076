"""Captions (or prompts) -> text-latent shards through the teacher pipeline (issue #20 item 1).

Tiny random PixArt-Sigma and FLUX.1 pipelines are built offline (tokenizers from a vocabulary
written here) and saved in the diffusers layout; the extraction must store exactly what the
pipeline's own ``encode_prompt`` and VAE give, resume without rewriting, and refuse bad input.
"""

from __future__ import annotations

import functools

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

from diffusers import AutoencoderKL  # noqa: E402
from t2i_builders import SEQ, SIZE, TEXT_DIM, build_pipeline, caption_folder  # noqa: E402

from shd_diffusion.cli import BadInput  # noqa: E402
from shd_diffusion.data import TextLatentDataset  # noqa: E402
from shd_diffusion.data.items import DatasetError  # noqa: E402
from shd_diffusion.latents import shard_name  # noqa: E402
from shd_diffusion.t2i_extract import (encode_prompts, extract_text_latents, generate_text_latents,  # noqa: E402
                                       load_image, load_teacher_pipeline, read_caption_folder)

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a photo of a cat", "a red car", "the big tree on the house", "", "a small blue dog"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {family: build_pipeline(root, family) for family in ("pixart", "flux")}


_caption_folder = functools.partial(caption_folder, captions=CAPTIONS)  # t2i_builders' folder, these captions


def _reference_latents(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """What the pipeline inverts before decoding: (mean - shift) * scale, written out independently."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_caption_folder_round_trip_stores_what_the_pipeline_computes(tmp_path, pipelines, family):
    data = _caption_folder(tmp_path / "data")
    report = extract_text_latents(data, tmp_path / "out", pipelines[family], image_size=SIZE, batch_size=2,
                                  shard_size=2, max_sequence_length=SEQ, progress=False)
    assert report.written == [0, 1, 2] and report.index["num_images"] == 5
    ds = TextLatentDataset(tmp_path / "out", hflip=False)
    assert len(ds) == 5 and ds.latent_shape == (4, SIZE // 2, SIZE // 2)
    keys = {"pixart": {"prompt_embeds", "prompt_mask"}, "flux": {"prompt_embeds", "pooled_prompt_embeds"}}[family]
    assert set(ds.cond_spec) == keys

    pipe = load_teacher_pipeline(pipelines[family])
    assert pipe.transformer is None  # encoding never loads the transformer

    @torch.no_grad()  # as the pipeline's __call__ runs it (grad mode can pick another attention kernel)
    def reference(prompt: str) -> dict[str, torch.Tensor]:
        if family == "pixart":
            embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=SEQ)
            return {"prompt_embeds": embeds[0], "prompt_mask": mask[0].bool()}
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=SEQ)
        return {"prompt_embeds": embeds[0], "pooled_prompt_embeds": pooled[0]}

    images = torch.stack([load_image(data / f"{i:03d}.png", SIZE) for i in range(5)])  # (5, 3, 16, 16)
    want_latents = torch.cat([_reference_latents(pipe.vae, images[s:s + 2]) for s in (0, 2, 4)]).half()
    for i, caption in enumerate(CAPTIONS):
        x, cond = ds[i]
        assert torch.equal(x, want_latents[i].float())
        ref = reference(caption)
        assert cond.keys() == ref.keys() and all(torch.equal(cond[k], ref[k]) for k in ref), caption
    assert not torch.equal(ds[0][1]["prompt_embeds"], ds[1][1]["prompt_embeds"])  # captions matter
    empty = reference("")
    assert all(torch.equal(ds.empty_conditioning[k], empty[k]) for k in empty)
    if family == "flux":  # the shift factor is applied: the stored latents are not the plain scaled mean
        with torch.no_grad():
            plain = pipe.vae.encode(images[:1]).latent_dist.mean * 0.5
        assert not torch.allclose(ds[0][0], plain[0].half().float())
    assert encode_prompts(pipe, ["a red car"], SEQ)["prompt_embeds"].shape == (1, SEQ, TEXT_DIM)


def test_resume_skips_finished_shards_and_refuses_a_changed_source_or_pipeline(tmp_path, pipelines):
    data = _caption_folder(tmp_path / "data")
    out = tmp_path / "out"
    kwargs = dict(image_size=SIZE, batch_size=2, shard_size=2, max_sequence_length=SEQ, progress=False)
    first = extract_text_latents(data, out, pipelines["pixart"], max_shards=1, **kwargs)
    assert first.written == [0] and first.pending == [1, 2] and first.index is None
    assert not (out / "index.json").exists()
    stamp = (out / shard_name(0)).stat().st_mtime_ns
    second = extract_text_latents(data, out, pipelines["pixart"], **kwargs)
    assert second.skipped == [0] and second.written == [1, 2] and second.index is not None
    assert (out / shard_name(0)).stat().st_mtime_ns == stamp  # not rewritten
    third = extract_text_latents(data, out, pipelines["pixart"], **kwargs)
    assert third.written == [] and third.skipped == [0, 1, 2]

    two_ranks = [extract_text_latents(data, tmp_path / "ranks", pipelines["pixart"], rank=r, world_size=2, **kwargs)
                 for r in (0, 1)]
    assert [r.written for r in two_ranks] == [[0, 2], [1]]
    from shd_diffusion.latents import finish_text_latents
    finish_text_latents(tmp_path / "ranks")
    a, b = TextLatentDataset(out, hflip=False), TextLatentDataset(tmp_path / "ranks", hflip=False)
    assert a.fingerprint() == b.fingerprint()  # the same data, whatever the process count

    edited = _caption_folder(tmp_path / "data2", captions=[*CAPTIONS[:4], "a small red dog"])
    with pytest.raises(DatasetError, match="source_sha256"):
        extract_text_latents(edited, out, pipelines["pixart"], **kwargs)
    with pytest.raises(DatasetError, match="different extraction"):
        extract_text_latents(data, out, pipelines["flux"], **kwargs)


def _bad(root: Path, case: str) -> Path:
    if case == "empty folder":
        root.mkdir()
    elif case == "no metadata":
        _caption_folder(root)
        (root / "metadata.jsonl").unlink()
    elif case == "no text":
        _caption_folder(root, extra_lines=[json.dumps({"file_name": "000.png"})])
    elif case == "not json":
        _caption_folder(root, extra_lines=["{file_name: 1.png"])
    elif case == "missing image":
        _caption_folder(root, extra_lines=[json.dumps({"file_name": "gone.png", "text": "a cat"})])
    elif case == "uncaptioned images":
        _caption_folder(root)
        for i in range(7):
            Image.new("RGB", (8, 8)).save(root / f"extra_{i}.png")
    elif case == "no lines":
        root.mkdir()
        (root / "metadata.jsonl").write_text("\n")
    return root


@pytest.mark.parametrize("case, message", [
    ("empty folder", "no images and no metadata.jsonl"),
    ("no metadata", r"5 images but no metadata.jsonl: write .*metadata.jsonl with one line per image"),
    ("no text", r"metadata.jsonl line 6 \(000.png\) has no caption: add a \"text\""),
    ("not json", r"metadata.jsonl line 6 is not JSON"),
    ("missing image", r"line 6 lists gone.png, which is not in .*: add the image or remove the line"),
    ("uncaptioned images", r"7 images in .* have no line in metadata.jsonl \(extra_0.png, extra_1.png, extra_2.png, "
                           r"extra_3.png, extra_4.png \.\.\.\): add a caption line"),
    ("no lines", "lists no images"),
])
def test_bad_caption_folders_fail_naming_the_file_and_the_fix(tmp_path, case, message):
    data = _bad(tmp_path / "data", case)
    with pytest.raises(DatasetError, match=message):
        read_caption_folder(data)
    with pytest.raises(DatasetError, match=message):  # refused before any pipeline is loaded or file written
        extract_text_latents(data, tmp_path / "out", tmp_path / "no_pipeline", progress=False)
    assert not (tmp_path / "out").exists()


def test_caption_column_is_accepted_and_bad_pipelines_or_sizes_are_refused(tmp_path, pipelines):
    data = tmp_path / "data"
    _caption_folder(data, captions=["a cat"])
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "caption": "a cat"}) + "\n")
    assert read_caption_folder(data)[0].text == "a cat"
    odd = tmp_path / "dit_pipeline"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    with pytest.raises(BadInput, match="DiTTransformer2DModel, which has no text-to-image family"):
        extract_text_latents(data, tmp_path / "out", odd, progress=False)
    with pytest.raises(BadInput, match="could not read the pipeline"):
        extract_text_latents(data, tmp_path / "out", tmp_path / "nowhere", progress=False)
    with pytest.raises(BadInput, match="image_size 18 is not a multiple of 4"):  # FLUX packs 2 x 2 latents
        extract_text_latents(data, tmp_path / "out", pipelines["flux"], image_size=18, progress=False)
    assert not (tmp_path / "out").exists()
    (tmp_path / "prompts.txt").write_text("\n  \n")
    with pytest.raises(DatasetError, match="holds no prompts"):
        generate_text_latents(tmp_path / "prompts.txt", tmp_path / "gen", pipelines["flux"], progress=False)


def test_prompts_only_mode_renders_one_image_per_prompt_with_per_prompt_seeds(tmp_path, pipelines):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\na photo of a cat\nthe big tree\n")
    pipe = load_teacher_pipeline(pipelines["flux"], transformer=True)
    kwargs = dict(image_size=SIZE, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=SEQ, shard_size=2,
                  dtype="float32", progress=False)
    a = generate_text_latents(prompts, tmp_path / "a", pipe, seed=0, **kwargs)
    assert a.index["num_images"] == 3 and len(list((tmp_path / "a_images").glob("*.png"))) == 3
    assert [r.text for r in read_caption_folder(tmp_path / "a_images")] == ["a red car", "a photo of a cat", "the big tree"]
    generate_text_latents(["a red car", "a photo of a cat"], tmp_path / "b", pipe, seed=0, **kwargs)  # fewer prompts
    generate_text_latents(prompts, tmp_path / "c", pipe, seed=1, **kwargs)
    da, db, dc = (TextLatentDataset(tmp_path / n, hflip=False) for n in "abc")
    for i in range(2):  # same prompt, index and seed -> the same image and latents
        pixels = [np.array(Image.open(tmp_path / f"{n}_images" / f"{i:06d}.png")) for n in "ab"]
        assert np.array_equal(*pixels) and torch.equal(da[i][0], db[i][0])
    assert not torch.equal(da[0][0], dc[0][0])  # another seed -> another image
    assert torch.equal(da[1][1]["prompt_embeds"], encode_prompts(pipe, ["a photo of a cat"], SEQ)["prompt_embeds"][0])
    stamp = (tmp_path / "a_images" / "000000.png").stat().st_mtime_ns
    again = generate_text_latents(prompts, tmp_path / "a", pipe, seed=0, **kwargs)
    assert again.written == [] and (tmp_path / "a_images" / "000000.png").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="other settings"):
        generate_text_latents(prompts, tmp_path / "a", pipe, seed=5, **kwargs)


def test_the_extracted_folder_trains_a_flux_student_one_step(tmp_path, pipelines, fresh_accelerate):
    from shd_diffusion.config import load_config
    from shd_diffusion.train_config import ExperimentConfig
    from shd_diffusion.training import Trainer, make_accelerator

    data = _caption_folder(tmp_path / "data", captions=CAPTIONS[:4])
    extract_text_latents(data, tmp_path / "out", pipelines["flux"], image_size=SIZE, shard_size=4,
                         max_sequence_length=SEQ, progress=False)
    cfg = load_config(ExperimentConfig, None, [
        "student.name=from_teacher", "student.teacher_overrides={num_attention_heads: 1}",
        f"teacher.checkpoint={pipelines['flux'] / 'transformer'}", "distill.mode=kd_shd",
        "data.kind=text_latents", f"data.path={tmp_path / 'out'}", f"data.image_size={SIZE}", "data.num_workers=0",
        "train.precision=fp32", "train.global_batch_size=4", "train.log_every=1", "train.checkpoint_every=1000",
        "train.log_with=none", "optim.name=adamw", "optim.lr=1e-3", f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=t"])
    run_dir = tmp_path / "runs" / "t"
    trainer = Trainer(cfg, run_dir, make_accelerator(cfg, run_dir, log=False))
    x0, cond = next(trainer._batches())
    assert x0.shape == (4, 4, SIZE // 2, SIZE // 2) and cond["prompt_embeds"].shape == (4, SEQ, TEXT_DIM)
    out = trainer.train_step(trainer._batches())
    assert {"diffusion", "kd", "shd"} <= set(out.terms)
    assert all(torch.isfinite(v) for v in out.terms.values()) and float(out.terms["shd"]) > 0
