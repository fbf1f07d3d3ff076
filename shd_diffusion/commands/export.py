"""Export a trained student to the formats people deploy: diffusers folders and the Hub.

    python scripts/export.py CHECKPOINT --out DIR [--weights ema|raw] [--vae VAE] [--metrics scores.json] \
        [--push-to-hub org/name]
    python scripts/export.py runs/s2_from_b2/checkpoints/step_00400000.pt --out exports/s2_from_b2 \
        --metrics samples/s2_from_b2/metrics.json
    python scripts/export.py runs/pixart_student --out exports/pixart_student --metrics scores.json \
        [--pipeline PixArt-alpha/PixArt-Sigma-XL-2-512-MS] [--full-pipeline]

What the folder holds for each family, and how it loads: :mod:`shd_diffusion.export`.
Bad input (a non-empty ``--out``, unusable weights, a full disk) is one ``error:`` line and exit
code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
from typing import Sequence

from shd_diffusion.cli import add_debug_flag, run_main
from shd_diffusion.console import say
from shd_diffusion.export import export
from shd_diffusion.vae import DEFAULT_VAE

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/export.py`` / ``shd-export``."""
    p = argparse.ArgumentParser(prog="scripts/export.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="training checkpoint, official .pt, save_pretrained folder or Hub id")
    p.add_argument("--out", required=True, help="folder to create (must be absent or empty)")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA or raw training weights")
    p.add_argument("--vae", default=None, help=f"VAE folder or Hub id to ship in vae/ (latent models; default {DEFAULT_VAE})")
    p.add_argument("--pipeline", default=None, help="text-to-image students: the teacher's pipeline folder or Hub id "
                   "(default: the one recorded at training)")
    p.add_argument("--full-pipeline", action="store_true", help="text-to-image students: write a whole pipeline folder "
                   "(the teacher's text encoders, tokenizers, VAE and scheduler copied; the student as transformer/)")
    p.add_argument("--metrics", help="sampling.score --json output to put in the model card")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the exported folder to this Hub repo (org/name)")
    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/export.py`` / ``shd-export``: 0 when exported, 2 for bad input
    (one ``error:`` line; ``--debug``: traceback)."""
    args = build_parser().parse_args(argv)
    return run_main(lambda: _export(args), debug=args.debug)


def _export(args: argparse.Namespace) -> None:
    path = export(args.checkpoint, args.out, args.weights, args.vae, args.metrics, args.push_to_hub, args.pipeline,
                  args.full_pipeline)
    say(f"exported {args.checkpoint} to {path}")
