"""Export of students to diffusers folders: same model, same samples, clean refusals.

A tiny random VAE saved locally stands in for sd-vae-ft-ema; nothing is downloaded. The
sampler side of each comparison is this package's: ``GaussianDiffusion.p_sample_step`` driven by
``shd_diffusion.sampler.GuidedDenoiser``, fed the noise the diffusers pipeline draws.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline

import diffusers.utils.dynamic_modules_utils as dynamic_modules
from shd_diffusion.sampler import GuidedDenoiser
from shd_diffusion.cli import BadInput
from shd_diffusion.diffusion import create_diffusion
from shd_diffusion.export import export, main
from shd_diffusion.models import DiT, MDTv2
from shd_diffusion.models.dit_transformer_freq_shift import DiTTransformer2DModelFreqShift
from shd_diffusion.pipelines import ClassConditionalPipeline
from cli_cases import assert_refused, call, snapshot

# 1000 classes: DiTPipeline hard-codes 1000 as the null class.
DIT_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=1000)
MDT_ARCH = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=16, depth=4, num_heads=2, num_classes=10, decode_layer=2)
STEPS = 4


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

    # The same folder through ClassConditionalPipeline samples like this package (learned variance,
    # guidance on 3 channels); its step noise comes from `generator`, one row per image.
    pipe = ClassConditionalPipeline.from_pretrained(out, guidance_schedule="constant", null_class=1000, trust_remote_code=True)
    latents = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=STEPS, latents=x_T.clone(),
                   generator=torch.Generator().manual_seed(9), output_type="latent").images
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(STEPS - 1)]
    ours = replay(student, create_diffusion(str(STEPS)), GuidedDenoiser(student, scale, "constant"), x_T, labels, draws)
    assert rel_err(latents, ours) <= 1e-4  # measured 2.0e-7


def test_class_conditional_pipeline_reproduces_the_sampler_with_learned_variance(tmp_path, vae_dir):
    student = randomised(MDTv2(**MDT_ARCH, mask_ratio=0.3), seed=2, std=0.05)
    ckpt = save_training_checkpoint(student, "MDTv2-S/2", MDT_ARCH, tmp_path / "step.pt")
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"fid": 12.5, "fid_protocol": "adm-stored-stats"}))
    out = export(ckpt, tmp_path / "export", vae=str(vae_dir), metrics=str(metrics))
    assert "| fid | 12.5 |" in (out / "README.md").read_text()

    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert isinstance(pipe.transformer, MDTv2)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in pipe.transformer.state_dict().items())
    labels, scale = [3, 7], 3.8
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = pipe(class_labels=labels, guidance_scale=scale, num_inference_steps=STEPS, latents=x_T.clone(),
                   generator=torch.Generator().manual_seed(9), output_type="latent").images
    g = torch.Generator().manual_seed(9)
    draws = [torch.randn(2, 4, 8, 8, generator=g) for _ in range(STEPS - 1)]
    guided = GuidedDenoiser(student, scale, "power-cosine", guidance_channels=3)
    ours = replay(student, create_diffusion(str(STEPS)), guided, x_T, labels, draws)
    # float32 vs float64 schedules, as above (measured 3e-7). The random model's x_0 predictions
    # are large (1 / sqrt(abar) ~ 160 at t = 999), hence latents of a few hundred.
    assert rel_err(latents, ours) <= 1e-4
    constant = replay(student, create_diffusion(str(STEPS)), GuidedDenoiser(student, scale, "constant"), x_T, labels, draws)
    assert rel_err(latents, constant) > 1e-3  # the power-cosine schedule is what is applied (measured 6e-3)


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
