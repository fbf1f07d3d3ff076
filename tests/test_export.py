"""Export of students to diffusers folders: same model, same samples, clean refusals.

A tiny random VAE saved locally stands in for sd-vae-ft-ema; nothing is downloaded. The
sampler side of each comparison is this package's: ``GaussianDiffusion.p_sample_step`` driven by
``shd_diffusion.sampler.GuidedDenoiser``, fed the noise the diffusers pipeline draws.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from diffusers import AutoencoderKL, DiTPipeline
from safetensors import SafetensorError

import diffusers.utils.dynamic_modules_utils as dynamic_modules
from shd_diffusion.sampler import GuidedDenoiser
from shd_diffusion.cli import BadInput
from shd_diffusion.diffusion import create_diffusion
from shd_diffusion.commands.export import main
from shd_diffusion.export import export
from shd_diffusion.models import DiT, MDTv2
from shd_diffusion.models.dit_transformer_freq_shift import DiTTransformer2DModelFreqShift
from shd_diffusion.pipelines import ClassConditionalPipeline
from shd_diffusion.commands.sample import _build_sampler
from shd_diffusion.commands.sample import build_parser as sample_parser
from cli_cases import assert_refused, call, snapshot

# 1000 classes: DiTPipeline hard-codes 1000 as the null class.
DIT_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=1000)
MDT_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=4, num_heads=2, num_classes=10, decode_layer=2)
STEPS = 4
REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER = REPO / "shd_diffusion" / "assets" / "demo_teacher"  # committed, trained: pixel MDTv2, 10 classes


def randomised(model: torch.nn.Module, seed: int, std: float = 0.3) -> torch.nn.Module:
    """Every trainable weight random (the upstream init zeroes the adaLN and output layers)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, std)
    return model.eval()


def save_training_checkpoint(model: torch.nn.Module, name: str, arch: dict, path: Path) -> Path:
    config = {"student": {"name": name, **arch}, "teacher": {"model": {"name": "DiT-B/2"}, "checkpoint": "/ckpt/teacher.pt"}}
    raw = {k: v + 1.0 for k, v in model.state_dict().items()}  # 'model' differs from 'ema'
    torch.save({"ema": model.state_dict(), "model": raw, "step": 1234, "config": config}, path)
    return path


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """trust_remote_code copies custom components here, not into ~/.cache."""
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to max |ref|."""
    return (out - ref).abs().max().item() / ref.abs().max().item()


def replay(model, diffusion, denoise, x, labels, draws) -> torch.Tensor:
    """This package's ancestral steps from x_T with given per-step noise (one (B, C, H, W) per t > 0)."""
    y = torch.as_tensor(labels)
    for n, i in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        noise = draws[n] if i > 0 else None
        x = diffusion.p_sample_step(denoise, x, i, {"y": y}, noise=noise)["sample"]
    return x


