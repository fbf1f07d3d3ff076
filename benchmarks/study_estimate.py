#!/usr/bin/env python
"""Expected GPU time per stage of ``benchmarks/gpu_study.sh``, from counts measured on the CPU.

    python benchmarks/study_estimate.py [--json results/study_estimate.json] [--size tiny]

What is measured here (CPU, the study's real model shapes from configs/demo_study_*.yaml, batch
``--batch``): per training step of the teacher and of each student mode, the FLOPs
(``torch.utils.flop_counter``: matmuls, convolutions, attention) and the number of aten operator
calls (a dispatch-mode counter: about one GPU kernel launch each), scaled linearly to the config's
global batch (256 in the study; FLOPs) or kept per step (launches); the CPU wall time of that
toy-batch step; per sampling step of one image with CFG (2 model rows) the same counts; and the
FLOPs of one Inception forward at 299 x 299.

What is assumed (not measured: no GPU was lent): a stage's time is the larger of FLOPs /
``--tflops`` (sustained bf16 TFLOP/s; default 150, ~19% of the H200's ~790 dense peak, for
models 96-192 wide whose matmuls are too small to fill the GPU) and launches x ``--launch-us``
(default 8 us per kernel, eager PyTorch). Inception runs in float32 (TF32) at ``--inception-tflops``
(default 100). Set-up (wheel install, imports, data) is a flat ``--setup-s`` (default 40).
``--size tiny`` counts the demo's smoke size instead (tests/test_study_estimate.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shd_diffusion import demo  # noqa: E402
from shd_diffusion.cli import BadInput, add_debug_flag, check_writable_file, run_main  # noqa: E402
from shd_diffusion.fileio import atomic_write_text  # noqa: E402

TRAINING_IMAGES = 10_000  # Animal-MNIST's training set: the reference when num_ref is 0 (all)


class _OpCounter(TorchDispatchMode):
    """Counts aten operator calls (on a GPU: roughly one kernel launch each)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.calls += 1
        return func(*args, **(kwargs or {}))


def _counts(fn) -> tuple[float, int, float]:  # noqa: ANN001
    """(FLOPs, aten calls, CPU seconds) of one call of ``fn`` (after one warm-up call)."""
    fn()
    flops = FlopCounterMode(display=False)
    with flops:
        fn()
    ops = _OpCounter()
    with ops:
        fn()
    t0 = time.perf_counter()
    fn()
    return float(flops.get_total_flops()), ops.calls, time.perf_counter() - t0


def train_counts(cfg, batch: int, work: Path) -> dict:  # noqa: ANN001
    """Counts of one ``Trainer.train_step`` of ``cfg`` at ``batch`` images."""
    from accelerate.state import AcceleratorState, GradientState

    from shd_diffusion.training import Trainer, make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg.train.global_batch_size = batch
    cfg.train.output_dir = str(work)
    acc = make_accelerator(cfg, work, log=False)
    trainer = Trainer(cfg, work / (cfg.train.run_name or "run"), acc)
    gen = torch.Generator().manual_seed(0)
    side = cfg.student.input_size
    x0 = torch.randn(batch, cfg.student.in_channels, side, side, generator=gen)
    y = torch.randint(0, cfg.student.num_classes, (batch,), generator=gen)
    batches = itertools.repeat((x0, y))
    flops, calls, seconds = _counts(lambda: trainer.train_step(batches))
    return {"flops_per_image": flops / batch, "launches_per_step": calls, "cpu_s_per_step": seconds, "cpu_batch": batch}


def sample_counts(cfg) -> dict:  # noqa: ANN001
    """Counts of one guided denoiser call (CFG: conditional + null row) for one image."""
    from shd_diffusion.training import build_model

    model = build_model(cfg.student).eval()
    side = cfg.student.input_size
    x = torch.randn(2, cfg.student.in_channels, side, side)
    t = torch.tensor([500, 500])
    y = torch.tensor([0, model.null_class])
    with torch.no_grad():
        flops, calls, seconds = _counts(lambda: model(x, t, y))
    return {"flops_per_image_step": flops, "launches_per_step": calls, "cpu_s": seconds}


def inception_flops() -> float:
    """FLOPs of one 299 x 299 Inception-v3 forward (torchvision's, random weights: the FID network's
    layers, which torch-fidelity builds only with its weights file)."""
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    with torch.no_grad():
        flops, _, _ = _counts(lambda: net(torch.zeros(1, 3, 299, 299)))
    return flops


def _stage(flops: float, launches: int, args: argparse.Namespace, tflops: float | None = None) -> float:
    """Seconds: the larger of the compute time and the launch-overhead time."""
    return max(flops / ((tflops or args.tflops) * 1e12), launches * args.launch_us * 1e-6)


