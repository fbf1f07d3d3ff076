"""Export of text-to-image students: a diffusers model folder for the teacher's own pipeline.

Tiny random pipelines saved offline (tests/t2i_builders.py: PixArt-Σ, FLUX.1) and a student
checkpoint in the trainer's layout (half the teacher's heads, ``student.name: from_teacher``, EMA
and raw weights that differ). The export is reloaded with
``Pipeline.from_pretrained(teacher, transformer=Transformer.from_pretrained(export))`` and must give
bitwise the images of ``t2i_sampling.PromptSampler`` with the student loaded from the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from cli_cases import assert_refused, call, refused_without_side_effects, snapshot
from shd_diffusion import t2i_sampling as ts
from shd_diffusion.commands.export import main
from shd_diffusion.export import export
from shd_diffusion.models import DiT
from shd_diffusion.models.diffusers_t2i import student_from_teacher
from shd_diffusion.models.loading import weights_sha256
from shd_diffusion.sampler import image_seeds
from shd_diffusion.t2i_export import CARD_PROMPT
from t2i_builders import build_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = ["a red cat", "a photo of the blue dog"]
# Tiny pipelines: 2 steps, no resolution bins (PixArt), 16 px (FLUX's default size is 1024).
CALL = {"pixart": dict(use_resolution_binning=False, max_sequence_length=8),
        "flux": dict(max_sequence_length=8, height=16, width=16)}
OVERRIDES = {"pixart": {"num_attention_heads": 1}, "flux": {"num_attention_heads": 1}}
DISTILL = {"mode": "kd_shd", "shd_beta": 2.0, "squeeze": "lstsq"}


def _student_checkpoint(pipe_dir: Path, family: str, path: Path, teacher: str | None = None) -> Path:
    """A training checkpoint of a student made from the pipeline's transformer, as the trainer writes it."""
    config = ts.teacher_transformer_config(pipe_dir)
    torch.manual_seed(3)
    student = student_from_teacher(config, **OVERRIDES[family])
    with torch.no_grad():
        for p in student.parameters():
            p.normal_(0.0, 0.2)  # every weight random: diffusers zero-inits output layers
    ema = {k: v.clone() for k, v in student.state_dict().items()}
    checkpoint = {
        "step": 5, "model": {k: v + 0.01 for k, v in ema.items()}, "ema": ema, "optimizer": {}, "scheduler": {},
        "groups": [], "rng": {},
        "config": {"student": {"name": "from_teacher", "teacher_overrides": OVERRIDES[family]},
                   "teacher": {"checkpoint": teacher or str(pipe_dir / "transformer")}, "distill": DISTILL,
                   "train": {"validation_pipeline": None}},
        "identity": {"teacher_sha256": "ab" * 32, "data_fingerprint": None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("t2i_export")
    pipe_dir = build_pipeline(root, "pixart")
    ckpt = _student_checkpoint(pipe_dir, "pixart", root / "run" / "checkpoints" / "step_00000005.pt")
    metrics = root / "scores.json"
    metrics.write_text(json.dumps({"fid": 123.4, "clip_score": 21.5, "clip_score_std": 1.25, "num_images": 8,
                                   "provenance": {"clip_score": {"model": "tiny"}}}))
    return {"root": root, "pipe": pipe_dir, "ckpt": ckpt, "run": root / "run", "metrics": metrics}


def _sampler_images(pipe_dir: Path, ckpt: Path, family: str, indices: list[int]) -> np.ndarray:
    """The sampler's images: the student loaded from the training checkpoint (EMA) into the pipeline."""
    student, _ = ts.load_student(ckpt, ts.teacher_transformer_config(pipe_dir))
    pipe = ts.load_pipeline(pipe_dir, student)
    kwargs = {k: v for k, v in CALL[family].items() if k not in ("height", "width")}
    size = {k: v for k, v in CALL[family].items() if k in ("height", "width")}
    return ts.PromptSampler(pipe, PROMPTS, num_inference_steps=2, pipeline_kwargs=kwargs, **size).sample(indices)[0]


def _pipeline_images(pipe: DiffusionPipeline, family: str, indices: list[int]) -> np.ndarray:
    """The pipeline called directly, as a user would: one generator per image, seeds of image_seeds."""
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(int(s)) for s in image_seeds(indices, 0)]
    out = pipe([PROMPTS[i % len(PROMPTS)] for i in indices], generator=gens, num_inference_steps=2, **CALL[family])
    return np.stack([np.asarray(im) for im in out.images])


def _run_card(card: str, family: str, paths: dict[str, str]) -> list[dict]:
    """Run every python block of the card with local paths substituted and the tiny pipelines' settings."""
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert blocks
    scopes = []
    extra = ", ".join(f"{k}={v!r}" for k, v in {**CALL[family], "num_inference_steps": 2}.items())
    for code in blocks:
        for old, new in paths.items():
            code = code.replace(old, new)
        code = code.replace("generator=", f"{extra}, generator=")
        scopes.append({})
        exec(compile(code, "README.md", "exec"), scopes[-1])  # noqa: S102 - the card's own code
    return scopes


def test_export_drops_into_the_teacher_pipeline_and_reproduces_the_sampler(world, tmp_path):
    out = export(world["run"], tmp_path / "student", metrics=str(world["metrics"]))
    assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.glob("*.bin")) and not (out / "text_encoder").exists()  # the teacher's parts are referenced
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    pipe = PixArtSigmaPipeline.from_pretrained(world["pipe"], transformer=PixArtTransformer2DModel.from_pretrained(out))
    indices = [0, 1, 3]
    images = _pipeline_images(pipe, "pixart", indices)
    assert np.array_equal(images, _sampler_images(world["pipe"], world["ckpt"], "pixart", indices))
    assert images.std() > 5 and not np.array_equal(images[0], images[1])  # random student: not a constant image
    # EMA, not the raw weights
    raw = torch.load(world["ckpt"], weights_only=True)["ema"]
    assert weights_sha256(pipe.transformer.state_dict()) == weights_sha256(raw)

    meta = json.loads((out / "export.json").read_text())
    assert meta["kind"] == "text-to-image" and meta["layout"] == "model" and meta["family"] == "PixArt"
    assert meta["teacher_pipeline"] == str(world["pipe"]) and meta["pipeline_class"] == "PixArtSigmaPipeline"
    assert meta["transformer_class"] == "PixArtTransformer2DModel" and meta["step"] == 5
    assert meta["weights_sha256"] == weights_sha256(raw) and meta["teacher_sha256"] == "ab" * 32
    assert meta["distill"] == DISTILL and meta["teacher_overrides"] == OVERRIDES["pixart"]
    assert meta["source"] == str(world["ckpt"]) and "ema" in meta["weights"]
    assert meta["scores"] == {"fid": 123.4, "clip_score": 21.5, "clip_score_std": 1.25, "num_images": 8}

    card = (out / "README.md").read_text()
    line = (f'pipe = PixArtSigmaPipeline.from_pretrained("{world["pipe"]}", '
            f'transformer=PixArtTransformer2DModel.from_pretrained("{out}"))')
    assert line in card
    scores = card.split("## Scores")[1].split("##")[0]
    assert "| fid | 123.4 |" in scores and "| clip_score | 21.5 |" in scores and "provenance" not in scores
    assert weights_sha256(raw) in card and "training steps: 5" in card and "shd_beta: 2.0" in card
    # The card's code, as written (paths are already local here): image 0 of the sampler with its prompt
    scope = _run_card(card, "pixart", {})[0]
    student, _ = ts.load_student(world["ckpt"], ts.teacher_transformer_config(world["pipe"]))
    sampler = ts.PromptSampler(ts.load_pipeline(world["pipe"], student), [CARD_PROMPT], num_inference_steps=2,
                               pipeline_kwargs=CALL["pixart"])
    assert np.array_equal(np.asarray(scope["image"])[None], sampler.sample([0])[0])
    # ... and the command the card names renders it from the export (a file whose first prompt is the card's)
    from shd_diffusion.commands.sample import main as sample_main

    (tmp_path / "prompts.txt").write_text(CARD_PROMPT + "\n")
    done = call(sample_main, ["--pipeline", str(world["pipe"]), "--checkpoint", str(out), "--prompts",
                              str(tmp_path / "prompts.txt"), "--seed", "0", "--steps", "2", "--out", str(tmp_path / "s"),
                              "--pipeline-arg", "use_resolution_binning=false", "--pipeline-arg", "max_sequence_length=8"])
    assert done.code == 0, done.stderr
    assert f"--checkpoint {out} --prompts FILE --seed 0" in card
    assert np.array_equal(np.load(next((tmp_path / "s").glob("samples_*.npz")))["arr_0"][0], np.asarray(scope["image"]))