def test_dit_export_is_the_student_and_dit_pipeline_samples_like_the_sampler(tmp_path, vae_dir, modules_cache):
    student = randomised(DiT(**DIT_ARCH), seed=1, std=0.1)  # freq_shift=0: the original DiT timestep features
    ckpt = save_training_checkpoint(student, "DiT-S/2", DIT_ARCH, tmp_path / "step.pt")
    out = export(ckpt, tmp_path / "export", vae=str(vae_dir), metrics=None)
    assert json.loads((out / "export.json").read_text())["custom_code"] is True
    card = (out / "README.md").read_text()
    assert "training steps: 1234" in card and "DiT-B/2" in card and "constant scale" in card

    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 998]), torch.tensor([7, 1000])
    transformer = DiTTransformer2DModelFreqShift.from_pretrained(out / "transformer").eval()
    with torch.no_grad():
        # Same math, other kernels: float32 rounding only (observed 0 on x86).
        assert rel_err(transformer(x, timestep=t, class_labels=y).sample, student(x, t, y)) <= 1e-5

    # DiTPipeline: x_T from `generator`, step noise from the global RNG for the whole 2B batch
    # (only the conditional half survives), constant guidance on all 4 eps channels, learned
    # variance dropped (fixed-large DDPM variance).
    pipe = DiTPipeline.from_pretrained(out, trust_remote_code=True)
    labels, scale = [3, 999], 2.5
    torch.manual_seed(11)
    images = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(4, 4, 8, 8, generator=g)[:2] for _ in range(STEPS - 1)]
    guided = GuidedDenoiser(student, scale, "constant", guidance_channels=None)
    z = replay(student, create_diffusion(str(STEPS), learn_sigma=False), lambda a, b, y: guided(a, b, y)[:, :4], x_T, labels, draws)
    with torch.no_grad():
        ours = (pipe.vae.decode(z / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    # diffusers keeps the schedule in float32, this package in float64: ~1e-6 relative per
    # coefficient; 1e-4 of the image scale leaves headroom and is far below a wrong variance or
    # guidance (the next check).
    assert rel_err(images, ours) <= 1e-4  # measured 2.9e-7
    z_learned = replay(student, create_diffusion(str(STEPS)), guided, x_T, labels, draws)
    with torch.no_grad():
        other = (pipe.vae.decode(z_learned / 0.18215).sample / 2 + 0.5).clamp(0, 1)
    assert rel_err(images, other) > 1e-3  # the learned variance would show (measured 3.1e-3)



def test_export_refuses_before_writing(tmp_path, vae_dir):
    student = randomised(DiT(**DIT_ARCH), seed=1)
    ckpt = save_training_checkpoint(student, "DiT-S/2", DIT_ARCH, tmp_path / "step.pt")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    (tmp_path / "junk.pt").write_bytes(random.Random(1).randbytes(512))
    torch.save({"ema": student.state_dict(), "config": {"student": {"name": "DiT-S/2", **DIT_ARCH}}}, tmp_path / "ema_only.pt")
    before = snapshot(tmp_path)
    cases = [
        ([str(ckpt), "--out", str(tmp_path / "busy")], ["is not empty"]),
        ([str(tmp_path / "ema_only.pt"), "--out", str(tmp_path / "new"), "--weights", "raw", "--vae", str(vae_dir)],
         ["--weights raw", "no separate raw"]),
        ([str(ckpt), "--out", str(tmp_path / "new"), "--push-to-hub", "not a repo"], ["--push-to-hub", "org/name"]),
        ([str(tmp_path / "junk.pt"), "--out", str(tmp_path / "new"), "--vae", str(vae_dir)], ["junk.pt", "not a torch checkpoint"]),
        ([str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "new")], ["nothing.pt", "does not exist"]),
    ]
    for argv, needles in cases:
        assert_refused(call(main, argv), *needles)
    assert snapshot(tmp_path) == before  # no export, no leftover temporary folder
    with pytest.raises(BadInput, match="is not empty"):
        export(ckpt, tmp_path / "busy")


# --------------------------------------------------------------------------------------------
# The exported pipeline is the sampler: every family and space
# --------------------------------------------------------------------------------------------

def demo_student_arch() -> dict:
    """The demo student's architecture (configs/demo_student.yaml), without its registry name."""
    student = yaml.safe_load((REPO / "configs" / "demo_student.yaml").read_text())["student"]
    return {k: v for k, v in student.items() if k != "name"}


def export_source(kind: str, tmp_path: Path) -> tuple[Path, bool]:
    """A checkpoint of each exported kind and whether it is a latent model (ships the test VAE)."""
    if kind == "demo-teacher":
        return DEMO_TEACHER, False
    if kind == "demo-student":  # the demo's student shape, random weights (students are trained, not committed)
        arch = demo_student_arch()
        return save_training_checkpoint(randomised(MDTv2(**arch), seed=4, std=0.05), "MDTv2-S/2", arch, tmp_path / "s.pt"), False
    family, space = kind.split("-")
    arch = dict(MDT_ARCH if family == "mdt" else DIT_ARCH, num_classes=10, in_channels=4 if space == "latent" else 3)
    model = MDTv2(**arch) if family == "mdt" else DiT(**arch)
    name = "MDTv2-S/2" if family == "mdt" else "DiT-S/2"
    return save_training_checkpoint(randomised(model, seed=2, std=0.05), name, arch, tmp_path / "s.pt"), space == "latent"


def cli_sampler(checkpoint: Path, steps: int, scale: float, seed: int, vae: Path | None):
    """The sampler ``python -m sampling.sample`` builds for these flags (all others at their defaults)."""
    argv = ["--checkpoint", str(checkpoint), "--out", "unused", "--steps", str(steps), "--cfg-scale", str(scale),
            "--seed", str(seed), *(["--vae", str(vae)] if vae is not None else [])]
    sampler, _ = _build_sampler(sample_parser().parse_args(argv), torch.device("cpu"), False)
    return sampler


def pixels(images) -> np.ndarray:
    """PIL images -> (B, H, W, 3) uint8."""
    return np.stack([np.asarray(img) for img in images])


KINDS = ["demo-teacher", "demo-student", "mdt-latent", "dit-latent", "dit-pixel"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_exported_pipeline_is_the_sampler(kind, tmp_path, vae_dir, modules_cache):
    """Same seed, labels, steps and scale: the pipeline's images are ``sampling.sample``'s.

    MDTv2 runs the same module in both, so the uint8 images are equal (one computation on one
    machine). A DiT export runs diffusers' ``DiTTransformer2DModel`` (same math, other kernels:
    float32 rounding, measured ~1e-7 relative), so there the final samples agree to 1e-4.
    """
    source, latent = export_source(kind, tmp_path)
    vae = vae_dir if latent else None
    out = export(source, tmp_path / "export", vae=None if vae is None else str(vae))
    meta = json.loads((out / "export.json").read_text())
    assert meta["space"] == ("latent" if latent else "pixel") and meta["sampler"]["clip_denoised"] is (not latent)

    steps, scale, seed, n = 8, 3.0, 5, 4
    sampler = cli_sampler(source, steps, scale, seed, vae)
    assert sampler.clip_denoised is (not latent)  # the sampler's --clip-denoised auto
    z_ref, labels = sampler.sample_latents(range(n))
    images_ref = sampler.sample(range(n))[0]
    pipe = ClassConditionalPipeline.from_pretrained(out, trust_remote_code=True)
    run = dict(class_labels=labels.tolist(), guidance_scale=scale, num_inference_steps=steps, seed=seed)
    if kind.startswith("dit"):
        assert rel_err(pipe(**run, output_type="latent").images, z_ref) <= 1e-4
    else:
        assert np.array_equal(pixels(pipe(**run).images), images_ref)
    if not latent:  # without clipping (the old pipeline) the images are not the sampler's
        unclipped = ClassConditionalPipeline.from_pretrained(out, clip_denoised=False, trust_remote_code=True)
        assert not np.array_equal(pixels(unclipped(**run).images), images_ref)


def test_pipeline_generator_outputs_and_refusals(tmp_path):
    out = export(DEMO_TEACHER, tmp_path / "export")
    pipe = ClassConditionalPipeline.from_pretrained(out)
    run = dict(class_labels=[3, 1], num_inference_steps=3)
    a = pipe(**run, generator=torch.Generator().manual_seed(1), output_type="pt").images  # (2, 1, 32, 32) in [0, 1]
    b = pipe(**run, generator=torch.Generator().manual_seed(1), output_type="np").images  # (2, 32, 32, 1)
    assert torch.equal(a.permute(0, 2, 3, 1), torch.from_numpy(b)) and 0 <= a.min() and a.max() <= 1
    c = pipe(**run, generator=torch.Generator().manual_seed(2), output_type="pt").images
    assert not torch.equal(a, c)  # the generator seeds the images
    with pytest.raises(ValueError, match=r"class label 207 is outside this model's classes 0\.\.9"):
        pipe(class_labels=[207], num_inference_steps=2)
    with pytest.raises(ValueError, match="seed or generator"):
        pipe(class_labels=[1], num_inference_steps=2, seed=0, generator=torch.Generator())


def test_mdt_export_keeps_the_weights_and_the_scores(tmp_path, vae_dir):
    student = randomised(MDTv2(**MDT_ARCH, mask_ratio=0.3), seed=2, std=0.05)
    ckpt = save_training_checkpoint(student, "MDTv2-S/2", MDT_ARCH, tmp_path / "step.pt")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": 12.5, "fid_protocol": "adm-stored-stats"}))
    out = export(ckpt, tmp_path / "export", vae=str(vae_dir), metrics=str(metrics))
    assert "| fid | 12.5 |" in (out / "README.md").read_text()
    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, MDTv2)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in pipe.transformer.state_dict().items())


