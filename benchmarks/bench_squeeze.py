"""Benchmark SHD head squeezing + loss: head-dim-space alpha vs the naive N x D formulation.

Default setting: MDTv2-B/2 -> S/2 style layer set, 12 student layers, teacher 12 heads of d = 64
(D = 768) squeezed to 6 student heads, batch 32, N = 256 and 1024 tokens. For each token count and
implementation it reports the median wall time of

  * squeeze: alpha for every layer (T = 1 maps) and the squeezed maps (``torch.no_grad``),
  * loss: ``shd_loss`` forward + backward to the student maps,

and the peak memory above the inputs (``torch.cuda.max_memory_allocated``; "n/a" on CPU).

Precision. ``--dtype`` is the storage dtype of the random teacher tensors (maps, values,
out-projection weights): ``bf16`` = torch.bfloat16, ``fp32`` = torch.float32. Whatever it is,
alpha is solved in float32 (bf16 inputs are upcast; the head-dim products and the Gram are float32
matmuls, TF32 unless ``--no-tf32``: training enables TF32 by default, ``train.tf32``; the products
are of map differences, so TF32 rounding is relative to how much heads differ), squeezed maps come
back in the teacher dtype, the student maps are float32 with autograd,
and ``shd_loss`` computes in float32. The naive baseline forms its N x D products in float32. Note
that ``capture_attention`` exports float32 maps and model-dtype values, so ``--dtype fp32`` is the
closer match to training maps; ``bf16`` shows the cost when the teacher tensors are stored in bf16.

Target (issue 2): squeeze + loss for all 12 student layers under 10% of a DiT-S/2 training step,
i.e. ``fraction_of_step = total_ms_per_256 / step_ms < 0.10`` with ``step_ms`` = 86 ms, the
upstream DiT-S/2 bf16 step at batch 256 on an H100. ``total_ms_per_256 = total_ms * 256 / batch``
scales the measured batch linearly to 256 samples (an overestimate when a small batch leaves the
GPU idle). The fraction is only meaningful on a GPU comparable to the one ``step_ms`` came from.

    python benchmarks/bench_squeeze.py --device cuda --dtype bf16 --json bench.json
    python benchmarks/bench_squeeze.py --device cpu --dtype fp32 --batch 2 --tokens 256
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from shd_diffusion.shd import apply_alphas, default_groups, shd_loss, squeeze_heads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from shd_oracles import naive_squeeze_alphas  # noqa: E402  (the N x D oracle lives with the tests)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="teacher maps/values/weights dtype")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--layers", type=int, default=12, help="distilled student layers")
    p.add_argument("--teacher-heads", type=int, default=12)
    p.add_argument("--student-heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--impl", nargs="+", choices=["head_space", "naive"], default=["head_space", "naive"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="full-precision float32 matmuls (training's train.tf32=false)")
    p.add_argument(
        "--step-ms", type=float, default=86.0,
        help="training step time to compare with (default: upstream DiT-S/2, bf16, batch 256, H100)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.step_ms <= 0 or args.batch < 1:
        p.error(f"--step-ms must be > 0 and --batch >= 1, got {args.step_ms} and {args.batch}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_layers(args: argparse.Namespace, tokens: int, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Random teacher (softmax maps, values, out weights) and student maps for every layer."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    b, ht, hs, d = args.batch, args.teacher_heads, args.student_heads, args.head_dim
    out: dict[str, list[torch.Tensor]] = {"probs": [], "values": [], "weights": [], "outputs": [], "student": []}
    for _ in range(args.layers):
        logits = torch.randn(b, ht, tokens, tokens, device=device, generator=gen) * 2  # (B, H_t, N, N)
        out["probs"].append(logits.softmax(-1).to(dtype))
        del logits
        out["values"].append(torch.randn(b, ht, tokens, d, device=device, generator=gen).to(dtype))  # (B, H_t, N, d)
        # What the teacher's attention computed anyway and capture exports (spares a product).
        out["outputs"].append((out["probs"][-1] @ out["values"][-1]).float())  # (B, H_t, N, d)
        out["weights"].append((torch.randn(ht * d, ht * d, device=device, generator=gen) / (ht * d) ** 0.5).to(dtype))
        s_logits = torch.randn(b, hs, tokens, tokens, device=device, generator=gen) * 2  # (B, H_s, N, N)
        out["student"].append(s_logits.softmax(-1).requires_grad_(True))
    return out


def squeeze_head_space(layers: dict[str, list[torch.Tensor]], hs: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [
            squeeze_heads(p, v, w, hs, head_outputs=o)[0]
            for p, v, w, o in zip(layers["probs"], layers["values"], layers["weights"], layers["outputs"])
        ]


def squeeze_naive(layers: dict[str, list[torch.Tensor]], hs: int) -> list[torch.Tensor]:
    """Baseline: same eq. (6) solve from explicit N x D products (float32, no simplex step)."""
    out = []
    with torch.no_grad():
        for p, v, w in zip(layers["probs"], layers["values"], layers["weights"]):
            groups = default_groups(p.shape[1], hs)
            alphas = naive_squeeze_alphas(p, v, w, groups, dtype=torch.float32)
            out.append(apply_alphas(p, alphas, groups))
    return out


def time_it(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def run_one(args: argparse.Namespace, tokens: int, impl: str, device: torch.device) -> dict[str, object]:
    layers = make_layers(args, tokens, device)
    squeeze = squeeze_head_space if impl == "head_space" else squeeze_naive
    cuda = device.type == "cuda"
    if cuda:
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    def loss_step() -> None:
        for s in layers["student"]:
            s.grad = None
        shd_loss(layers["student"], teacher_maps).sum().backward()

    try:
        squeeze_ms, teacher_maps = time_it(lambda: squeeze(layers, args.student_heads), device, args.warmup, args.iters)
        loss_ms, _ = time_it(loss_step, device, args.warmup, args.iters)
    except torch.OutOfMemoryError:
        return {"tokens": tokens, "impl": impl, "status": "oom"}
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    total_ms = squeeze_ms + loss_ms
    per_256 = total_ms * 256 / args.batch  # linear in batch
    row: dict[str, object] = {
        "tokens": tokens,
        "impl": impl,
        "status": "ok",
        "batch": args.batch,
        "squeeze_ms": round(squeeze_ms, 3),
        "loss_fwd_bwd_ms": round(loss_ms, 3),
        "total_ms": round(total_ms, 3),
        "total_ms_per_256": round(per_256, 3),
        "fraction_of_step": round(per_256 / args.step_ms, 4),
        "peak_mem_above_inputs_mib": round((peak - base) / 2**20, 1) if cuda else "n/a",
        "peak_mem_mib": round(peak / 2**20, 1) if cuda else "n/a",
    }
    return row


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    rows = []
    for tokens in args.tokens:
        for impl in args.impl:
            row = run_one(args, tokens, impl, device)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the run's tensors are gone with its frame
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "setting": {k: v for k, v in vars(args).items() if k != "json"},
        "model_dim": args.teacher_heads * args.head_dim,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "target": {
            "fraction_of_step_below": 0.10,
            "step_ms": args.step_ms,
            "step": "DiT-S/2 training step, bf16, batch 256, H100 (upstream code, from issue 2)",
            "fraction_of_step": "total_ms_per_256 / step_ms; total_ms_per_256 = total_ms * 256 / batch",
            "note": "meaningful only on a GPU comparable to the one step_ms was measured on",
        },
        "results": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
