#!/usr/bin/env python
"""Time an upstream-style plain training step: the baseline of the README's "KD+SHD vs plain" target.

    python benchmarks/bench_upstream_step.py --model MDTv2-S/2 --batch 256 --precision bf16 --json step.json

What the official MDT / DiT ``train.py`` loops run per step, and nothing else: attention as an
explicit ``softmax(q k^T) v`` (their ``Attention`` modules; no fused kernel, no map capture), the
diffusion loss on the unmasked pass plus, for MDTv2, the masked pass (``mask_ratio`` of the model,
upstream 0.3), backward, gradient clipping, timm's Adan and the EMA update. No teacher, no
non-finite check, no host sync per step. The model is this package's (same weights layout and
FLOPs as upstream); inputs are synthetic SD-VAE-shaped latents (4 x input_size x input_size) and
the timesteps and noise are drawn on the device.

Reports the median step time over ``--iters`` steps after ``--warmup``, img/s and peak CUDA
memory, as one JSON object (stdout and ``--json``). Run it in the same process environment and
on the same GPU as ``bench_train_step.py`` so the ratio of the two means something
(``benchmarks/gpu_suite.sh`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sampling import explicit_attention  # noqa: E402

from shd_diffusion.commands.sample import parse_model_arg  # noqa: E402
from shd_diffusion.diffusion import create_diffusion  # noqa: E402
from shd_diffusion.models.registry import MODEL_NAMES, create_model  # noqa: E402
from shd_diffusion.optim import build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model: torch.nn.Module, batch: int, args: argparse.Namespace, device: torch.device):
    """One upstream-style step as a closure over fixed synthetic inputs (x0, y) of ``batch`` images."""
    diffusion = create_diffusion(None, learn_sigma=model.config.learn_sigma)
    ema = [p.detach().clone() for p in model.parameters()]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "adan", lr=args.lr)
    gen = torch.Generator(device=device).manual_seed(0)
    c, s = model.config.in_channels, model.config.input_size
    x0 = torch.randn(batch, c, s, s, device=device, generator=gen)  # (B, C, H, W)
    y = torch.randint(0, model.config.num_classes, (batch,), device=device, generator=gen)
    masked = getattr(model, "mask_ratio", None) is not None
    autocast = torch.autocast(device.type, torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        noise = torch.randn_like(x0)
        x_t = diffusion.q_sample(x0, t, noise)
        with autocast:
            out = model(x_t, t, y)
        loss = diffusion.training_losses(out.float(), x0, x_t, t, noise)["loss"].mean()
        if masked:  # MDT: the masked pass on the same x_t, its loss added
            with autocast:
                out_m = model(x_t, t, y, enable_mask=True)
            loss = loss + diffusion.training_losses(out_m.float(), x0, x_t, t, noise)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], 1 - 0.9999)

    return step


def bench(args: argparse.Namespace, batch: int, device: torch.device) -> dict:
    """Median step time at ``batch`` (raises torch.OutOfMemoryError when it does not fit)."""
    model = create_model(args.model, **{"input_size": args.input_size, **dict(args.model_arg)}).to(device).train()
    step = make_step(model, batch, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with explicit_attention(model):
        for i in range(args.warmup + args.iters):
            _sync(device)
            tic = time.perf_counter()
            step()
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - tic)
    ms = statistics.median(times) * 1e3
    return {
        "model": args.model, "model_args": dict(args.model_arg), "batch": batch, "precision": args.precision, "attention": "explicit softmax(qk^T)v",
        "step_ms_median": round(ms, 2), "step_ms_min": round(min(times) * 1e3, 2),
        "img_per_s": round(batch / (ms / 1e3), 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="MDTv2-S/2", choices=MODEL_NAMES, metavar="NAME", help="registry name")
    p.add_argument("--model-arg", action="append", default=[], type=parse_model_arg, metavar="KEY=VALUE",
                   help="constructor override (repeatable), e.g. hidden_size=64 for a smoke run")
    p.add_argument("--batch", type=int, default=256, help="batch (halved on out-of-memory; default 256)")
    p.add_argument("--input-size", type=int, default=32, help="latent side (default: 32 = ImageNet 256)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--lr", type=float, default=5e-4, help="Adan lr (upstream MDTv2-S/2: 5e-4)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":  # upstream DiT enables TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    batch = args.batch
    while True:
        try:
            row = bench(args, batch, device)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), **row}
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