# --------------------------------------------------------------------------------------------
# The model card's code runs as written
# --------------------------------------------------------------------------------------------

CARD_KINDS = ["demo-teacher", "mdt-latent", "dit-latent", "dit-pixel", "dit-latent-1000"]


@pytest.mark.parametrize("kind", CARD_KINDS)
@pytest.mark.slow
def test_model_card_code_runs_as_written(kind, tmp_path, vae_dir, modules_cache):
    if kind == "dit-latent-1000":  # ImageNet's class count, original timestep features: custom code
        source, latent = save_training_checkpoint(randomised(DiT(**DIT_ARCH), 1, 0.05), "DiT-S/2", DIT_ARCH, tmp_path / "s.pt"), True
    else:
        source, latent = export_source(kind, tmp_path)
    out = export(source, tmp_path / "export", vae=str(vae_dir) if latent else None)
    card = (out / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert blocks
    assert ("DiTPipeline.from_pretrained" in card) == (kind.startswith("dit") and latent)  # it needs a VAE
    scopes: list[dict] = []
    for code in blocks:
        scopes.append({})
        exec(compile(code, f"{out}/README.md", "exec"), scopes[-1])  # noqa: S102 - the card's own code
        assert len(scopes[-1]["images"]) == min(4, 1000 if kind.endswith("1000") else 10)
    if kind == "demo-teacher":  # the card's claim: images 0..3 of sampling.sample --seed 0 --steps 250 --cfg-scale 3.8
        assert "sampling.sample --seed 0 --steps 250 --cfg-scale 3.8 --precision fp32`" in card
        images_ref = cli_sampler(source, 250, 3.8, 0, None).sample(range(4))[0]
        assert np.array_equal(pixels(scopes[0]["images"]), images_ref)


# --------------------------------------------------------------------------------------------
# Writing: a full disk, a killed export's leftovers, file modes
# --------------------------------------------------------------------------------------------

def test_export_onto_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError (the real message format, see
    test_fileio's rlimit test); export turns it into run_main's one line and removes its folder."""
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    before = snapshot(tmp_path)
    outcome = call(main, [str(DEMO_TEACHER), "--out", str(tmp_path / "export")])
    assert_refused(outcome, "no space left", str(tmp_path / "export"))
    assert snapshot(tmp_path) == before  # no export, no hidden temporary folder


def test_next_export_removes_a_killed_exports_temporary_folder(tmp_path):
    # What atomic_dir leaves when its process is killed mid-write: its own temporary name.
    left = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".export.", suffix=".tmp"))
    (left / "transformer").mkdir()
    (left / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    other = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".export2.", suffix=".tmp"))  # another target's: kept
    outcome = call(main, [str(DEMO_TEACHER), "--out", str(tmp_path / "export")])
    assert outcome.code == 0, outcome.stderr
    assert not left.exists() and other.exists() and str(left) in outcome.stdout + outcome.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", other.name])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_get_the_mode_of_every_other_output(tmp_path, vae_dir, umask):
    """0o666 / 0o777 less the umask, like fileio.atomic_path (safetensors itself writes 0600)."""
    ckpt, _ = export_source("mdt-latent", tmp_path)
    old = os.umask(umask)
    try:
        out = export(ckpt, tmp_path / "export", vae=str(vae_dir))
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert "transformer/diffusion_pytorch_model.safetensors" in modes and "vae/diffusion_pytorch_model.safetensors" in modes
    for name, mode in modes.items():
        want = (0o777 if (out / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)}"