def test_full_pipeline_folder_loads_alone_and_reproduces_the_images(world, tmp_path):
    out = export(world["ckpt"], tmp_path / "full", full_pipeline=True, pipeline=str(world["pipe"]))
    index = json.loads((out / "model_index.json").read_text())
    assert index == json.loads((world["pipe"] / "model_index.json").read_text())
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        assert (out / part).is_dir()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (world["pipe"] / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    meta = json.loads((out / "export.json").read_text())
    assert meta["layout"] == "pipeline" and meta["components"]["vae"] == "copied from the teacher"
    pipe = DiffusionPipeline.from_pretrained(out)
    indices = [0, 1]
    assert np.array_equal(_pipeline_images(pipe, "pixart", indices),
                          _sampler_images(world["pipe"], world["ckpt"], "pixart", indices))
    card = (out / "README.md").read_text()
    assert f'transformer=PixArtTransformer2DModel.from_pretrained("{out}", subfolder="transformer"))' in card
    scopes = _run_card(card, "pixart", {})
    assert len(scopes) == 2 and np.array_equal(np.asarray(scopes[0]["image"]), np.asarray(scopes[1]["image"]))


def test_raw_weights_on_request(world, tmp_path):
    out = export(world["ckpt"], tmp_path / "raw", weights="raw")
    raw = torch.load(world["ckpt"], weights_only=True)["model"]
    meta = json.loads((out / "export.json").read_text())
    assert meta["weights_sha256"] == weights_sha256(raw) and "raw" in meta["weights"]


def test_card_names_the_hub_repo_when_pushed(world, tmp_path, monkeypatch):
    """--push-to-hub: the card loads from the repo; the upload gets the finished folder."""
    import shd_diffusion.export as ex

    uploads = []
    monkeypatch.setattr(ex, "_upload", lambda folder, repo, message: uploads.append((folder, repo)))
    outcome = call(main, [str(world["ckpt"]), "--out", str(tmp_path / "e"), "--push-to-hub", "org/tiny-pixart"])
    assert outcome.code == 0, outcome.stderr
    assert uploads == [(tmp_path / "e", "org/tiny-pixart")]
    assert 'PixArtTransformer2DModel.from_pretrained("org/tiny-pixart")' in (tmp_path / "e" / "README.md").read_text()


def test_bad_inputs_are_one_error_line_and_write_nothing(world, tmp_path):
    # a teacher that is not inside a pipeline: name --pipeline
    lone = tmp_path / "lone_teacher"
    lone.mkdir()
    orphan = _student_checkpoint(world["pipe"], "pixart", tmp_path / "orphan.pt", teacher=str(lone))
    refused_without_side_effects(main, [str(orphan), "--out", str(tmp_path / "x")], [tmp_path / "x"], "--pipeline")
    # ... and --pipeline fixes it
    assert call(main, [str(orphan), "--out", str(tmp_path / "y"), "--pipeline", str(world["pipe"])]).code == 0
    # a pipeline folder that does not exist
    refused_without_side_effects(main, [str(orphan), "--out", str(tmp_path / "x"), "--pipeline", str(tmp_path / "nope")],
                                 [tmp_path / "x"], "--pipeline")
    # a class-conditional checkpoint with text-only flags
    dit, arch = tmp_path / "dit.pt", dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                                          num_classes=10)
    state = DiT(**arch).state_dict()
    torch.save({"ema": state, "model": state, "step": 1, "config": {"student": {"name": "DiT-S/2", **arch}}}, dit)
    for flags, named in ((["--pipeline", str(world["pipe"])], "--pipeline"), (["--full-pipeline"], "--full-pipeline")):
        refused_without_side_effects(main, [str(dit), "--out", str(tmp_path / "x"), *flags], [tmp_path / "x"],
                                     named, "text-to-image")
    # a class-conditional flag on a text student
    refused_without_side_effects(main, [str(world["ckpt"]), "--out", str(tmp_path / "x"), "--vae", "v"],
                                 [tmp_path / "x"], "--vae")
    # a transformer folder (already diffusers): export from the training checkpoint
    refused_without_side_effects(main, [str(tmp_path / "y"), "--out", str(tmp_path / "x")], [tmp_path / "x"],
                                 "training checkpoint")
    before = snapshot(tmp_path / "y")
    assert_refused(call(main, [str(world["ckpt"]), "--out", str(tmp_path / "y")]), "not empty")
    assert snapshot(tmp_path / "y") == before


