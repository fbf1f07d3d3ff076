"""Peak memory of one FLUX-shaped layer pair's SHD term (issue 19): 24 -> 12 heads, d = 128.

FLUX.1's double-stream blocks attend over one joint sequence of S = T + I tokens: T = 512 text
tokens and I image tokens (1,024 at 512 px, S = 1,536; 4,096 at 1,024 px, S = 4,608). The map SHD
distils by default is the image-query rows over all keys (``t2i_capture.shd_inputs(keys="all")``),
so the term gets N = S - T query rows and M = S keys. Teacher: 24 heads of d = 128 (FLUX.1's
3,072-wide attention, image out-projection ``to_out[0]`` (3072, 3072)); student: 12 heads of d = 128;
batch 1; T_a = 2; KL; no bias (FLUX.1 masks no key); the teacher's per-head outputs passed as the
capture exports them.

For each S, input dtype (float32, or bfloat16 q/k/v: the term computes in float32 either way) and
block size (``auto`` = :func:`shd_diffusion.shd.auto_chunk_size`, ``whole`` = all N rows in one
block, or a number of rows), it measures the peak memory of ``shd_term`` forward + backward above
the inputs and sets it beside the arithmetic (inputs, whole maps, one row block):

* CPU (``--method rss``, default): each configuration in a fresh subprocess with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc then returns every block over 64 KiB to the system on free,
  so the resident set tracks live memory); a warm-up term at a toy size first (one-time buffers),
  then the peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus
  the resident set before the term. ``--method profiler``: in process, the CPU allocator's peak
  from ``torch.profiler`` memory events (:func:`shd_diffusion.profiling.cpu_peak_bytes`).
* GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` minus the memory allocated before.

    python benchmarks/bench_t2i_memory.py --device cpu --threads 2 --json benchmarks/reports/t2i_memory_cpu.json \\
        --md benchmarks/reports/t2i_memory_cpu.md
    python benchmarks/bench_t2i_memory.py --device cuda --json t2i_memory_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from shd_diffusion import shd
from shd_diffusion.profiling import cpu_peak_bytes

MIB = 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Setting:
    """One measured configuration (defaults: FLUX.1 at 512 px, float32, automatic blocks)."""

    tokens: int = 1536  # S, the joint sequence (text + image)
    text_tokens: int = 512  # T; the distilled rows are the N = S - T image queries
    batch: int = 1
    teacher_heads: int = 24
    student_heads: int = 12
    head_dim: int = 128
    dtype: str = "fp32"  # of q, k, v, the teacher outputs and the out-projection
    chunk: str = "auto"  # "auto", "whole" or a number of query rows
    temperature: float = 2.0

    @property
    def rows(self) -> int:
        return self.tokens - self.text_tokens  # N

    def chunk_rows(self) -> int:
        """Query rows per block as ``shd_term`` will use them (at most N)."""
        n, m = self.rows, self.tokens
        if self.chunk == "auto":
            rows = shd.auto_chunk_size(self.batch, self.teacher_heads, self.student_heads, max(n, m))
        elif self.chunk == "whole":
            rows = n
        else:
            rows = int(self.chunk)
        return min(rows, n)


def arithmetic(s: Setting) -> dict[str, float]:
    """The sizes the measured peaks are compared with, in MiB (float32 = 4 bytes; inputs in ``s.dtype``)."""
    b, ht, hs, d, n, m = s.batch, s.teacher_heads, s.student_heads, s.head_dim, s.rows, s.tokens
    c = s.chunk_rows()
    e = torch.finfo(DTYPES[s.dtype]).bits // 8  # bytes per input element
    inputs = {
        "teacher_q": b * ht * n * d * e, "teacher_k": b * ht * m * d * e, "teacher_v": b * ht * m * d * e,
        "teacher_out": b * ht * n * d * e, "out_weight": (ht * d) * (ht * d) * e,
        "student_q": b * hs * n * d * e, "student_k": b * hs * m * d * e,
    }
    out = {f"input_{k}_mib": v / MIB for k, v in inputs.items()}
    out.update({
        "inputs_total_mib": sum(inputs.values()) / MIB,
        # The figures: all S x S maps of the teacher layer (every query row), bf16 and float32.
        "teacher_maps_SxS_bf16_mib": b * ht * s.tokens**2 * 2 / MIB,
        "teacher_maps_SxS_fp32_mib": b * ht * s.tokens**2 * 4 / MIB,
        # What the distilled (image rows x all keys) whole maps cost in the float32 compute dtype.
        "teacher_maps_NxM_fp32_mib": b * ht * n * m * 4 / MIB,
        "student_maps_NxM_fp32_mib": b * hs * n * m * 4 / MIB,
        "chunk_rows": c,
        "blocks": -(-n // c),
        "teacher_block_fp32_mib": b * ht * c * m * 4 / MIB,  # (B, H_t, c, M)
        "student_block_fp32_mib": b * hs * c * m * 4 / MIB,  # (B, H_s, c, M)
        # auto_chunk_size's model of one block's float32 temporaries: 3 teacher-sized + 6 student-sized.
        "block_budget_model_mib": (3 * ht + 6 * hs) * b * c * m * 4 / MIB,
        # The backward's float32 accumulators dq (B, H_s, N, d) and dk (B, H_s, M, d), plus the
        # gradients handed back in the input dtype.
        "student_grads_mib": (b * hs * (n + m) * d * 4 + b * hs * (n + m) * d * e) / MIB,
    })
    return out


def make_inputs(s: Setting, device: torch.device) -> dict[str, torch.Tensor]:
    """Random q, k, v of the layer pair (logits of a few units, like trained models), in ``s.dtype``."""
    gen = torch.Generator(device=device).manual_seed(0)
    b, ht, hs, d, n, m = s.batch, s.teacher_heads, s.student_heads, s.head_dim, s.rows, s.tokens
    dtype = DTYPES[s.dtype]

    def r(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * scale).to(dtype)

    p = {
        "student_q": r(b, hs, n, d, scale=1.5).requires_grad_(True), "student_k": r(b, hs, m, d).requires_grad_(True),
        "teacher_q": r(b, ht, n, d, scale=1.5), "teacher_k": r(b, ht, m, d), "teacher_v": r(b, ht, m, d),
        "out_weight": r(ht * d, ht * d, scale=(ht * d) ** -0.5),
    }
    with torch.no_grad():  # the per-head outputs A_i V_i the teacher's attention computed anyway
        p["teacher_out"] = torch.nn.functional.scaled_dot_product_attention(
            p["teacher_q"].float(), p["teacher_k"].float(), p["teacher_v"].float()).to(dtype)
    return p


def run_term(p: dict[str, torch.Tensor], s: Setting) -> None:
    """One SHD term, forward + backward; the gradients stay on the student's q and k."""
    loss, _ = shd.shd_term(**p, temperature=s.temperature, chunk_size=s.chunk_rows())
    loss.sum().backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_rss(s: Setting) -> dict[str, float]:
    """In this process (meant to be a fresh one): peak resident set of one term above the inputs."""
    device = torch.device("cpu")
    run_term(make_inputs(Setting(tokens=32, text_tokens=8, dtype=s.dtype), device), s)  # one-time buffers
    p = make_inputs(s, device)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    tic = time.perf_counter()
    run_term(p, s)
    seconds = time.perf_counter() - tic
    peak = _status_kib("VmHWM")
    return {"peak_above_inputs_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "fwd_bwd_s": seconds, "method": "rss"}


def measure_profiler(s: Setting) -> dict[str, float]:
    """In process: the CPU allocator's peak (torch.profiler memory events) of one term above the inputs."""
    p = make_inputs(s, torch.device("cpu"))
    tic = time.perf_counter()
    peak = cpu_peak_bytes(lambda: run_term(p, s))
    return {"peak_above_inputs_mib": peak / MIB, "fwd_bwd_s": time.perf_counter() - tic, "method": "profiler"}


def measure_cuda(s: Setting) -> dict[str, float]:
    """``torch.cuda.max_memory_allocated`` of one term above the inputs (after one warm-up term)."""
    device = torch.device("cuda")
    p = make_inputs(s, device)
    run_term(p, s)
    p["student_q"].grad = p["student_k"].grad = None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    tic = time.perf_counter()
    run_term(p, s)
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(device) - base
    return {"peak_above_inputs_mib": peak / MIB, "fwd_bwd_s": seconds, "method": "cuda max_memory_allocated"}


def measure_in_subprocess(s: Setting, threads: int | None, timeout_s: float) -> dict[str, object]:
    """:func:`measure_rss` in a fresh interpreter with MALLOC_MMAP_THRESHOLD_=65536."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", json.dumps(asdict(s))] + ([] if threads is None else ["--threads", str(threads)])
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout_s:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"status": f"failed rc {done.returncode}: {tail}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--tokens", type=int, nargs="+", default=[1536, 4608], help="joint sequence lengths S")
    p.add_argument("--text-tokens", type=int, default=512, help="text tokens T (the image rows are N = S - T)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--teacher-heads", type=int, default=24)
    p.add_argument("--student-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--chunks", nargs="+", default=["auto", "whole"], help="'auto', 'whole' or rows per block")
    p.add_argument("--method", choices=("rss", "profiler"), default="rss", help="CPU peak measure (see above)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per CPU subprocess")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--md", default=None, help="write a Markdown report here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one Setting as JSON
    args = p.parse_args(argv)
    for c in args.chunks:
        if c not in ("auto", "whole") and not (c.isdigit() and int(c) >= 1):
            p.error(f"--chunks takes 'auto', 'whole' or a row count >= 1, got {c!r}")
    if any(s <= args.text_tokens for s in args.tokens):
        p.error(f"every --tokens S must exceed --text-tokens {args.text_tokens} (N = S - T image rows)")
    return args


def settings_of(args: argparse.Namespace) -> list[Setting]:
    return [Setting(tokens=s, text_tokens=args.text_tokens, batch=args.batch, teacher_heads=args.teacher_heads,
                    student_heads=args.student_heads, head_dim=args.head_dim, dtype=dt, chunk=c)
            for s in args.tokens for dt in args.dtypes for c in args.chunks]


def _fmt(x: object) -> str:
    return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def markdown(report: dict[str, object]) -> str:
    """The report as Markdown: setting, machine, one table row per configuration."""
    lines = [
        "# Memory of one FLUX-shaped layer pair's SHD term (issue 19)", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']}; date {report['date']}; torch {report['torch']}, {report['threads']} threads. "
        f"Peak measured by: {report['memory']}.", "",
        report["setting_text"], "",
        "| S | N x M | inputs | rows/block (blocks) | peak above inputs MiB | fwd+bwd s | inputs MiB | teacher maps S x S bf16 / fp32 MiB "
        "| whole maps N x M fp32 teacher / student MiB | one block fp32 teacher / student MiB | block budget model MiB | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        a = r["arithmetic"]
        s = r["setting"]
        lines.append(
            f"| {s['tokens']:,} | {s['tokens'] - s['text_tokens']:,} x {s['tokens']:,} | {s['dtype']} | "
            f"{a['chunk_rows']:,} ({a['blocks']}{', ' + s['chunk'] if s['chunk'] in ('auto', 'whole') else ''}) | "
            f"{_fmt(r.get('peak_above_inputs_mib', '-'))} | {_fmt(r.get('fwd_bwd_s', '-'))} | {_fmt(a['inputs_total_mib'])} | "
            f"{_fmt(a['teacher_maps_SxS_bf16_mib'])} / {_fmt(a['teacher_maps_SxS_fp32_mib'])} | "
            f"{_fmt(a['teacher_maps_NxM_fp32_mib'])} / {_fmt(a['student_maps_NxM_fp32_mib'])} | "
            f"{_fmt(a['teacher_block_fp32_mib'])} / {_fmt(a['student_block_fp32_mib'])} | "
            f"{_fmt(a['block_budget_model_mib'])} | {r['status']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:  # one configuration, in this (fresh) process
        print(json.dumps(measure_rss(Setting(**json.loads(args.worker)))), flush=True)
        return {}
    rows = []
    for s in settings_of(args):
        if args.device == "cuda":
            try:
                got: dict[str, object] = dict(measure_cuda(s), status="ok")
            except torch.OutOfMemoryError:
                got = {"status": "oom"}
            torch.cuda.empty_cache()
        elif args.method == "profiler":
            got = dict(measure_profiler(s), status="ok")
        else:
            got = measure_in_subprocess(s, args.threads, args.timeout)
        row = {"setting": asdict(s), "arithmetic": arithmetic(s), **got}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "arithmetic"}), flush=True)
    memory = {"cuda": "torch.cuda.max_memory_allocated above the inputs",
              "rss": "peak resident set (VmHWM) above the resident set before the term, fresh subprocess per "
                     "configuration, MALLOC_MMAP_THRESHOLD_=65536",
              "profiler": "torch.profiler CPU allocator peak above the inputs"}
    machine = (torch.cuda.get_device_name(0) if args.device == "cuda"
               else f"{cpu_model()}, {os.cpu_count()} logical cores, load average "
                    f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the start of the report")
    report = {
        "command": "python " + " ".join([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else argv)),
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "memory": memory["cuda" if args.device == "cuda" else args.method],
        "setting_text": (
            f"Layer pair: teacher {args.teacher_heads} heads -> student {args.student_heads} heads, d = {args.head_dim}, "
            f"batch {args.batch}, T_a = 2, KL, lstsq alpha with the teacher's per-head outputs, no bias. "
            f"FLUX.1 joint attention: S = {args.text_tokens} text + S - {args.text_tokens} image tokens; the distilled "
            f"map is the N = S - {args.text_tokens} image-query rows over all M = S keys. "
            "Arithmetic columns: inputs = teacher q, k, v, per-head outputs, out-projection and student q, k in "
            "the input dtype; whole maps B x H x rows x keys x bytes; one block = c rows x M keys in float32; "
            "block budget model = (3 H_t + 6 H_s) x B x c x M x 4 bytes (auto_chunk_size's model, <= 256 MiB)."),
        "results": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
