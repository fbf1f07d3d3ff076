"""Optimizer step time on an MDTv2-S/2-shaped parameter set (timm Adan, adan-pytorch, AdamW).

Only the ``optimizer.step()`` is timed (gradients are fixed random tensors), median of ``--iters``
steps after ``--warmup`` untimed ones (adan-pytorch's first step is a no-op, so warmup >= 2).
On CUDA each step is bracketed by ``torch.cuda.synchronize()``.

    python benchmarks/bench_optim.py --json bench_optim.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shd_diffusion.optim import build_optimizer


def mdtv2_s2_shapes(
    hidden: int = 384, depth: int = 12, patch: int = 2, in_ch: int = 4
) -> list[tuple[int, ...]]:
    """Parameter shapes of MDTv2-S/2 (learn_sigma, 256 tokens): 12 blocks + 1 side block.

    Args:
        hidden: Hidden size.
        depth: Encoder + decoder blocks; each but the first half of the encoder has a skip linear.
        patch: Patch size.
        in_ch: Latent channels.

    Returns:
        Shapes, weight then bias, in module order.
    """
    h, grid = hidden, 32 // patch
    rel_table = (2 * grid - 1) ** 2 + 3
    shapes: list[tuple[int, ...]] = [
        (h, in_ch, patch, patch), (h,),          # x_embedder conv
        (h, 256), (h,), (h, h), (h,),            # t_embedder MLP
        (1001, h),                               # y_embedder (1000 classes + null)
        (1, grid * grid, h), (1, grid * grid, h),  # pos_embed, decoder_pos_embed
        (1, 1, h),                               # mask_token
    ]
    block = [
        (3 * h, h), (3 * h,), (h, h), (h,),      # attn.qkv, attn.proj
        (rel_table, 6),                          # attn.rel_pos_bias table (6 heads)
        (4 * h, h), (4 * h,), (h, 4 * h), (h,),  # mlp.fc1, mlp.fc2
        (6 * h, h), (6 * h,),                    # adaLN_modulation
    ]
    half = (depth - 6) // 2  # decode_layer 6
    for i in range(depth + 1):  # + sideblocks.0
        shapes += block
        if half <= i < depth:  # en_outblocks and de_blocks carry skip_linear (2h -> h)
            shapes += [(h, 2 * h), (h,)]
    out = patch * patch * 2 * in_ch  # learn_sigma doubles the channels
    shapes += [(2 * h, h), (2 * h,), (out, h), (out,)]  # final layer: adaLN, linear
    return shapes


def time_steps(
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]],
    device: torch.device,
    warmup: int,
    iters: int,
) -> dict[str, float]:
    """Median / min optimizer step time in milliseconds.

    Args:
        make: Builds the optimizer for a parameter list.
        shapes: Parameter shapes.
        device: Where parameters live.
        warmup: Untimed steps first (state allocation, first-step no-ops).
        iters: Timed steps.

    Returns:
        ``{"median_ms", "min_ms"}``.
    """
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).mul_(0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(device)
    opt = make(params)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    shapes = mdtv2_s2_shapes()
    numel = sum(torch.Size(s).numel() for s in shapes)
    lr = 5e-4
    cases: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "adan_timm_foreach": lambda p: build_optimizer(p, "adan", lr=lr, foreach=True),
        "adan_timm_single": lambda p: build_optimizer(p, "adan", lr=lr, foreach=False),
        "adan_pytorch": lambda p: build_optimizer(p, "adan_pytorch", lr=lr),
        "adamw_foreach": lambda p: build_optimizer(p, "adamw", lr=lr, foreach=True),
        "adamw_single": lambda p: build_optimizer(p, "adamw", lr=lr, foreach=False),
    }
    if device.type == "cuda":
        cases["adamw_fused"] = lambda p: torch.optim.AdamW(p, lr=lr, fused=True)

    results = {}
    for name, make in cases.items():
        results[name] = time_steps(make, shapes, device, args.warmup, args.iters)
        r = results[name]
        print(f"{name:20s} median {r['median_ms']:8.2f} ms   min {r['min_ms']:8.2f} ms")

    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "num_params": numel,
        "num_tensors": len(shapes),
        "warmup": args.warmup,
        "iters": args.iters,
        "results": results,
    }
    print(f"{numel / 1e6:.2f}M parameters in {len(shapes)} tensors on {device}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