@pytest.mark.usefixtures("fresh_accelerate")
def test_a_student_trained_by_the_trainer_exports_from_its_run_folder(world, tmp_path):
    """The real trainer's checkpoint (2 KD + SHD steps): the teacher pipeline is the one holding
    teacher.checkpoint, the exported weights are the run's EMA, the images are the sampler's."""
    from shd_diffusion.config import load_config
    from shd_diffusion.latents import write_synthetic_text_latents
    from shd_diffusion.train_config import ExperimentConfig
    from shd_diffusion.training import make_accelerator, train
    from t2i_builders import SEQ, TEXT_DIM

    write_synthetic_text_latents(tmp_path / "data", num_images=4, latent_shape=(4, 8, 8), seq_len=SEQ, dim=TEXT_DIM,
                                 pooled_dim=None, shard_size=4)
    cfg = load_config(ExperimentConfig, None, [
        "student.name=from_teacher", "student.teacher_overrides={num_attention_heads: 1}",
        f"teacher.checkpoint={world['pipe'] / 'transformer'}", "distill.mode=kd_shd", "data.kind=text_latents",
        f"data.path={tmp_path / 'data'}", "data.image_size=64", "data.num_workers=0", "train.precision=fp32",
        "train.global_batch_size=4", "train.checkpoint_every=1000", "train.log_with=none", "optim.name=adamw",
        "optim.lr=1e-3", "train.ema_decay=0.5", "train.steps=2", f"train.output_dir={tmp_path / 'runs'}",
        "train.run_name=r"])
    run_dir = tmp_path / "runs" / "r"
    trainer = train(cfg, run_dir, progress=False, accelerator=make_accelerator(cfg, run_dir, log=False))
    with trainer.ema.swapped_in(trainer.student):
        ema_sha = weights_sha256(trainer.student.state_dict())
    out = export(run_dir, tmp_path / "export")
    meta = json.loads((out / "export.json").read_text())
    assert meta["weights_sha256"] == ema_sha and meta["step"] == 2 and meta["teacher_pipeline"] == str(world["pipe"])
    assert meta["distill"]["mode"] == "kd_shd" and meta["teacher_sha256"]
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    pipe = PixArtSigmaPipeline.from_pretrained(world["pipe"], transformer=PixArtTransformer2DModel.from_pretrained(out))
    ckpt = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    assert np.array_equal(_pipeline_images(pipe, "pixart", [0, 1]), _sampler_images(world["pipe"], ckpt, "pixart", [0, 1]))


