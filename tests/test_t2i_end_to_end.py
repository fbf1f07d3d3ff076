"""Text-to-image end to end, through the commands' ``main(argv)``, on tiny random models (issue #20).

Per family (PixArt-Sigma, FLUX.1) a tiny random teacher pipeline (``t2i_builders``) is saved in an
offline Hugging Face cache as ``org/tiny-<family>`` (``models--org--…/snapshots/<hash>``,
``refs/main``, HF_HUB_OFFLINE=1) and then, using only that Hub id:

captions -> ``extract_latents`` shards -> ``train`` (KD + SHD, a 1-head student of the 2-head
teacher, ``teacher.checkpoint: org/tiny-<family>:transformer``) -> ``sample --pipeline`` (npz with
prompts) -> ``score`` (FID against the caption images at the sample size + CLIP score with a tiny
CLIP; a stand-in Inception, no download) -> ``export --metrics`` -> the export reloaded with
``Pipeline.from_pretrained("org/tiny-<family>", transformer=Transformer.from_pretrained(export))``
renders the sampler's images bitwise, and its card carries the score file's numbers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cli_cases import call  # noqa: E402
from hub_cache import offline_hub_cache  # noqa: E402
from t2i_builders import SEQ, SIZE, build_pipeline, caption_folder, tiny_clip  # noqa: E402

from shd_diffusion.commands import export, extract_latents, sample, score, train  # noqa: E402
from shd_diffusion.data import TextLatentDataset  # noqa: E402
from shd_diffusion.models.loading import weights_sha256  # noqa: E402
from shd_diffusion.sampler import image_seeds  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread", "fresh_accelerate")]

REV = "e2e0" * 10  # the snapshot's commit hash
CAPTIONS = ["a photo of a cat", "a red car", "the big tree on the house", "a small blue dog"]
PROMPTS = ["a red cat", "a photo of the blue dog"]
NUM_SAMPLES, STEPS, TRAIN_STEPS = 4, 2, 3
CLASSES = {"pixart": ("PixArtSigmaPipeline", "PixArtTransformer2DModel"),
           "flux": ("FluxPipeline", "FluxTransformer2DModel")}
# The tiny pipelines' call: 8 caption tokens, no resolution bins (PixArt).
PIPELINE_ARGS = {"pixart": {"max_sequence_length": SEQ, "use_resolution_binning": False},
                 "flux": {"max_sequence_length": SEQ}}
CONDITIONING = {"pixart": {"prompt_embeds", "prompt_mask"}, "flux": {"prompt_embeds", "pooled_prompt_embeds"}}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache in tmp; returns a function that caches a pipeline folder as ``repo_id``."""
    add = offline_hub_cache(tmp_path, monkeypatch)
    return lambda repo_id, folder: add(repo_id, folder, REV)


def _stand_in_inception(monkeypatch) -> None:
    """FID's features without Inception weights (no download): pooled pixels and their squares."""
    from shd_diffusion.evaluation import scoring
    from shd_diffusion.evaluation.inception import WeightsInfo

    class Pixels(torch.nn.Module):
        def forward(self, x):
            f = torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # (B, 48)
            return (torch.cat([f, f.square() / 255], 1),)  # (B, 96)

    info = WeightsInfo("stand-in", "0" * 64, False, "stand-in has no logits")
    monkeypatch.setattr(scoring, "_feature_extractor", lambda w, d: (Pixels(), info, [scoring.POOL]))


def _reference(captions: Path, out: Path) -> np.ndarray:
    """The caption images resized to the sample size, as an ADM-style reference batch (arr_0)."""
    files = [json.loads(line)["file_name"] for line in (captions / "metadata.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(captions / f).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC))
                       for f in files])
    np.savez(out, arr_0=images)
    return images


