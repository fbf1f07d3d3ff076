"""Encode an ImageNet-style folder into VAE latent shards (resumable; one or many GPUs).

Single process:
    python scripts/extract_latents.py --data /path/imagenet/train --out latents/ \
        --vae stabilityai/sd-vae-ft-ema --image-size 256 --batch-size 64 [--both-flips]

Several GPUs (shard i is encoded by rank i % world_size; rank 0 writes index.json at the end):
    accelerate launch --num_processes 8 scripts/extract_latents.py --data ... --out latents/

Rerunning the same command resumes: finished shards are skipped. The format and the encoding
choices are documented in shd_diffusion/latents.py (which does the encoding); this module is the
command line and the processes around it.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import torch

from shd_diffusion.cli import BadInput, add_debug_flag, check_writable_dir, run_main
from shd_diffusion.console import say
from shd_diffusion.latents import extract_latents, missing_shards, write_index
from shd_diffusion.vae import DEFAULT_VAE, SD_VAE_SCALE_FACTOR


__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/extract_latents.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="image folder with one sub-folder per class")
    p.add_argument("--out", required=True, help="output folder for shards and index.json")
    p.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder")
    p.add_argument("--image-size", type=int, default=256, help="ADM center-crop size")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--both-flips", action="store_true", help="also store latents of mirrored images")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    p.add_argument("--scale-factor", type=float, default=SD_VAE_SCALE_FACTOR, help="latent multiplier")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: this process's device, cuda if available)")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per process")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards per process")
    add_debug_flag(p)
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Refuse every value that is wrong on its own, before any image, VAE or file is touched."""
    for name in ("image_size", "batch_size", "shard_size"):
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise BadInput(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.max_shards is not None and args.max_shards <= 0:
        raise BadInput(f"--max-shards must be > 0 (or left out for all), got {args.max_shards}")
    if not math.isfinite(args.scale_factor) or args.scale_factor <= 0:
        raise BadInput(f"--scale-factor must be a finite number > 0, got {args.scale_factor}")
    if args.device is not None:  # a device this machine has (the scorer's rule: auto, cpu, cuda[:N])
        from shd_diffusion.evaluation.scoring import resolve_device

        args.device = resolve_device(args.device)
    check_writable_dir(args.out, "--out")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/extract_latents.py`` (also under ``accelerate launch``): run (or
    resume) the extraction on this process's shards; rank 0 finalises the index.

    Returns:
        0, or 2 after one ``error:`` line for bad input (``--debug`` shows the traceback).
    """
    args = build_parser().parse_args(argv)
    return run_main(lambda: _extract(args), debug=args.debug)


def _extract(args: argparse.Namespace) -> None:
    _check_args(args)
    from accelerate import PartialState  # one process under plain python, N under accelerate launch

    state = PartialState()
    try:
        _run(args, state)
        state.wait_for_everyone()  # tear down together (a rank leaving early can abort gloo)
    finally:
        state.destroy_process_group()  # a gloo/NCCL group left alive aborts the process at exit


def _run(args: argparse.Namespace, state: Any) -> None:
    device = torch.device(args.device) if args.device else state.device
    report = extract_latents(
        args.data,
        args.out,
        args.vae,
        image_size=args.image_size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        both_flips=args.both_flips,
        dtype=args.dtype,
        scale_factor=args.scale_factor,
        device=device,
        rank=state.process_index,
        world_size=state.num_processes,
        num_workers=args.num_workers,
        max_shards=args.max_shards,
        progress=state.is_main_process,
    )
    state.wait_for_everyone()  # every rank's shards are on disk before rank 0 looks
    if not state.is_main_process:
        return
    missing = missing_shards(args.out, report.num_shards)
    if missing:
        done = report.num_shards - len(missing)
        say(f"{done}/{report.num_shards} shards done; rerun the same command to continue")
        return
    index = report.index or write_index(args.out)
    say(
        f"{index['num_images']} latents {tuple(index['latent_shape'])} in {len(index['shards'])} shards "
        f"-> {args.out} (both_flips={index['both_flips']})"
    )