def estimate(args: argparse.Namespace) -> dict:
    """Counts per stage and the expected GPU seconds of the ``args.size`` study (module docstring).

    Returns:
        {"size", "assumptions", "counts", "stages": [{"stage", "work", "expected_s"}], "total_s"};
        seconds unrounded, so the arithmetic can be checked from the counts.
    """
    s = demo.resolve_settings(args.size)
    rows, counts = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tcfg = demo.teacher_config(s, work)
        steps_t, batch_t = tcfg.train.steps, tcfg.train.global_batch_size
        counts["teacher"] = c = train_counts(demo.teacher_config(s, work), args.batch, work / "t")
        rows.append(("teacher", f"{steps_t} steps x batch {batch_t}",
                     steps_t * _stage(c["flops_per_image"] * batch_t, c["launches_per_step"], args)))
        from shd_diffusion.training import build_model

        ckpt = work / "teacher.pt"
        torch.save(build_model(tcfg.student).state_dict(), ckpt)
        for mode in s.modes:
            scfg = demo.student_config(s, mode, 0, tcfg, ckpt, work)
            steps, batch = scfg.train.steps, scfg.train.global_batch_size
            counts[mode] = c = train_counts(scfg, args.batch, work / mode)
            rows.append((f"students {mode} ({len(s.seeds)} seeds)", f"{steps} steps x batch {batch} each",
                         len(s.seeds) * steps * _stage(c["flops_per_image"] * batch, c["launches_per_step"], args)))
        runs = len(s.modes) * len(s.seeds)
        per_batch = min(s.sample_batch_size, s.shard_size)
        for name, cfg, n_runs in (("student", scfg, runs), ("teacher", tcfg, 1)):
            counts[f"sample_{name}"] = c = sample_counts(cfg)
            n_batches = -(-s.num_samples // per_batch)
            sec = n_runs * n_batches * s.sampling_steps * _stage(
                c["flops_per_image_step"] * per_batch, c["launches_per_step"], args)
            rows.append((f"sampling {name} ({n_runs} run{'s' if n_runs > 1 else ''})",
                         f"{s.num_samples} images x {s.sampling_steps} CFG steps each", sec))
    counts["inception_flops_per_image"] = f_inc = inception_flops()
    n_ref = s.num_ref or TRAINING_IMAGES
    n_images = (runs + 1) * s.num_samples + n_ref
    rows.append(("scoring", f"{n_images:,} Inception forwards ({runs + 1} sample sets + {n_ref:,} reference images)",
                 n_images * f_inc / (args.inception_tflops * 1e12)))
    rows.insert(0, ("set-up", "wheel install, imports, data (flat)", float(args.setup_s)))
    return {"size": s.size,
            "assumptions": {"tflops": args.tflops, "launch_us": args.launch_us,
                            "inception_tflops": args.inception_tflops, "setup_s": args.setup_s},
            "counts": counts, "stages": [{"stage": a, "work": b, "expected_s": c} for a, b, c in rows],
            "total_s": sum(r[2] for r in rows)}


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before any counting, values the arithmetic cannot use.

    Raises:
        BadInput: a count below 1, a rate not above 0, a negative time, or an unwritable ``--json``.
    """
    for name in ("batch", "threads"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("tflops", "inception_tflops"):
        if not getattr(args, name) > 0:  # also refuses nan
            raise BadInput(f"--{name.replace('_', '-')} must be > 0 (a sustained rate), got {getattr(args, name)}")
    for name in ("launch_us", "setup_s"):
        if not getattr(args, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0 seconds, got {getattr(args, name)}")
    if args.json is not None:
        check_writable_file(args.json, "--json")


def _run(args: argparse.Namespace) -> int:
    check_args(args)
    torch.set_num_threads(args.threads)
    rep = estimate(args)
    print(json.dumps(rep["counts"], indent=1))
    print("| stage | work | expected GPU s |\n|---|---|---|")
    for r in rep["stages"]:
        print(f"| {r['stage']} | {r['work']} | {r['expected_s']:.0f} |")
    print(f"| total | | {rep['total_s']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(rep, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(demo.SIZES), default="study", help="demo size to count (default study)")
    p.add_argument("--batch", type=int, default=2, 
                   help="images per counted CPU step (FLOPs are scaled to the config's batch)")
    p.add_argument("--tflops", type=float, default=150.0, help="assumed sustained bf16 TFLOP/s (default 150)")
    p.add_argument("--launch-us", type=float, default=8.0, 
                   help="assumed microseconds per aten call, one kernel launch (default 8)")
    p.add_argument("--inception-tflops", type=float, default=100.0, help="assumed TF32 TFLOP/s of the Inception")
    p.add_argument("--setup-s", type=float, default=40.0, help="flat set-up seconds (default 40)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the counted steps (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the report (counts, stages) as JSON here")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return run_main(lambda: _run(args), debug=args.debug, expected=(demo.DemoError,))


if __name__ == "__main__":
    sys.exit(main())
