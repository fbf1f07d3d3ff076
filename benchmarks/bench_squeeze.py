"""Benchmark one layer pair's SHD term (alpha + loss, forward + backward): whole maps vs row blocks.

Setting (issue 9): teacher H_t = 16 heads -> student H_s = 6 heads (groups 3,3,3,3,2,2), head dim
d = 64 for both, T_a = 2, KL, float32, N = 256, 1024 and 4096 tokens. Implementations:

  * ``dense``: today's whole-map path -- (B, H, N, N) teacher maps at T = 1 and T_a,
    ``squeeze_heads`` + ``apply_alphas``, student maps with autograd, ``shd_loss``;
  * ``chunked``: :func:`shd_diffusion.shd.shd_term` (row blocks, custom backward that recomputes
    each block);
  * ``checkpoint``: the same blocks with autograd and ``torch.utils.checkpoint`` per block (the
    alternative the chunked backward was chosen over).

Each row reports the median wall time of forward + backward over ``--iters`` runs (the
implementations alternate step by step, so a shared machine's drifting load hits all alike) and
the peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak of the CPU
allocator's live bytes from ``torch.profiler`` memory events, measured in a separate untimed run.

    python benchmarks/bench_squeeze.py --device cpu --batch 1 --tokens 256 1024 4096 --json bench_squeeze.json
    python benchmarks/bench_squeeze.py --device cuda --batch 32 --tokens 256 1024 4096
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch
from shd_diffusion.profiling import cpu_peak_bytes

from shd_diffusion import shd
from shd_diffusion.shd import chunked

IMPLS = ("dense", "chunked", "checkpoint")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--teacher-heads", type=int, default=16)
    p.add_argument("--student-heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--chunk", type=int, default=64,
                   help="query rows per block (fixed, to compare N); 0 = automatic (shd.auto_chunk_size)")
    p.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--dense-max-tokens", type=int, default=4096, help="skip the dense path above this N")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU runs)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.batch < 1 or args.chunk < 0 or args.iters < 1:
        p.error("--batch and --iters must be >= 1 and --chunk >= 0")
    return args


def make_pair(args: argparse.Namespace, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random q, k, v of one teacher/student layer pair (logits of a few units, like trained models)."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, ht, hs, d = args.batch, args.teacher_heads, args.student_heads, args.head_dim

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen)

    p = {
        "student_q": (r(b, hs, n, d) * 1.5).requires_grad_(True), "student_k": r(b, hs, n, d).requires_grad_(True),
        "teacher_q": r(b, ht, n, d) * 1.5, "teacher_k": r(b, ht, n, d), "teacher_v": r(b, ht, n, d),
        "out_weight": r(ht * d, ht * d) / (ht * d) ** 0.5,
    }
    # The per-head outputs the teacher's fused attention computed anyway (both captures export them).
    p["teacher_out"] = torch.nn.functional.scaled_dot_product_attention(p["teacher_q"], p["teacher_k"], p["teacher_v"])
    return p


def dense_term(p: dict[str, torch.Tensor], temperature: float) -> torch.Tensor:
    """The whole-map path (what training ran before issue 9)."""
    from shd_diffusion.attention import attention_probs

    hs, d = p["student_q"].shape[1], p["teacher_q"].shape[-1]
    with torch.no_grad():
        t1 = attention_probs(p["teacher_q"], p["teacher_k"], d**-0.5)  # (B, H_t, N, N)
        soft = attention_probs(p["teacher_q"], p["teacher_k"], d**-0.5, temperature=temperature)
        sq = shd.HeadSqueezer(t1.shape[1], hs)
        target, _ = sq(t1, p["teacher_v"], p["out_weight"], soft, p["teacher_out"])
        del t1, soft
    student = attention_probs(p["student_q"], p["student_k"], p["student_q"].shape[-1] ** -0.5, temperature=temperature)
    return shd.shd_loss([student], [target], beta=1.0)


def checkpoint_term(p: dict[str, torch.Tensor], temperature: float, chunk: int) -> torch.Tensor:
    """Row blocks with autograd + torch.utils.checkpoint per block (the measured alternative)."""
    return chunked.checkpointed_term(**p, temperature=temperature, chunk_size=chunk)


def chunk_rows(args: argparse.Namespace, n: int) -> int:
    """The block size of a run: ``--chunk``, or the automatic one for ``--chunk 0``."""
    return args.chunk or shd.auto_chunk_size(args.batch, args.teacher_heads, args.student_heads, n)


def step_fn(args: argparse.Namespace, impl: str, p: dict[str, torch.Tensor]) -> Callable[[], None]:
    chunk = chunk_rows(args, p["student_q"].shape[-2])

    def step() -> None:
        p["student_q"].grad = p["student_k"].grad = None
        if impl == "dense":
            loss = dense_term(p, args.temperature)
        elif impl == "chunked":
            loss, _ = shd.shd_term(**p, temperature=args.temperature, chunk_size=chunk)
        else:
            loss = checkpoint_term(p, args.temperature, chunk)
        loss.sum().backward()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tokens(args: argparse.Namespace, n: int, impls: list[str], device: torch.device) -> list[dict[str, object]]:
    """Time the implementations at one N in turn, step by step (a drifting machine load hits all
    alike), then measure each one's peak memory in an untimed run."""
    p = make_pair(args, n, device)
    steps = {impl: step_fn(args, impl, p) for impl in impls}
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    failed: set[str] = set()
    for i in range(args.warmup + args.iters):
        for impl in impls:
            if impl in failed:
                continue
            try:
                sync(device)
                tic = time.perf_counter()
                steps[impl]()
                sync(device)
            except torch.OutOfMemoryError:
                failed.add(impl)
                continue
            if i >= args.warmup:
                times[impl].append((time.perf_counter() - tic) * 1e3)
    rows = []
    for impl in impls:
        if impl in failed:
            rows.append({"tokens": n, "impl": impl, "status": "oom"})
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            steps[impl]()
            sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            # Free the last step's gradients first: a free of memory allocated before profiling
            # started has no size in the profiler's events and would lower the measured peak.
            p["student_q"].grad = p["student_k"].grad = None
            peak = cpu_peak_bytes(steps[impl])
        rows.append({"tokens": n, "impl": impl, "status": "ok", "batch": args.batch,
                     "chunk": chunk_rows(args, n) if impl != "dense" else n,
                     "fwd_bwd_ms": round(statistics.median(times[impl]), 2),
                     "peak_mem_above_inputs_mib": round(peak / 2**20, 1)})
    return rows