HUB_SCRIPT = """
import os, shutil, sys
from pathlib import Path
import numpy as np
root, pipe_dir, ckpt = map(Path, sys.argv[1:4])
sys.path.insert(0, sys.argv[4])
import test_t2i_export as t
from shd_diffusion.export import export
repo = root / "cache" / "models--org--tiny-pixart"
shutil.copytree(pipe_dir, repo / "snapshots" / ("a" * 40))
(repo / "refs").mkdir()
(repo / "refs" / "main").write_text("a" * 40)
model = export(ckpt, root / "model", pipeline="org/tiny-pixart")
full = export(ckpt, root / "full", pipeline="org/tiny-pixart", full_pipeline=True)
scopes = t._run_card((model / "README.md").read_text(), "pixart", {}) + t._run_card((full / "README.md").read_text(), "pixart", {})
np.save(root / "images.npy", np.stack([np.asarray(s["image"]) for s in scopes]))
"""


@pytest.mark.slow
def test_a_hub_id_teacher_from_the_cache(world, tmp_path):
    """A teacher given as a Hub id (offline: a cached snapshot): the card's code runs as written, with
    the id in it, and the full pipeline copies the cached components (a fresh process: the cache path
    is read when huggingface_hub is imported)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path), str(world["pipe"]), str(world["ckpt"]),
                           str(Path(__file__).parent)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'PixArtSigmaPipeline.from_pretrained("org/tiny-pixart", transformer=' in (tmp_path / "model" / "README.md").read_text()
    assert json.loads((tmp_path / "full" / "export.json").read_text())["teacher_pipeline"] == "org/tiny-pixart"
    images = np.load(tmp_path / "images.npy")  # model card, full card (2 blocks)
    student, _ = ts.load_student(world["ckpt"], ts.teacher_transformer_config(world["pipe"]))
    sampler = ts.PromptSampler(ts.load_pipeline(world["pipe"], student), [CARD_PROMPT], num_inference_steps=2,
                               pipeline_kwargs=CALL["pixart"])
    expected = sampler.sample([0])[0][0]
    assert len(images) == 3 and all(np.array_equal(im, expected) for im in images)


def test_flux_student_export_reproduces_the_sampler(tmp_path):
    pipe_dir = build_pipeline(tmp_path, "flux")
    ckpt = _student_checkpoint(pipe_dir, "flux", tmp_path / "run" / "checkpoints" / "step_00000005.pt")
    out = export(ckpt, tmp_path / "student")
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(pipe_dir, transformer=FluxTransformer2DModel.from_pretrained(out))
    assert np.array_equal(_pipeline_images(pipe, "flux", [0, 1]), _sampler_images(pipe_dir, ckpt, "flux", [0, 1]))
    card = (out / "README.md").read_text()
    assert "FluxPipeline.from_pretrained(" in card and "FluxTransformer2DModel.from_pretrained(" in card
    _run_card(card, "flux", {})
