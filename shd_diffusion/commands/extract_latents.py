"""Encode training data into latent shards (resumable; one or many GPUs): a class-folder with a VAE,
or image-caption data / a prompt list with a text-to-image teacher pipeline.

Class folders (one sub-folder per class, a VAE):
    python scripts/extract_latents.py --data /path/imagenet/train --out latents/ \
        --vae stabilityai/sd-vae-ft-ema --image-size 256 --batch-size 64 [--both-flips]

Image-caption data (images + metadata.jsonl lines {"file_name": ..., "text": ...}), encoded with the
teacher pipeline's own prompt encoding and VAE:
    python scripts/extract_latents.py --captions data/coco --pipeline PixArt-alpha/PixArt-Sigma-XL-2-512-MS \
        --out data/pixart_latents --image-size 512 [--pipeline-dtype bfloat16] [--max-sequence-length 300]

A prompt list only (the teacher renders one image per prompt into --images-out, then the same extraction):
    python scripts/extract_latents.py --prompts prompts.txt --pipeline black-forest-labs/FLUX.1-dev \
        --out data/flux_latents --image-size 512 --steps 28 --guidance 3.5 --seed 0

Several GPUs (shard i is encoded by rank i % world_size; rank 0 writes index.json at the end):
    accelerate launch --num_processes 8 scripts/extract_latents.py --data ... --out latents/

Rerunning the same command resumes: finished shards (and rendered images) are skipped. The formats
and the encoding choices are documented in shd_diffusion/latents.py and shd_diffusion/t2i_extract.py
(which do the work); this module is the command line and the processes around it.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import torch

from shd_diffusion.cli import BadInput, add_debug_flag, check_writable_dir, given_options, run_main
from shd_diffusion.console import say
from shd_diffusion.latents import extract_latents, missing_shards, write_index
from shd_diffusion.vae import DEFAULT_VAE, SD_VAE_SCALE_FACTOR


__all__ = ["build_parser", "main"]

_CLASS_ONLY = ("vae", "scale_factor", "num_workers")  # the class-folder mode's VAE and decoding workers
_TEXT_ONLY = ("pipeline", "pipeline_dtype", "max_sequence_length", "text_batch_size")
_PROMPTS_ONLY = ("images_out", "steps", "guidance", "seed")  # the teacher's rendering settings


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``scripts/extract_latents.py``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="class-conditional: image folder with one sub-folder per class")
    src.add_argument("--captions", help="text-to-image: imagefolder with images and metadata.jsonl "
                     '({"file_name": "0001.png", "text": "a caption"} per line); needs --pipeline')
    src.add_argument("--prompts", help="text-to-image: prompts file (one per line); the teacher renders one image "
                     "per prompt, then they are extracted; needs --pipeline")
    p.add_argument("--out", required=True, help="output folder for shards and index.json")
    p.add_argument("--image-size", type=int, default=256, help="ADM center-crop size (and rendered size with --prompts)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard")
    p.add_argument("--both-flips", action="store_true", help="also store latents of mirrored images")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored latent dtype")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: this process's device, cuda if available)")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards per process")
    g = p.add_argument_group("class folders (--data)")
    g.add_argument("--vae", default=None, help=f"AutoencoderKL hub id or local folder (default {DEFAULT_VAE})")
    g.add_argument("--scale-factor", type=float, default=None, help=f"latent multiplier (default {SD_VAE_SCALE_FACTOR})")
    g.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per process")
    g = p.add_argument_group("text-to-image (--captions / --prompts)")
    g.add_argument("--pipeline", help="teacher diffusers pipeline: Hub id or local folder (model_index.json); its "
                   "text encoders encode the captions, its VAE the images")
    g.add_argument("--pipeline-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="weight dtype of the pipeline's models")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help="caption tokens (default: the pipeline's encode_prompt default)")
    g.add_argument("--text-batch-size", type=int, default=1,
                   help="captions per encode_prompt call (1: each embedding bitwise what inference computes)")
    g = p.add_argument_group("prompts only (--prompts)")
    g.add_argument("--images-out", default=None, help="where the rendered images and metadata.jsonl go "
                   "(default: <out>_images beside --out)")
    g.add_argument("--steps", type=int, default=28, help="the pipeline's num_inference_steps")
    g.add_argument("--guidance", type=float, default=4.5, help="the pipeline's guidance_scale")
    g.add_argument("--seed", type=int, default=0, help="base seed; image i uses derive_seed('t2i-prompts', seed, i)")
    add_debug_flag(p)
    return p


def _mode(args: argparse.Namespace) -> str:
    return "captions" if args.captions else "prompts" if args.prompts else "data"


def _check_modes(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse a flag that belongs to another mode (one line naming it and the mode it belongs to)."""
    mode = _mode(args)
    flag = {"data": "--data", "captions": "--captions", "prompts": "--prompts"}[mode]
    wrong = {"data": (*_TEXT_ONLY, *_PROMPTS_ONLY), "captions": (*_CLASS_ONLY, *_PROMPTS_ONLY),
             "prompts": _CLASS_ONLY}[mode]
    for name in wrong:
        if name in given:
            option = "--" + name.replace("_", "-")
            if name in _CLASS_ONLY:
                why = "the pipeline's own VAE and latent normalisation are used" if name != "num_workers" else \
                      "images are read in the main process"
                raise BadInput(f"{option} is for class folders (--data); with {flag} {why}: drop {option}")
            owner = "--prompts" if name in _PROMPTS_ONLY else "--captions / --prompts"
            raise BadInput(f"{option} belongs to {owner}, not {flag}: drop {option}")
    if mode == "prompts":
        for name in ("both_flips", "text_batch_size", "max_shards"):
            if name in given:
                option = "--" + name.replace("_", "-")
                raise BadInput(f"{option} is not taken with --prompts (each rendered image is encoded once, each "
                               f"prompt alone, all shards in one run): drop {option}")
    if mode != "data" and not args.pipeline:
        raise BadInput(f"{flag} needs --pipeline ID|DIR: the teacher pipeline whose encoders make the training data")


