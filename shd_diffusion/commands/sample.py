"""``python -m sampling.sample``: sample N class-conditional images from a DiT / MDTv2 checkpoint
into an ADM-format ``.npz`` (command line only; the sampler and how a checkpoint becomes one are
:mod:`shd_diffusion.sampler`, the resumable run folder :mod:`shd_diffusion.shards`).

Usage (defaults are the paper's evaluation setting: 50,000 images, 250 DDPM steps, CFG 3.8)::

    accelerate launch -m sampling.sample --checkpoint PATH --model MDTv2-S/2 --out DIR
    python -m sampling.sample --checkpoint PATH --model MDTv2-S/2 --out DIR      # one process
    python -m sampling.sample --checkpoint PATH --out DIR --sampler ddim          # DDIM, eta 0
    python -m sampling.sample --assemble DIR                                      # only assemble

Text-to-image (the teacher's diffusers pipeline with the student as its transformer; the pipeline's own
scheduler, guidance, text encoders and VAE; :mod:`shd_diffusion.t2i_sampling`)::

    accelerate launch -m sampling.sample --pipeline PixArt-alpha/PixArt-Sigma-XL-2-512-MS \
        --checkpoint runs/pixart_student --prompts coco30k.txt --out samples/pixart_student \
        [--num-samples N] [--steps 20] [--guidance-scale 4.5] [--height 512 --width 512] \
        [--dtype bfloat16] [--pipeline-arg max_sequence_length=300 ...]

Image i renders prompt i % P with its own seed; the sample file holds ``prompts`` beside ``arr_0``
(CLIP score reads them). A flag of one mode given in the other is refused with one line.

Indices are cut into fixed shards (``--shard-size``) and batches are formed *within* a shard, so
for a given (shard size, batch size) every image is computed in the same batch whatever the
number of processes, hence bitwise identical for any process count (same device type and
software stack). The batch size itself can change the last bits: matrix kernels choose their
blocking by the number of rows, on CPU as on GPU (measured on CPU with demo-sized models,
batch 2 vs 3: final samples up to 4e-5 apart, enough to move a pixel across a uint8 rounding
boundary now and then). So the batch size is recorded in the manifest, and a resume with
another one is refused. The weights are recorded by content (``weights_sha256`` of the state dict
actually sampled, :func:`shd_diffusion.models.loading.weights_sha256`), not only by path: other
weights put at the same path are refused on resume, so one ``.npz`` never mixes two models.

``--compile`` wraps the model in ``torch.compile(mode=--compile-mode)``; ``reduce-overhead`` (and
``max-autotune``) replay CUDA graphs, which removes the per-kernel launch cost that dominates small
models like S/2. Only the network is compiled: guidance, noise and the update stay eager.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from shd_diffusion.cli import BadInput, add_debug_flag, check_writable_dir, given_options, run_main
from shd_diffusion.console import say
from shd_diffusion.sampler import (
    COMPILE_MODES,
    DIFFUSION_STEPS,
    GUIDANCE_SCHEDULES,
    SAMPLERS,
    Sampler,
    SamplingSpec,
    sampler_from_checkpoint,
)
from shd_diffusion.shards import assemble, check_manifest, read_manifest, run_shards, shard_manifest
from shd_diffusion.vae import DEFAULT_VAE

__all__ = ["build_parser", "main", "parse_model_arg"]

# Flags of one mode only (argparse dest names); the rest (--checkpoint, --out, --num-samples, --steps,
# --seed, --use-ema, --batch-size, --shard-size, --png-dir, --no-assemble, --dist-timeout-min) are shared.
_CLASS_ONLY = ("model", "model_arg", "vae", "sampler", "ddim_eta", "cfg_scale", "guidance_schedule", "scale_pow",
               "guidance_channels", "labels", "clip_denoised", "precision", "compile", "compile_mode", "vae_batch_size")
_T2I_ONLY = ("prompts", "guidance_scale", "height", "width", "dtype", "pipeline_arg")
_T2I_DTYPES = ("float32", "float16", "bfloat16")
# Shared flags whose default differs with --pipeline (the parser holds the class-conditional ones).
_T2I_DEFAULTS = {"num_samples": None, "steps": None, "batch_size": 16}  # None: one per prompt / the pipeline's


def parse_model_arg(text: str) -> tuple[str, Any]:
    """``--model-arg KEY=VALUE`` -> (key, YAML-parsed value); also used by the benchmarks."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def parse_pipeline_arg(text: str) -> tuple[str, Any]:
    """``--pipeline-arg KEY=JSON`` -> (key, JSON value), e.g. ``max_sequence_length=300``, ``negative_prompt="blurry"``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=JSON, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not JSON (quote strings: "
                                         f"{key.strip()}='\"{value}\"')") from None


def _guidance_channels_arg(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected >= 1 or 'all', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sampling.sample`` argument parser (every default shown by ``--help``)."""
    from shd_diffusion.models.registry import MODEL_NAMES

    p = argparse.ArgumentParser(
        prog="python -m sampling.sample",
        description="Sample class-conditional images from a DiT/MDTv2 checkpoint into sharded, resumable "
        "output and assemble ADM's samples_{N}x{H}x{W}x3.npz. Run under `accelerate launch` for several GPUs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="official .pt (DiT EMA / MDT dict), a training checkpoint of this package, a save_pretrained or "
                   "diffusers DiT (pipeline) folder, or a Hub id org/repo[@revision][:path]")
    g.add_argument("--model", choices=MODEL_NAMES, metavar="NAME", help=f"registry name, needed for official files ({', '.join(MODEL_NAMES)})")
    g.add_argument("--model-arg", action="append", default=[], type=parse_model_arg, metavar="KEY=VALUE",
                   help="constructor override for --model (repeatable), e.g. input_size=8")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights of a checkpoint that has them")
    g.add_argument("--vae", default="auto", help=f"'auto' (none for 1/3-channel pixel models, {DEFAULT_VAE} for 4-channel latents), 'none', a hub id or a local folder")

    g = p.add_argument_group("sampling")
    g.add_argument("--num-samples", type=int, default=50_000,
                   help="N: images 0..N-1 (with --pipeline the default is one image per prompt)")
    g.add_argument("--steps", type=int, default=250, help="respaced steps (ADM respacing of 1000); with --pipeline the "
                   "pipeline's num_inference_steps, default the pipeline's own")
    g.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm: ancestral steps (the paper's setting); ddim: DDIM over the same respaced steps")
    g.add_argument("--ddim-eta", type=float, default=0.0, help="DDIM stochasticity with --sampler ddim (0 = deterministic given x_T)")
    g.add_argument("--cfg-scale", type=float, default=3.8, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="auto",
                   help="auto: power-cosine for MDTv2, constant for DiT")
    g.add_argument("--scale-pow", type=float, default=4.0, help="power of the power-cosine schedule")
    g.add_argument("--guidance-channels", type=_guidance_channels_arg, default=3,
                   help="guide only the first K eps channels (3 = upstream quirk for 4-channel latents) or 'all'")
    g.add_argument("--labels", choices=["balanced", "uniform"], default="balanced",
                   help="balanced: label(i) = i %% num_classes; uniform: seeded uniform draw per index")
    g.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed hash(seed, i)")
    g.add_argument("--clip-denoised", choices=["auto", "on", "off"], default="auto",
                   help="clamp predicted x_0 to [-1, 1] each step; auto: on for pixel models, off for latents")

    g = p.add_argument_group("text-to-image (--pipeline)")
    g.add_argument("--pipeline", help="teacher diffusers pipeline (Hub id org/repo[@revision] or folder): renders with "
                   "--checkpoint (a text-to-image training checkpoint, its run folder, or a transformer folder) as its "
                   "transformer")
    g.add_argument("--prompts", help="prompts file: .txt (one per line), .jsonl (text / prompt / caption field) or "
                   ".json list; image i renders prompt i %% P")
    g.add_argument("--guidance-scale", type=float, default=None, help="the pipeline's guidance_scale (default: the pipeline's)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    g.add_argument("--dtype", choices=_T2I_DTYPES, default="float32", help="dtype of the pipeline's models")
    g.add_argument("--pipeline-arg", action="append", default=[], type=parse_pipeline_arg, metavar="KEY=JSON",
                   help="further pipeline(...) argument (repeatable), e.g. max_sequence_length=300 "
                   "or negative_prompt='\"blurry\"'; recorded in the manifest")

    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=250,
                   help="images per batch per process (the model sees 2x with CFG; with --pipeline the default is 16)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 autocast on CUDA, fp32 elsewhere")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (first batch pays compilation)")
    g.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode with --compile: reduce-overhead = CUDA graphs (removes kernel-launch "
                   "overhead; one graph per batch shape, so keep --shard-size a multiple of --batch-size); "
                   "max-autotune = also autotuned GEMMs (long first compile)")
    g.add_argument("--vae-batch-size", type=int, default=32, help="latents decoded per VAE call")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder: shards/, then samples_{N}x{H}x{W}x3.npz")
    g.add_argument("--shard-size", type=int, default=1000, help="images per shard (the unit of resume)")
    g.add_argument("--png-dir", help="also write every image as {index:06d}.png here when assembling")
    g.add_argument("--no-assemble", action="store_true", help="only write shards (assemble later with --assemble)")
    g.add_argument("--assemble", metavar="DIR", help="only check DIR's shards and write the .npz, then exit")
    g.add_argument("--dist-timeout-min", type=float, default=24 * 60,
                   help="collective timeout: ranks that finish early wait at the final barrier for the others")
    add_debug_flag(p)
    return p


def _check_modes(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse a flag of the other mode (class-conditional vs --pipeline) with one line naming it."""
    t2i = bool(args.pipeline) or "pipeline" in given
    for name in (_CLASS_ONLY if t2i else _T2I_ONLY):
        if name in given:
            option = "--" + name.replace("_", "-")
            if t2i:
                hint = " (the pipeline's guidance: --guidance-scale)" if name == "cfg_scale" else ""
                raise BadInput(f"{option} is for class-conditional checkpoints, not --pipeline{hint}: drop {option}")
            raise BadInput(f"{option} is for text-to-image sampling: add --pipeline TEACHER (and --prompts FILE), "
                           f"or drop {option}")
    if t2i and not args.prompts:
        raise BadInput("--pipeline needs --prompts FILE: the prompts to render (.txt one per line, .jsonl or .json)")


def _check_args(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse every command-line value that is wrong on its own, before anything is loaded or written."""
    if args.assemble:
        if args.png_dir:
            check_writable_dir(args.png_dir, "--png-dir")
        return
    _check_modes(args, given)
    mode = "t2i" if args.pipeline else "class"
    if mode == "t2i":
        for name, value in _T2I_DEFAULTS.items():
            if name not in given:
                setattr(args, name, value)
    if not args.checkpoint or not args.out:
        raise BadInput("--checkpoint and --out are required (or --assemble DIR to only assemble)")
    if args.model_arg and Path(args.checkpoint).is_dir():
        raise BadInput(f"--model-arg applies to checkpoint files only: the folder {args.checkpoint} names its own "
                       "architecture in config.json; drop --model-arg")
    if args.ddim_eta != 0.0 and args.sampler != "ddim":
        raise BadInput(f"--ddim-eta {args.ddim_eta} needs --sampler ddim")
    if not math.isfinite(args.ddim_eta) or args.ddim_eta < 0:
        raise BadInput(f"--ddim-eta must be a finite number >= 0, got {args.ddim_eta}")
    if args.compile_mode != "default" and not args.compile:
        raise BadInput(f"--compile-mode {args.compile_mode} needs --compile")
    for name in ("num_samples", "steps", "batch_size", "shard_size", "vae_batch_size", "height", "width"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise BadInput(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if mode == "class" and args.steps > DIFFUSION_STEPS:
        raise BadInput(f"--steps {args.steps}: respacing can keep at most the models' {DIFFUSION_STEPS} steps")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 1:
        raise BadInput(f"--cfg-scale must be a finite number >= 1 (1 = no guidance), got {args.cfg_scale}")
    if not math.isfinite(args.scale_pow) or args.scale_pow <= 0:
        raise BadInput(f"--scale-pow must be a finite number > 0, got {args.scale_pow}")
    if not 0 <= args.seed < 2**64:
        raise BadInput(f"--seed must be in [0, 2^64), got {args.seed}")
    if not math.isfinite(args.dist_timeout_min) or args.dist_timeout_min <= 0:
        raise BadInput(f"--dist-timeout-min must be a finite number > 0, got {args.dist_timeout_min}")
    check_writable_dir(args.out, "--out")
    if args.png_dir:
        check_writable_dir(args.png_dir, "--png-dir")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m sampling.sample`` / ``accelerate launch -m sampling.sample`` / ``shd-sample``.

    Returns:
        0, or 2 after one ``error:`` line for bad input (``--debug`` shows the traceback).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(lambda: _sample(args, given_options(parser, argv)), debug=args.debug)


def _assemble_only(folder: str, png_dir: str | None) -> Path:
    """--assemble: a text-to-image folder (its manifest records prompts) gets its prompts in the file."""
    if "prompts_sha256" in read_manifest(folder):
        from shd_diffusion.t2i_sampling import assemble_prompts

        return assemble_prompts(folder, png_dir=png_dir)
    return assemble(folder, png_dir=png_dir)


def _sample(args: argparse.Namespace, given: set[str]) -> int:
    """Validate everything, then sample and assemble (the body of :func:`main`)."""
    _check_args(args, given)
    if args.assemble:
        say(f"wrote {_assemble_only(args.assemble, args.png_dir)}")
        return 0
    if args.pipeline:
        return _sample_prompts(args)
    from accelerate import Accelerator, InitProcessGroupKwargs

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout_min))])
    is_main = accelerator.is_main_process
    sampler, settings = _build_sampler(args, accelerator.device, is_main)
    batch_size = min(args.batch_size, args.shard_size)
    # The last refusal that needs no writing: a folder sampled with other settings.
    check_manifest(args.out, shard_manifest(sampler, settings, args.num_samples, args.shard_size, batch_size))
    say(f"sampling {args.num_samples} images with {accelerator.num_processes} process(es) into {args.out}: "
        + json.dumps({**settings, **sampler.stream_fields()}))
    start = time.time()
    run_shards(
        sampler, args.out, args.num_samples, args.shard_size, batch_size,
        rank=accelerator.process_index, world_size=accelerator.num_processes, manifest=settings,
        show_progress=is_main,
    )
    accelerator.wait_for_everyone()  # every shard is on disk before the main process assembles
    if is_main:
        say(f"all shards done in {time.time() - start:.0f} s")
        if not args.no_assemble:
            say(f"wrote {assemble(args.out, png_dir=args.png_dir)}")
    accelerator.wait_for_everyone()  # tear down together (a rank leaving early can abort gloo)
    accelerator.end_training()  # destroys the process group (one left alive aborts at exit)
    return 0


