"""``shd-train`` / ``scripts/train_mdt_shd.py``: train a student diffusion transformer with KD / SHD.

    accelerate launch scripts/train_mdt_shd.py --config configs/mdtv2_s2_from_b2.yaml [key=value ...]
    python scripts/train_mdt_shd.py --config configs/demo_student.yaml --dry-run

Overrides are dotted config keys (``train.steps=1000 distill.shd_beta=0.25``). The run folder is
``train.output_dir/<train.run_name>``, or ``<config stem>[-<hash of the overrides>]`` without a
run name (``--dry-run`` prints it), and ``--resume auto`` (the default) continues from its latest
checkpoint, so a requeued job resumes itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import Sequence

from ..cli import BadInput, add_debug_flag, run_main
from ..config import dump_yaml, load_config
from ..train_config import ExperimentConfig
from ..training.run import run_dir_for, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``--config``, dotted overrides, resume / dry-run / step options.

    Overrides may come before or after the options (``--resume auto train.steps=10``): parse with
    ``parse_intermixed_args``.
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML experiment config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=1000")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (latest in the run folder), 'none', 'step=N' (that step of the run folder) "
                             "or a checkpoint path")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and run folder, then exit")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this invocation")
    parser.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    """Resolve the config and train (or print it); raises BadInput / Diverged / OSError on failure."""
    if args.max_steps is not None and args.max_steps < 1:
        raise BadInput(f"--max-steps must be >= 1, got {args.max_steps} (leave it out to train to train.steps)")
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    run_dir = run_dir_for(cfg, args.config, args.overrides)
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        print(f"# run folder: {run_dir}")
        return 0
    train(cfg, run_dir, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or resume) one training job; returns the exit code (2 = bad input, 3 = diverged run)."""
    args = build_parser().parse_intermixed_args(argv)
    return run_main(lambda: _run(args), debug=args.debug)