def ratios(rows: list[dict[str, object]]) -> dict[str, object]:
    """The issue's targets: chunked peak growth 1024 -> 4096 (<= 5x), chunked / dense at 1024 (<= 1/8)."""
    mem = {(r["impl"], r["tokens"]): r["peak_mem_above_inputs_mib"] for r in rows if r["status"] == "ok"}
    out: dict[str, object] = {}
    for impl in IMPLS:
        if (impl, 1024) in mem and (impl, 4096) in mem:
            out[f"{impl}_peak_4096_over_1024"] = round(mem[(impl, 4096)] / max(mem[(impl, 1024)], 1e-9), 2)
    for impl in ("chunked", "checkpoint"):
        if (impl, 1024) in mem and ("dense", 1024) in mem:
            out[f"{impl}_over_dense_peak_at_1024"] = round(mem[(impl, 1024)] / max(mem[("dense", 1024)], 1e-9), 4)
    return out


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for n in args.tokens:
        impls = [i for i in args.impl if i != "dense" or n <= args.dense_max_tokens]
        for row in run_tokens(args, n, impls, device):
            rows.append(row)
            print(json.dumps(row), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {
        "setting": {k: v for k, v in vars(args).items() if k != "json"},
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "torch.profiler CPU allocator peak",
        "targets": {"chunked_peak_4096_over_1024": "<= 5 (dense: 16)", "chunked_over_dense_peak_at_1024": "<= 0.125"},
        "ratios": ratios(rows),
        "results": rows,
    }
    print(json.dumps(report["ratios"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
