"""Sampling throughput: this package's fused path vs an upstream-style loop, on the same device.

Variants (each samples the same image indices from the same per-image noise):

* ``upstream``   -- what the official DiT/MDT sample scripts run: float32 (TF32 matmuls on CUDA,
  as DiT's ``sample_ddp.py`` enables), attention as explicit ``softmax(q k^T) v``.
* ``fused_fp32`` -- the same precision with the fused SDPA kernel: isolates the attention kernel.
* ``ours``       -- ``sampling.sample``'s default path: bf16 autocast on CUDA (``--precision``),
  SDPA, optionally ``torch.compile`` (``--compile``, ``--compile-mode reduce-overhead`` = CUDA graphs).

For each variant: images/s over ``--num-batches`` full sampling batches (``--steps`` DDPM steps,
CFG pairs counted as one image; VAE decoding excluded, it is the same for every variant), the
implied minutes for 50,000 images, peak CUDA memory, and the difference from the ``upstream``
variant both of one guided model call (x_T at t = 500) and of the final samples (latents) after
all steps, which compound per-call rounding. Prints JSON (and writes ``--out``).

``--with-vae [SPEC]`` (a local diffusers ``AutoencoderKL`` folder or a hub id; default
``stabilityai/sd-vae-ft-ema``) also times the decode of the sampled latents to uint8 images
(``Sampler.decode`` in float32, ``--vae-batch-size`` latents per call, as ``sampling.sample``
does) and adds ``vae_decode`` plus each variant's ``minutes_for_50k_with_vae``. Needs a latent
model whose channels match the VAE (4 for the SD VAE).

Without ``--checkpoint`` the model is randomly initialised and every parameter is perturbed
(``--init-noise``): the zero-initialised adaLN/final layers would otherwise output eps = 0 and make
all variants agree trivially. Use a real checkpoint for differences that mean something.

    python benchmarks/bench_sampling.py --model DiT-S/2 --batch-size 256 --steps 250 --num-batches 2
    python benchmarks/bench_sampling.py --model DiT-S/2 --compile --compile-mode reduce-overhead --with-vae
    python benchmarks/bench_sampling.py --model DiT-S/2 --model-arg input_size=8 --model-arg hidden_size=64 \\
        --model-arg depth=2 --model-arg num_heads=2 --batch-size 4 --steps 5 --device cpu   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from shd_diffusion.commands.sample import parse_model_arg  # noqa: E402
from shd_diffusion.attention import attention_layers, attention_probs, output_projection, project_qkv  # noqa: E402
from shd_diffusion.diffusion import create_diffusion  # noqa: E402
from shd_diffusion.models.registry import MODEL_NAMES, create_model  # noqa: E402
from shd_diffusion.models.sources import load_model  # noqa: E402
from shd_diffusion.sampler import (  # noqa: E402
    COMPILE_MODES,
    GuidedDenoiser,
    Sampler,
    resolve_guidance_channels,
    resolve_guidance_schedule,
    to_uint8_images,
)
from shd_diffusion.vae import DEFAULT_VAE, load_vae  # noqa: E402

VARIANTS = ("upstream", "fused_fp32", "ours")


class ExplicitAttentionProcessor:
    """Upstream-style attention: materialise ``softmax(q k^T * scale + bias)`` (float32), then @ v.

    Unlike :class:`shd_diffusion.attention.CaptureProcessor` it stores nothing, so it can run a
    whole 250-step sampling loop without accumulating maps.
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        q, k, v = project_qkv(attn, hidden_states, encoder_hidden_states)  # each (B, H, N, d)
        probs = attention_probs(q, k, float(attn.scale), attention_mask)  # (B, H, N, N)
        out = probs.to(v.dtype) @ v  # (B, H, N, d)
        b, h, n, d = out.shape
        out = out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, D)
        return output_projection(attn)(out)


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Swap every attention layer to :class:`ExplicitAttentionProcessor`; restore on exit."""
    layers = attention_layers(model)
    originals = [m.processor for m in layers]
    try:
        for m in layers:
            m.set_processor(ExplicitAttentionProcessor())
        yield
    finally:
        for m, p in zip(layers, originals):
            m.set_processor(p)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Temporarily set TF32 for CUDA matmuls and cuDNN."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(args: argparse.Namespace) -> nn.Module:
    """The benchmarked model: a checkpoint, or a perturbed random init (see the module doc)."""
    overrides = dict(args.model_arg)
    if args.checkpoint:
        return load_model(args.checkpoint, args.model, overrides=overrides)
    model = create_model(args.model, **overrides)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(args.init_noise * torch.randn(p.shape, generator=gen))
    return model.eval().requires_grad_(False)


def run_variant(
    model: nn.Module, name: str, args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Time one variant; return its metrics, one guided model output and the first batch's samples.

    Returns:
        metrics dict; (B, C_out, H, W) guided output for x_T of batch 0 at t = 500 (one model
        call: the per-call error, before 250 steps amplify it); (B, C, H, W) float32 samples of
        batch 0. Both on the CPU.
    """
    cfg = model.config
    bf16 = name == "ours" and (args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda"))
    denoiser = GuidedDenoiser(
        model,
        args.cfg_scale,
        resolve_guidance_schedule("auto", model),
        4.0,
        resolve_guidance_channels(3, cfg.in_channels),
        autocast_dtype=torch.bfloat16 if bf16 else None,
        compile=args.compile and name == "ours",
        compile_mode=args.compile_mode,
    )

    def sampler(steps: int) -> Sampler:
        return Sampler(denoiser, create_diffusion(str(steps), learn_sigma=cfg.learn_sigma),
                       (cfg.in_channels, cfg.input_size, cfg.input_size), cfg.num_classes, device, seed=args.seed)

    ctx = explicit_attention(model) if name == "upstream" else contextlib.nullcontext()
    # Upstream sample scripts enable TF32; the fp32 variants share it so only the kernel differs.
    with ctx, tf32(name != "ours" or not bf16):
        warm = sampler(2)  # compile / kernel selection / allocator warm-up at the timed shape
        warm.sample_latents(range(args.batch_size))
        x_T, _ = warm.initial_noise(range(args.batch_size))
        t = torch.full((args.batch_size,), 500, device=device)
        y = torch.arange(args.batch_size, device=device) % cfg.num_classes
        with torch.no_grad():
            one_call = denoiser(x_T, t, y).float().cpu()  # (B, C_out, H, W)
        timed = sampler(args.steps)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        first = None
        for b in range(args.num_batches):
            z, _ = timed.sample_latents(range(b * args.batch_size, (b + 1) * args.batch_size))
            if first is None:
                first = z.float().cpu()
        _sync(device)
        seconds = time.perf_counter() - start
    images = args.batch_size * args.num_batches
    metrics: dict[str, Any] = {
        "precision": "bf16 autocast" if bf16 else ("fp32+tf32" if device.type == "cuda" else "fp32"),
        "attention": "explicit softmax(qk^T)v" if name == "upstream" else "sdpa",
        "compiled": args.compile_mode if args.compile and name == "ours" else False,
        "images_per_s": images / seconds,
        "seconds_per_batch": seconds / args.num_batches,
        "minutes_for_50k": 50_000 / (images / seconds) / 60,
    }
    if device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    assert first is not None
    return metrics, one_call, first


def time_vae_decode(
    vae: nn.Module, latents: torch.Tensor, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """Time decoding ``latents`` (B, C, h, w) to uint8 images as ``sampling.sample`` does.

    Returns:
        images/s, seconds per batch and minutes for 50,000 images of the decode alone.
    """
    # Only Sampler.decode runs: the denoiser and diffusion are placeholders.
    sampler = Sampler(None, create_diffusion("2"), tuple(latents.shape[1:]), 1, device,  # type: ignore[arg-type]
                      vae=vae, vae_batch_size=args.vae_batch_size)
    z = latents.to(device)
    with torch.no_grad():
        to_uint8_images(sampler.decode(z[: args.vae_batch_size]))  # warm-up (kernel selection)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.num_batches):
            images = to_uint8_images(sampler.decode(z))  # (B, H, W, 3), on the host: synchronises
        seconds = time.perf_counter() - start
    n = len(z) * args.num_batches
    return {
        "vae": args.with_vae,
        "vae_batch_size": args.vae_batch_size,
        "image_hw": list(images.shape[1:3]),
        "images_per_s": n / seconds,
        "seconds_per_batch": seconds / args.num_batches,
        "minutes_for_50k": 50_000 / (n / seconds) / 60,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="DiT-S/2", choices=MODEL_NAMES, metavar="NAME", help="registry name")
    p.add_argument("--model-arg", action="append", default=[], type=parse_model_arg, metavar="KEY=VALUE", help="constructor override (repeatable)")
    p.add_argument("--checkpoint", help="weights to load (else a perturbed random init)")
    p.add_argument("--init-noise", type=float, default=0.02, help="std of the perturbation of a random init")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (the model sees 2x with CFG)")
    p.add_argument("--steps", type=int, default=250, help="DDPM steps per batch")
    p.add_argument("--num-batches", type=int, default=2, help="timed batches per variant")
    p.add_argument("--cfg-scale", type=float, default=3.8, help="guidance scale")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="precision of the 'ours' variant (auto: bf16 on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the 'ours' variant")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile (reduce-overhead = CUDA graphs)")
    p.add_argument("--with-vae", nargs="?", const=DEFAULT_VAE, default=None, metavar="SPEC",
                   help=f"also time VAE decoding: a local AutoencoderKL folder or hub id (bare flag: {DEFAULT_VAE})")
    p.add_argument("--vae-batch-size", type=int, default=32, help="latents per VAE decode call (with --with-vae)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--seed", type=int, default=0, help="base seed (noise and random init)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and return the JSON report."""
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    device = torch.device(args.device)
    model = build_model(args).to(device)
    cfg = model.config
    vae = None
    if args.with_vae:  # load before timing anything: a wrong spec fails fast
        vae = load_vae(args.with_vae, cfg.in_channels)
        if vae is None:
            raise SystemExit("--with-vae needs a VAE spec, not 'none'")
        vae = vae.to(device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "model_args": dict(args.model_arg),
        "checkpoint": args.checkpoint,
        "tokens": (cfg.input_size // cfg.patch_size) ** 2,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "num_batches": args.num_batches,
        "cfg_scale": args.cfg_scale,
        "variants": {},
    }
    samples: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name in variants:
        report["variants"][name], outputs[name], samples[name] = run_variant(model, name, args, device)
    ref_name = "upstream" if "upstream" in samples else variants[0]
    report["reference"] = ref_name
    for name in variants:
        entry = report["variants"][name]
        out_diff = (outputs[name] - outputs[ref_name]).abs()
        entry["one_call_max_abs_diff_vs_" + ref_name] = out_diff.max().item()
        entry["one_call_rel_diff_vs_" + ref_name] = (out_diff.norm() / outputs[ref_name].norm()).item()
        diff = (samples[name] - samples[ref_name]).abs()
        entry["max_abs_diff_vs_" + ref_name] = diff.max().item()
        entry["mean_abs_diff_vs_" + ref_name] = diff.mean().item()
        report["variants"][name]["speedup_vs_" + ref_name] = (
            report["variants"][name]["images_per_s"] / report["variants"][ref_name]["images_per_s"]
        )
    if vae is not None:
        decode = time_vae_decode(vae, samples[variants[-1]], args, device)
        report["vae_decode"] = decode
        for entry in report["variants"].values():
            entry["minutes_for_50k_with_vae"] = entry["minutes_for_50k"] + decode["minutes_for_50k"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