def _tb_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar in the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(set(values))


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_captions_to_an_exported_student_that_reproduces_the_sampler(family, tmp_path, hub, monkeypatch):
    import diffusers

    repo_id = f"org/tiny-{family}"
    hub(repo_id, build_pipeline(tmp_path / "build", family))
    shutil.rmtree(tmp_path / "build")  # from here on the teacher exists only as the cached Hub id
    captions = caption_folder(tmp_path / "captions", CAPTIONS)
    pipe_args = [a for k, v in PIPELINE_ARGS[family].items() for a in ("--pipeline-arg", f"{k}={json.dumps(v)}")]

    # 1. captions -> shards, encoded by the cached pipeline's own text encoders and VAE
    shards = tmp_path / "latents"
    done = call(extract_latents.main, [
        "--captions", str(captions), "--pipeline", repo_id, "--out", str(shards), "--image-size", str(SIZE),
        "--batch-size", "2", "--shard-size", "2", "--max-sequence-length", str(SEQ), "--device", "cpu",
        "--dtype", "float32"])
    assert done.code == 0, done.stderr
    ds = TextLatentDataset(shards, hflip=False)
    assert len(ds) == len(CAPTIONS) and ds.latent_shape == (4, SIZE // 2, SIZE // 2)
    assert set(ds.cond_spec) == CONDITIONING[family]
    assert len(list(shards.glob("shard_*.safetensors"))) == 2  # 4 images, 2 per shard
    x0, cond = ds[0]
    assert torch.isfinite(x0).all() and x0.std() > 0 and cond["prompt_embeds"].shape[0] == SEQ

    # 2. a few KD + SHD steps: a 1-head student of the 2-head teacher named by its Hub id
    config = tmp_path / "student.yaml"
    config.write_text(f"""\
teacher:
  checkpoint: {repo_id}:transformer
student:
  name: from_teacher
  teacher_overrides: {{num_attention_heads: 1}}
distill:
  mode: kd_shd
data:
  kind: text_latents
  path: {shards}
  image_size: {SIZE}
  num_workers: 0
optim:
  name: adamw
  lr: 1.0e-3
train:
  steps: {TRAIN_STEPS}
  global_batch_size: 2
  precision: fp32
  ema_decay: 0.5
  log_every: 1
  checkpoint_every: 1000
  log_with: tensorboard
  output_dir: {tmp_path / 'runs'}
  run_name: e2e
""")
    done = call(train.main, ["--config", str(config), "--no-progress"])
    assert done.code == 0, done.stderr
    run_dir = tmp_path / "runs" / "e2e"
    ckpts = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ckpts][-1] == f"step_{TRAIN_STEPS:08d}.pt"
    ckpt = torch.load(ckpts[-1], weights_only=False, map_location="cpu")
    assert ckpt["step"] == TRAIN_STEPS and ckpt["config"]["teacher"]["checkpoint"] == f"{repo_id}:transformer"
    teacher = getattr(diffusers, CLASSES[family][1]).from_pretrained(repo_id, subfolder="transformer")
    assert teacher.config.num_attention_heads == 2  # the student has 1
    assert ckpt["identity"]["teacher_sha256"] == weights_sha256(teacher.state_dict())  # the cached teacher
    shd = _tb_scalars(run_dir, "loss/shd")
    assert [s for s, _ in shd] == list(range(1, TRAIN_STEPS + 1)), shd  # logged every step
    assert all(math.isfinite(v) and v > 0 for _, v in shd), shd
    assert all(math.isfinite(v) for _, v in _tb_scalars(run_dir, "loss/kd"))

    # 3. prompts -> images through the cached pipeline with the run's (EMA) student swapped in
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    samples_dir = tmp_path / "samples"
    done = call(sample.main, [
        "--pipeline", repo_id, "--checkpoint", str(run_dir), "--prompts", str(prompts), "--out", str(samples_dir),
        "--num-samples", str(NUM_SAMPLES), "--steps", str(STEPS), "--height", str(SIZE), "--width", str(SIZE),
        "--seed", "0", "--batch-size", "2", "--shard-size", "2", *pipe_args])
    assert done.code == 0, done.stderr
    samples = samples_dir / f"samples_{NUM_SAMPLES}x{SIZE}x{SIZE}x3.npz"
    with np.load(samples) as f:
        images, labels, sample_prompts = f["arr_0"], f["arr_1"], f["prompts"].tolist()
    assert images.shape == (NUM_SAMPLES, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert sample_prompts == [PROMPTS[i % len(PROMPTS)] for i in range(NUM_SAMPLES)]
    assert labels.tolist() == [i % len(PROMPTS) for i in range(NUM_SAMPLES)]  # arr_1: prompt indices
    assert images.std() > 1 and not np.array_equal(images[0], images[2])  # same prompt, other seed

    # 4. FID against the caption images at the sample size + CLIP score of the samples' prompts
    _stand_in_inception(monkeypatch)
    ref = _reference(captions, tmp_path / "ref.npz")
    assert ref.shape == (len(CAPTIONS), SIZE, SIZE, 3)
    scores = tmp_path / "scores.json"
    done = call(score.main, [
        str(samples), "--ref", str(tmp_path / "ref.npz"), "--clip", str(tiny_clip(tmp_path / "clip")),
        "--clip-batch-size", "3", "--device", "cpu", "--cache-dir", str(tmp_path / "stats"), "--kid-subsets", "2",
        "--kid-subset-size", "2", "--pr-k", "1", "--is-splits", "1", "--no-progress", "--json", str(scores)])
    assert done.code == 0, done.stderr
    report = json.loads(scores.read_text())
    assert math.isfinite(report["fid"]) and report["fid"] > 0 and math.isfinite(report["clip_score"])
    assert "clip_score" in report["provenance"]

    # 5. export the run's EMA student with its scores
    out = tmp_path / "export"
    done = call(export.main, [str(run_dir), "--out", str(out), "--metrics", str(scores)])
    assert done.code == 0, done.stderr
    meta = json.loads((out / "export.json").read_text())
    pipeline_class, transformer_class = CLASSES[family]
    assert meta["teacher_pipeline"] == repo_id and meta["step"] == TRAIN_STEPS
    assert meta["pipeline_class"] == pipeline_class and meta["transformer_class"] == transformer_class
    assert meta["weights_sha256"] == weights_sha256(ckpt["ema"]) and meta["distill"]["mode"] == "kd_shd"
    assert weights_sha256(ckpt["model"]) != meta["weights_sha256"]  # the EMA, not the raw weights
    for key in ("fid", "clip_score"):
        assert meta["scores"][key] == report[key]
    card = (out / "README.md").read_text()
    assert f'{pipeline_class}.from_pretrained("{repo_id}", transformer={transformer_class}.from_pretrained(' in card
    table = card.split("## Scores")[1].split("##")[0]
    assert f"| fid | {report['fid']} |" in table and f"| clip_score | {report['clip_score']} |" in table

    # 6. the user's line: the export dropped into the cached teacher pipeline renders the sampler's images
    student = getattr(diffusers, transformer_class).from_pretrained(out)
    assert student.config.num_attention_heads == 1 and weights_sha256(student.state_dict()) == meta["weights_sha256"]
    assert not (out / "vae").exists() and not (out / "text_encoder").exists()  # the teacher's parts stay the teacher's
    pipe = getattr(diffusers, pipeline_class).from_pretrained(repo_id, transformer=student)
    assert pipe.transformer is student and pipe.transformer.config.num_attention_heads == 1
    pipe.set_progress_bar_config(disable=True)
    rendered = []
    for batch in np.split(np.arange(NUM_SAMPLES), NUM_SAMPLES // 2):  # image indices, the sampler's batches of 2
        gens = [torch.Generator().manual_seed(int(s)) for s in image_seeds(batch.tolist(), 0)]
        out_images = pipe([sample_prompts[i] for i in batch], generator=gens, num_inference_steps=STEPS, height=SIZE,
                          width=SIZE, **PIPELINE_ARGS[family]).images
        rendered += [np.asarray(im) for im in out_images]
    rendered = np.stack(rendered)
    assert rendered.shape == images.shape and np.array_equal(rendered, images)
