"""The embedded SHD demo in one command: teacher -> students (none / kd / kd_shd) -> samples -> scores.

    python scripts/demo.py                      # CPU size -> results/demo/results.md
    python scripts/demo.py --size gpu --out results/demo_gpu      # the same study at scale, one GPU
    python scripts/demo.py --dry-run            # print the resolved settings and configs
    python scripts/demo.py --train-teacher      # train the teacher from scratch instead of the committed one
    python scripts/demo.py --teacher-only       # sample + score the teacher alone (its FID / precision / recall)
    python scripts/demo.py --study ablations --out results/ablations --report benchmarks/reports/ablations_cpu
                                                # the paper's ablations, 3 seeds each (~2 h on 2 cores)

Rerunning the same command reuses every finished stage (teacher, students, samples, scores) and
resumes an interrupted one. The pipeline lives in shd_diffusion/demo/ (the study in study.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Sequence

from shd_diffusion.cli import add_debug_flag, run_main
from shd_diffusion.demo.pipeline import describe, run_demo, score_teacher
from shd_diffusion.demo.settings import CONFIG_DIR, DEFAULT_INCEPTION_WEIGHTS, SIZES, DemoError, resolve_settings
from shd_diffusion.demo.study import describe_study, run_study, study_settings
from shd_diffusion.demo.teacher import export_teacher

__all__ = ["build_parser", "main"]


def _ints(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` -> (0, 1, 2)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _words(text: str) -> tuple[str, ...]:
    """``--modes none,kd`` -> ("none", "kd")."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    """The CLI; size-dependent defaults are listed per size in the help."""

    def per_size(field: str) -> str:
        return "default per size: " + ", ".join(f"{k} {getattr(v, field)}" for k, v in SIZES.items())

    p = argparse.ArgumentParser(
        prog="python scripts/demo.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder (default: results/demo)")
    p.add_argument("--size", choices=list(SIZES), default="cpu",
                   help="cpu: the committed teacher and small students on the CPU; gpu: hours on one GPU; "
                        "study: one short GPU call; tiny: smoke test (default: cpu)")
    p.add_argument("--modes", type=_words, default=None,
                   help="comma-separated distill.mode per student (default: none,kd,kd_shd)")
    p.add_argument("--seeds", type=_ints, default=None, help="comma-separated student seeds (" + per_size("seeds") + ")")
    p.add_argument("--num-samples", type=int, default=None, help="samples per run (" + per_size("num_samples") + ")")
    p.add_argument("--num-ref", type=int, default=None,
                   help="reference images from the training set, 0 = all 10,000 (" + per_size("num_ref") + ")")
    p.add_argument("--sampling-steps", type=int, default=None, help="respaced DDPM steps (" + per_size("sampling_steps") + ")")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (" + per_size("cfg_scale") + ")")
    p.add_argument("--inception-weights", type=Path, default=None,
                   help=f"converted offline Inception, made once if missing (default: {DEFAULT_INCEPTION_WEIGHTS})")
    p.add_argument("--train-teacher", action="store_true", default=None,
                   help="train the teacher from scratch (configs/demo_teacher.yaml) instead of starting from the "
                        "committed one in shd_diffusion/assets/demo_teacher (cpu size; gpu and tiny always train)")
    p.add_argument("--teacher-only", action="store_true",
                   help="only sample and score the teacher (-> <out>/teacher_scores.json, samples_teacher.png)")
    p.add_argument("--export-teacher", type=Path, default=None, metavar="CHECKPOINT",
                   help="write a teacher run's checkpoint as the committed demo teacher, then exit")
    p.add_argument("--train-time", type=float, default=None, metavar="SECONDS",
                   help="with --export-teacher: the wall time its training took, recorded in teacher.json")
    p.add_argument("--study", choices=["ablations"], default=None,
                   help="run a study instead of the demo: ablations = every arm of shd_diffusion/demo/study.py "
                        "(KD + SHD against KD, other squeeze rules, feature distillation, MSE, T_a, beta), 3 seeds")
    p.add_argument("--arms", type=_words, default=None, help="with --study: comma-separated subset of its arms")
    p.add_argument("--report", type=Path, default=None,
                   help="with --study: folder of the run records and the report (default: <out>/report); a rerun "
                        "skips the runs recorded there")
    p.add_argument("--device", default="auto", help="sampling/scoring device: auto, cpu or cuda (default: auto)")
    p.add_argument("--config-dir", type=Path, default=CONFIG_DIR, help="YAML configs (default: <repo>/configs)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and configs, then exit")
    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/demo.py`` / ``shd-demo``: 0 when done, 2 for bad input (one
    ``error:`` line; ``--debug``: traceback)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the study report quotes
    return run_main(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> None:
    """The command's work; its result goes to stdout, progress through ``console.say``."""
    if args.export_teacher is not None:
        print(json.dumps(export_teacher(args.export_teacher, train_time_s=args.train_time), indent=2))
        return
    if args.train_time is not None:
        raise DemoError("--train-time is recorded by --export-teacher only: add --export-teacher CHECKPOINT or drop it")
    if args.study is None and (args.arms is not None or args.report is not None):
        raise DemoError("--arms and --report belong to --study: add --study ablations or drop them")
    if args.study is not None:
        _run_study(args)
        return
    settings = resolve_settings(
        args.size, modes=args.modes, seeds=args.seeds, num_samples=args.num_samples, num_ref=args.num_ref,
        sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale, train_teacher=args.train_teacher,
    )
    if args.dry_run:
        print(describe(settings, args.out, args.config_dir))
    elif args.teacher_only:
        print(json.dumps(score_teacher(settings, args.out, args.inception_weights, args.device, not args.no_progress,
                                       args.config_dir), indent=2))
    else:
        run_demo(settings, args.out, args.inception_weights, args.device, not args.no_progress, args.config_dir)


def _run_study(args: argparse.Namespace) -> None:
    """``--study``: the ablation study (shd_diffusion/demo/study.py)."""
    if args.modes is not None or args.teacher_only:
        raise DemoError("--study runs its own arms: use --arms instead of --modes, and drop --teacher-only")
    settings = study_settings(
        args.size, seeds=args.seeds, num_samples=args.num_samples, num_ref=args.num_ref,
        sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale, train_teacher=args.train_teacher,
    )
    if args.dry_run:
        print(describe_study(settings, args.arms, args.out, args.config_dir))
        return
    command = "python scripts/demo.py " + " ".join(shlex.quote(a) for a in args.argv)
    run_study(settings, args.study, args.arms, args.out, args.report, args.inception_weights, args.device,
              not args.no_progress, args.config_dir, command)