def _check_args(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse every value that is wrong on its own, before any image, VAE or file is touched."""
    _check_modes(args, given)
    for name in ("image_size", "batch_size", "shard_size", "text_batch_size", "steps"):
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.num_workers < 0:
        raise BadInput(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.max_shards is not None and args.max_shards <= 0:
        raise BadInput(f"--max-shards must be > 0 (or left out for all), got {args.max_shards}")
    if args.max_sequence_length is not None and args.max_sequence_length <= 0:
        raise BadInput(f"--max-sequence-length must be > 0 (or left out for the pipeline's default), "
                       f"got {args.max_sequence_length}")
    if args.scale_factor is not None and (not math.isfinite(args.scale_factor) or args.scale_factor <= 0):
        raise BadInput(f"--scale-factor must be a finite number > 0, got {args.scale_factor}")
    if not math.isfinite(args.guidance):
        raise BadInput(f"--guidance must be a finite number, got {args.guidance}")
    if args.seed < 0:
        raise BadInput(f"--seed must be >= 0, got {args.seed}")
    if args.device is not None:  # a device this machine has (the scorer's rule: auto, cpu, cuda[:N])
        from shd_diffusion.evaluation.scoring import resolve_device

        args.device = resolve_device(args.device)
    check_writable_dir(args.out, "--out")
    if args.images_out is not None:
        check_writable_dir(args.images_out, "--images-out")
    if args.prompts:  # an empty or missing prompts file is refused before the pipeline loads
        from shd_diffusion.t2i_extract import read_prompts

        read_prompts(args.prompts)
    if args.captions:  # captions missing for images, bad lines: refused before the pipeline loads
        from shd_diffusion.t2i_extract import read_caption_folder

        read_caption_folder(args.captions)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python scripts/extract_latents.py`` (also under ``accelerate launch``): run (or
    resume) the extraction on this process's shards; rank 0 finalises the index.

    Returns:
        0, or 2 after one ``error:`` line for bad input (``--debug`` shows the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _extract(args, given_options(parser, argv)), debug=args.debug)


def _extract(args: argparse.Namespace, given: set[str]) -> None:
    _check_args(args, given)
    from accelerate import PartialState  # one process under plain python, N under accelerate launch

    state = PartialState()
    try:
        (_run if args.data else _run_text)(args, state)
        state.wait_for_everyone()  # tear down together (a rank leaving early can abort gloo)
    finally:
        state.destroy_process_group()  # a gloo/NCCL group left alive aborts the process at exit


def _run(args: argparse.Namespace, state: Any) -> None:
    device = torch.device(args.device) if args.device else state.device
    report = extract_latents(
        args.data,
        args.out,
        args.vae or DEFAULT_VAE,
        image_size=args.image_size,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        both_flips=args.both_flips,
        dtype=args.dtype,
        scale_factor=SD_VAE_SCALE_FACTOR if args.scale_factor is None else args.scale_factor,
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


def _run_text(args: argparse.Namespace, state: Any) -> None:
    """--captions / --prompts: the teacher pipeline's encoders; rank 0 finishes the index after a barrier."""
    from shd_diffusion.latents import finish_text_latents
    from shd_diffusion.t2i_extract import extract_text_latents, generate_text_latents, load_teacher_pipeline

    device = torch.device(args.device) if args.device else state.device
    common = dict(image_size=args.image_size, batch_size=args.batch_size, shard_size=args.shard_size,
                  dtype=args.dtype, max_sequence_length=args.max_sequence_length, device=device,
                  rank=state.process_index, world_size=state.num_processes, progress=state.is_main_process)
    if args.captions:
        report = extract_text_latents(args.captions, args.out, args.pipeline, text_batch_size=args.text_batch_size,
                                      pipeline_dtype=args.pipeline_dtype, both_flips=args.both_flips,
                                      max_shards=args.max_shards, **common)
    else:
        pipe = load_teacher_pipeline(args.pipeline, transformer=True, device=device, dtype=args.pipeline_dtype)
        report = generate_text_latents(args.prompts, args.out, pipe, images_dir=args.images_out,
                                       num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                       barrier=state.wait_for_everyone, **common)
    state.wait_for_everyone()  # every rank's shards are on disk before rank 0 looks
    if not state.is_main_process:
        return
    missing = missing_shards(args.out, report.num_shards)
    if missing:
        say(f"{report.num_shards - len(missing)}/{report.num_shards} shards done; rerun the same command to continue")
        return
    index = report.index or finish_text_latents(args.out)
    say(f"{index['num_images']} text latents in {len(index['shards'])} shards "
        f"-> {args.out} (pipeline {args.pipeline})")