def _build_sampler(args: argparse.Namespace, device: torch.device, is_main: bool) -> tuple[Sampler, dict[str, Any]]:
    """The sampler the arguments describe, and the settings that define its pixels (the manifest)."""
    spec = SamplingSpec(
        checkpoint=args.checkpoint, model=args.model, model_args=dict(args.model_arg), use_ema=args.use_ema,
        vae=args.vae, steps=args.steps, method=args.sampler, ddim_eta=args.ddim_eta, cfg_scale=args.cfg_scale,
        guidance_schedule=args.guidance_schedule, scale_pow=args.scale_pow, guidance_channels=args.guidance_channels,
        labels=args.labels, seed=args.seed, clip_denoised=args.clip_denoised, precision=args.precision,
        compile=args.compile, compile_mode=args.compile_mode, vae_batch_size=args.vae_batch_size,
    )
    sampler, settings = sampler_from_checkpoint(spec, device, verbose=is_main)
    if args.shard_size % min(args.batch_size, args.shard_size):
        say(f"note: --shard-size {args.shard_size} is not a multiple of --batch-size {args.batch_size}: "
            "each shard ends with a smaller batch (slower; with --compile also a recompile)")
    return sampler, settings


def _sample_prompts(args: argparse.Namespace) -> int:
    """--pipeline: prompts through the teacher's pipeline with the student swapped in (t2i_sampling)."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    from shd_diffusion import t2i_sampling as ts

    prompts = ts.read_prompts(args.prompts)  # refused before any model is read
    config = ts.teacher_transformer_config(args.pipeline)  # config.json only: an unsupported class is one line
    dtype = getattr(torch, args.dtype)
    student, info = ts.load_student(args.checkpoint, config, use_ema=args.use_ema, dtype=dtype)
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout_min))])
    is_main = accelerator.is_main_process
    pipe = ts.load_pipeline(args.pipeline, student, dtype=dtype).to(accelerator.device)
    sampler = ts.PromptSampler(pipe, prompts, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                               seed=args.seed, height=args.height, width=args.width,
                               pipeline_kwargs=dict(args.pipeline_arg))
    n = len(prompts) if args.num_samples is None else args.num_samples
    batch_size = min(args.batch_size, args.shard_size)
    say(f"sampling {n} images of {len(prompts)} prompts with {accelerator.num_processes} process(es) into {args.out}: "
        f"{type(pipe).__name__}, student {info.get('source')} ({info.get('weights')}), steps "
        f"{sampler.num_inference_steps}, guidance {sampler.guidance_scale}")
    start = time.time()
    ts.sample_prompts(sampler, args.out, num_samples=n, teacher=args.pipeline, checkpoint=args.checkpoint,
                      shard_size=args.shard_size, batch_size=batch_size, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, show_progress=is_main)
    accelerator.wait_for_everyone()  # every shard is on disk before the main process assembles
    if is_main:
        say(f"all shards done in {time.time() - start:.0f} s")
        if not args.no_assemble:
            say(f"wrote {ts.assemble_prompts(args.out, png_dir=args.png_dir)}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0
