"""Sample N class-conditional images from a DiT / MDTv2 checkpoint into an ADM-format ``.npz``.

Usage (defaults are the paper's evaluation setting: 50,000 images, 250 DDPM steps, CFG 3.8)::

    accelerate launch -m sampling.sample --checkpoint PATH --model MDTv2-S/2 --out DIR
    python -m sampling.sample --checkpoint PATH --model MDTv2-S/2 --out DIR      # one process
    python -m sampling.sample --assemble DIR                                      # only assemble

Rules that make the result reproducible (see also :mod:`sampling.shards`):

* Image ``i`` gets its class label from :func:`class_labels` (default ``"balanced"``:
  ``label(i) = i % num_classes``; ``"uniform"``: a seeded hash of ``(seed, i)`` mod
  ``num_classes``) and *all* of its noise from its own ``torch.Generator`` seeded with
  :func:`image_seeds` ``(seed, i)``: first x_T (``randn((C, H, W))``), then the ancestral noise in
  blocks of ``NOISE_BLOCK_STEPS`` = 25 steps (``randn((k, C, H, W))`` per block, see
  :meth:`GaussianDiffusion.p_sample_loop`), so a batch of B images costs B generator calls per
  25 steps rather than per step. Nothing depends on which process or which batch the image lands in.
* Indices are cut into fixed shards (``--shard-size``) and batches are formed *within* a shard, so
  for a given (shard size, batch size) every image is computed in the same batch whatever the
  number of processes, hence bitwise identical for any process count (same device type and
  software stack). The batch size itself can change the last bits: matrix kernels choose their
  blocking by the number of rows, on CPU as on GPU (measured on CPU with demo-sized models,
  batch 2 vs 3: final samples up to 4e-5 apart, enough to move a pixel across a uint8 rounding
  boundary now and then). So the batch size is recorded in the manifest, and a resume with
  another one is refused.
* ``--precision bf16`` (default on CUDA) autocasts only the network; guidance, the diffusion update
  and VAE decoding stay float32.
* Pixels use DiT's convention ``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8, i.e. x in
  [-1, 1] rounded half-up to 0..255 (MDT truncates ``(x + 1) * 127.5``, on average 0.5 lower).
  Grayscale (1-channel pixel) samples are replicated to 3 channels in the ``.npz``.

Classifier-free guidance runs the model once on ``[x, x]`` with labels ``[y, null]`` and applies
:func:`shd_diffusion.models.layers.guided_output` (the same function the models'
``forward_with_cfg`` use): constant scale for DiT, MDTv2's power-cosine schedule for MDTv2
(``--guidance-schedule auto``), by default guiding only the first 3 eps channels like both
upstreams. Unlike upstream, the sampler only carries the conditional half (upstream's null half is
ignored by ``forward_with_cfg`` anyway), so noise is drawn for one row per image.

``--compile`` wraps the model in ``torch.compile(mode=--compile-mode)``; ``reduce-overhead`` (and
``max-autotune``) replay CUDA graphs, which removes the per-kernel launch cost that dominates small
models like S/2. Only the network is compiled: guidance, noise and the update stay eager.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from sampling.shards import (
    assemble,
    check_manifest,
    num_shards,
    remove_stale_temps,
    shard_is_complete,
    shard_path,
    shard_range,
    shards_for_rank,
    write_manifest,
    write_shard,
)
from shd_diffusion.cli import BadInput, add_debug_flag, check_writable_dir, run_main
from shd_diffusion.data import SD_VAE_SCALE_FACTOR
from shd_diffusion.diffusion import (
    NOISE_BLOCK_STEPS,
    GaussianDiffusion,
    create_diffusion,
)
from shd_diffusion.models.layers import guided_output
from shd_diffusion.models.mdt import MDTv2, power_cosine_cfg_scale

__all__ = [
    "DEFAULT_VAE",
    "LATENT_SCALE",
    "COMPILE_MODES",
    "image_seeds",
    "class_labels",
    "resolve_guidance_channels",
    "resolve_guidance_schedule",
    "GuidedDenoiser",
    "to_uint8_images",
    "Sampler",
    "run_shards",
    "shard_manifest",
    "load_model",
    "load_vae",
    "build_parser",
    "main",
]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
LATENT_SCALE = SD_VAE_SCALE_FACTOR  # SD-VAE latent scaling used by DiT / MDT training
DIFFUSION_STEPS = 1000  # the models' original timestep scale
# torch.compile modes offered by --compile-mode; the last two capture CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")

LabelRule = Literal["balanced", "uniform"]
Schedule = Literal["constant", "power-cosine"]

# Distinct salts keep the label stream and the noise stream of one seed unrelated.
_NOISE_SALT = np.uint64(0x6E6F697365)  # "noise"
_LABEL_SALT = np.uint64(0x6C6162656C)  # "label"


def _log(msg: str, enabled: bool = True) -> None:
    """Print from the main process only (callers pass ``is_main``)."""
    if enabled:
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Per-image randomness: a pure function of (seed, index)
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a bijective 64-bit mix (uint64 in, uint64 out, wrapping)."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_indices(indices: Sequence[int] | np.ndarray, seed: int, salt: np.uint64) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and idx.min() < 0:
        raise ValueError("image indices must be >= 0")
    key = _splitmix64(np.asarray([seed], dtype=np.uint64) ^ salt)  # (1,)
    with np.errstate(over="ignore"):
        return _splitmix64(key + idx.astype(np.uint64))  # (n,)


def image_seeds(indices: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """Generator seed of each image: ``splitmix64(splitmix64(seed ^ salt) + i)`` as 63-bit ints.

    Hashing (rather than ``seed + i``) keeps runs with neighbouring base seeds unrelated.

    Args:
        indices: (n,) image indices >= 0.
        seed: base seed >= 0.

    Returns:
        (n,) int64 seeds in [0, 2^63).
    """
    return (_hash_indices(indices, seed, _NOISE_SALT) >> np.uint64(1)).astype(np.int64)


def class_labels(
    indices: Sequence[int] | np.ndarray, num_classes: int, rule: LabelRule = "balanced", seed: int = 0
) -> np.ndarray:
    """Class label of each image index.

    Rules:
        ``"balanced"``: ``label(i) = i % num_classes`` (every class equally often when N is a
            multiple of ``num_classes``, e.g. 50 per class for 50,000 ImageNet samples).
        ``"uniform"``: ``label(i) = splitmix64(splitmix64(seed ^ salt) + i) % num_classes``, an
            independent uniform draw per index (modulo bias < num_classes / 2^64).

    Args:
        indices: (n,) image indices >= 0.
        num_classes: number of real classes (the null class is never drawn).
        rule: ``"balanced"`` or ``"uniform"``.
        seed: base seed (``"uniform"`` only).

    Returns:
        (n,) int64 labels in [0, num_classes).
    """
    if num_classes <= 0:
        raise ValueError(f"num_classes must be > 0, got {num_classes}")
    idx = np.asarray(indices, dtype=np.int64)
    if rule == "balanced":
        return idx % num_classes
    if rule == "uniform":
        return (_hash_indices(idx, seed, _LABEL_SALT) % np.uint64(num_classes)).astype(np.int64)
    raise ValueError(f"unknown label rule {rule!r}: use 'balanced' or 'uniform'")


# --------------------------------------------------------------------------------------------
# Guided denoiser
# --------------------------------------------------------------------------------------------


def resolve_guidance_channels(spec: int | str | None, eps_channels: int) -> int | None:
    """Map ``--guidance-channels`` to the models' ``guidance_channels`` argument.

    ``3`` is the upstream quirk for 4-channel latents. For models with <= 3 eps channels (pixel
    space) it means "all", so 1-channel demo models do not fail.

    Args:
        spec: an int, ``"all"`` or None (= all).
        eps_channels: the model's ``in_channels``.

    Returns:
        The number of leading eps channels to guide, or None for all of them.
    """
    if spec is None or spec == "all":
        return None
    k = int(spec)
    if k <= 0:
        raise ValueError(f"--guidance-channels must be >= 1 or 'all', got {spec}")
    return None if k >= eps_channels else k


def resolve_guidance_schedule(spec: str, model: nn.Module) -> Schedule:
    """``"auto"`` -> ``"power-cosine"`` for MDTv2, ``"constant"`` for DiT (each upstream's choice)."""
    if spec == "auto":
        return "power-cosine" if isinstance(model, MDTv2) else "constant"
    if spec not in ("constant", "power-cosine"):
        raise ValueError(f"unknown guidance schedule {spec!r}: use auto, constant or power-cosine")
    return spec  # type: ignore[return-value]


class GuidedDenoiser:
    """``model_fn(x, t, y)`` for the sampling loop: autocast + classifier-free guidance.

    With ``cfg_scale > 1`` the model runs on ``[x, x]`` with labels ``[y, null]`` (conditional half
    first) and the guided eps of the first half is returned; the variance channels (and, by
    default, the 4th latent eps channel) are the conditional ones, as in both upstreams. With
    ``cfg_scale == 1`` it is a plain conditional forward.

    Args:
        model: DiT / MDTv2 (or anything with ``forward(x, t, y)``, ``null_class``, ``in_channels``).
        cfg_scale: guidance scale s.
        schedule: ``"constant"`` (scale s at every step) or ``"power-cosine"`` (MDTv2).
        scale_pow: power of the power-cosine schedule.
        guidance_channels: leading eps channels to guide, None = all.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (None = off).
        compile: wrap the model's forward in ``torch.compile``.
        compile_mode: ``torch.compile`` mode, one of :data:`COMPILE_MODES` (``"reduce-overhead"``
            = CUDA graphs; one graph per batch shape).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg_scale: float = 3.8,
        schedule: Schedule = "constant",
        scale_pow: float = 4.0,
        guidance_channels: int | None = 3,
        autocast_dtype: torch.dtype | None = None,
        compile: bool = False,
        compile_mode: str = "default",
    ) -> None:
        if cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.schedule = schedule
        self.scale_pow = float(scale_pow)
        self.guidance_channels = guidance_channels
        self.autocast_dtype = autocast_dtype
        self.eps_channels = int(model.in_channels)
        self.null_class = int(model.null_class) if self.guided else None
        # torch.compile(model) keeps the nn.Module interface; recompiles once per new batch size.
        self._forward: Callable[..., torch.Tensor] = torch.compile(model, mode=compile_mode) if compile else model
        self._cudagraphs = compile and compile_mode in _CUDAGRAPH_MODES

    @property
    def guided(self) -> bool:
        """Whether a null-class pass is needed (scale > 1)."""
        return self.cfg_scale > 1.0

    def scale(self, t: torch.Tensor) -> torch.Tensor | float:
        """Guidance scale per sample at original timesteps ``t`` (B,)."""
        if self.schedule == "power-cosine":
            return power_cosine_cfg_scale(t, self.cfg_scale, DIFFUSION_STEPS, self.scale_pow)  # (B,)
        return self.cfg_scale

    def _model(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        if self._cudagraphs:
            # Each call is a new inference step: the graph may reuse the previous output's memory,
            # which the caller has consumed by now.
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            out = self._forward(x, t, y)
        # Guidance and the diffusion update stay in float32 whatever the model ran in.
        return out.float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Guided model output for x (B, C, H, W), original timesteps t (B,), labels y (B,).

        Returns:
            (B, C_out, H, W) float32: guided eps channels, then the conditional rest.
        """
        if not self.guided:
            return self._model(x, t, y)
        b = x.shape[0]
        null = torch.full_like(y, self.null_class)
        out = self._model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C_out, H, W)
        guided = guided_output(out, self.scale(t), self.eps_channels, self.guidance_channels)  # (2B, C_out, H, W)
        return guided[:b]  # both halves are identical; keep the conditional one


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] to uint8 NHWC with 3 channels (DiT's rounding convention).

    Args:
        x: (B, C, H, W) with C = 1 (replicated to RGB) or 3.

    Returns:
        (B, H, W, 3) uint8 numpy array.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
    # +128 then truncation = round-half-up of 127.5 * (x + 1).
    pixels = torch.clamp(127.5 * x.float() + 128.0, 0, 255).to(torch.uint8)  # (B, C, H, W)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)  # (B, 3, H, W) grayscale -> RGB
    return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()  # (B, H, W, 3)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@dataclass
class Sampler:
    """Everything that turns a list of image indices into images.

    Attributes:
        denoiser: the guided ``model_fn``.
        diffusion: a respaced :class:`GaussianDiffusion` (e.g. ``create_diffusion("250")``).
        latent_shape: (C, H, W) of x_T.
        num_classes: real classes (labels are drawn in [0, num_classes)).
        device: where sampling runs (generators live there too).
        seed: base seed of :func:`image_seeds` / :func:`class_labels`.
        label_rule: see :func:`class_labels`.
        vae: diffusers ``AutoencoderKL`` for latent models, None for pixel-space models.
        vae_batch_size: images decoded per VAE call (bounds decoder activation memory).
        clip_denoised: clamp predicted x_0 to [-1, 1] each step (pixel-space models).
        noise_block: ancestral steps per per-image noise draw (part of the noise definition,
            see :meth:`GaussianDiffusion.p_sample_loop`).
    """

    denoiser: Callable[..., torch.Tensor]
    diffusion: GaussianDiffusion
    latent_shape: tuple[int, int, int]
    num_classes: int
    device: torch.device
    seed: int = 0
    label_rule: LabelRule = "balanced"
    vae: nn.Module | None = None
    vae_batch_size: int = 32
    clip_denoised: bool = False
    noise_block: int = NOISE_BLOCK_STEPS

    def initial_noise(self, indices: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        """x_T of each image from its own generator, and the generators (advanced past x_T).

        Returns:
            (n, C, H, W) noise and n generators on ``device``.
        """
        gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in image_seeds(indices, self.seed)]
        x = torch.stack([torch.randn(self.latent_shape, generator=g, device=self.device) for g in gens])  # (n, C, H, W)
        return x, gens

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Final samples to images in [-1, 1]: VAE decode for latents, identity for pixels.

        Args:
            z: (n, C, h, w) samples.

        Returns:
            (n, 1 or 3, H, W) images.
        """
        if self.vae is None:
            return z
        parts = [
            self.vae.decode(chunk / LATENT_SCALE).sample  # fp32: one call per image, cheap vs sampling
            for chunk in z.split(self.vae_batch_size)
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def sample_latents(self, indices: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        """Run the reverse diffusion for the given image indices (one batch), without decoding.

        Args:
            indices: (n,) image indices.

        Returns:
            (n, C, h, w) final samples x_0 on ``device`` and (n,) int64 labels.
        """
        labels = class_labels(indices, self.num_classes, self.label_rule, self.seed)  # (n,)
        x_T, gens = self.initial_noise(indices)
        y = torch.as_tensor(labels, device=self.device)
        z = self.diffusion.p_sample_loop(
            self.denoiser, x_T, model_kwargs={"y": y}, generators=gens, clip_denoised=self.clip_denoised,
            noise_block=self.noise_block,
        )  # (n, C, h, w)
        return z, labels

    @torch.no_grad()
    def sample(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Sample the images with the given indices (one batch).

        Args:
            indices: (n,) image indices.

        Returns:
            images uint8 (n, H, W, 3) and labels int64 (n,).
        """
        z, labels = self.sample_latents(indices)
        return to_uint8_images(self.decode(z)), labels


def _batches(indices: range, batch_size: int) -> Iterator[range]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def shard_manifest(settings: dict[str, Any], num_samples: int, shard_size: int, batch_size: int) -> dict[str, Any]:
    """What a run folder must agree on: the pixel-defining settings, N, shard and batch size.

    The batch size is part of it because CPU and GPU matrix kernels pick their blocking by the
    number of rows, so one image's pixels can differ in the last bits between batch sizes (a
    uint8 level at a rounding boundary); the process count is not, as every image lands in the
    same batch for any number of processes. ``batch_size`` is the effective one (capped at the
    shard size).
    """
    return {**settings, "num_samples": num_samples, "shard_size": shard_size, "batch_size": min(batch_size, shard_size)}


def run_shards(
    sampler: Sampler,
    out_dir: str | Path,
    num_samples: int,
    shard_size: int = 1000,
    batch_size: int = 250,
    rank: int = 0,
    world_size: int = 1,
    manifest: dict[str, Any] | None = None,
    on_shard_done: Callable[[int], None] | None = None,
    show_progress: bool = False,
) -> list[int]:
    """Sample this rank's unfinished shards of ``out_dir``, each written atomically when done.

    Shards already on disk with the right indices are skipped, so rerunning the same command
    after a crash (with any number of processes) finishes the set without duplicating or
    dropping an index. A shard interrupted mid-way is recomputed from scratch.

    Args:
        sampler: produces images for a batch of indices.
        out_dir: run directory (``out_dir/shards/``).
        num_samples: N; indices 0..N-1.
        shard_size: indices per shard (fixes the split independently of ``world_size``).
        batch_size: images per sampling batch (capped at the shard size).
        rank: this process (0-based). world_size: number of processes.
        manifest: settings recorded in / checked against ``shards/manifest.json`` (N, the shard
            size and the batch size are added, see :func:`shard_manifest`); a mismatch raises
            ``ShardError`` before any work.
        on_shard_done: called with the shard id after each shard is written (tests inject
            failures here).
        show_progress: tqdm bar (images, img/s, ETA) for this rank.

    Returns:
        The shard ids this call computed.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    write_manifest(out_dir, shard_manifest(manifest or {}, num_samples, shard_size, batch_size))
    mine = shards_for_rank(num_shards(num_samples, shard_size), rank, world_size)
    todo = [k for k in mine if not shard_is_complete(shard_path(out_dir, k), shard_range(k, num_samples, shard_size))]
    _log(
        f"rank {rank}/{world_size}: {len(mine) - len(todo)} of my {len(mine)} shards already done, "
        f"{len(todo)} to sample",
        show_progress,
    )
    total = sum(len(shard_range(k, num_samples, shard_size)) for k in todo)
    done = []
    with tqdm(total=total, unit="img", disable=not show_progress, desc=f"sampling (rank {rank} of {world_size})", dynamic_ncols=True) as bar:
        for k in todo:
            path = shard_path(out_dir, k)
            remove_stale_temps(path)  # this rank owns shard k: its old temp files are garbage
            indices = shard_range(k, num_samples, shard_size)
            images: np.ndarray | None = None
            labels = np.empty(len(indices), dtype=np.int64)
            offset = 0
            for batch in _batches(indices, batch_size):
                batch_images, batch_labels = sampler.sample(batch)  # (n, H, W, 3), (n,)
                if images is None:  # image size is known only after the first decode
                    images = np.empty((len(indices), *batch_images.shape[1:]), dtype=np.uint8)
                images[offset : offset + len(batch)] = batch_images
                labels[offset : offset + len(batch)] = batch_labels
                offset += len(batch)
                bar.update(len(batch))
            write_shard(path, images, labels, np.arange(indices.start, indices.stop))
            done.append(k)
            if on_shard_done is not None:
                on_shard_done(k)
    return done


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    use_ema: bool = True,
    overrides: dict[str, Any] | None = None,
    verbose: bool = False,
) -> nn.Module:
    """The model to sample from: :func:`shd_diffusion.models.sources.load_model` (one loader).

    ``checkpoint`` is an official ``.pt``, a training checkpoint of this package, a
    ``save_pretrained`` folder, a diffusers ``DiTTransformer2DModel`` or pipeline folder, or a
    Hub id ``org/repo[@revision][:path]``.
    """
    from shd_diffusion.models.sources import load_model as load_from_source

    return load_from_source(checkpoint, model_name, use_ema, overrides, verbose)


def load_vae(spec: str, in_channels: int) -> nn.Module | None:
    """The decoder for a model's samples.

    Args:
        spec: ``"auto"`` (None for 1/3-channel pixel models, :data:`DEFAULT_VAE` for 4-channel
            latents), ``"none"``, a hub id or a local folder for ``AutoencoderKL.from_pretrained``.
        in_channels: the model's channels.

    Returns:
        An eval-mode ``AutoencoderKL`` on the CPU, or None for pixel space.
    """
    if spec == "auto":
        spec = "none" if in_channels in (1, 3) else DEFAULT_VAE
    if spec == "none":
        if in_channels not in (1, 3):
            raise BadInput(f"--vae none needs a pixel-space model (1 or 3 channels); this one has {in_channels}: pass a VAE")
        return None
    from diffusers.models import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(spec)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(
            f"could not load the VAE {spec!r} ({reason}). Offline, download it once with network access "
            "(it lands in the Hugging Face cache) or pass a local folder: --vae PATH"
        ) from e
    if vae.config.latent_channels != in_channels:
        raise BadInput(f"VAE {spec!r} has {vae.config.latent_channels} latent channels, the model {in_channels}: pass a matching --vae")
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_model_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


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
    g.add_argument("--model-arg", action="append", default=[], type=_parse_model_arg, metavar="KEY=VALUE",
                   help="constructor override for --model (repeatable), e.g. input_size=8")
    g.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights of a checkpoint that has them")
    g.add_argument("--vae", default="auto", help=f"'auto' (none for 1/3-channel pixel models, {DEFAULT_VAE} for 4-channel latents), 'none', a hub id or a local folder")

    g = p.add_argument_group("sampling")
    g.add_argument("--num-samples", type=int, default=50_000, help="N: images 0..N-1")
    g.add_argument("--steps", type=int, default=250, help="respaced DDPM steps (ADM respacing of 1000)")
    g.add_argument("--cfg-scale", type=float, default=3.8, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--guidance-schedule", choices=["auto", "power-cosine", "constant"], default="auto",
                   help="auto: power-cosine for MDTv2, constant for DiT")
    g.add_argument("--scale-pow", type=float, default=4.0, help="power of the power-cosine schedule")
    g.add_argument("--guidance-channels", type=_guidance_channels_arg, default=3,
                   help="guide only the first K eps channels (3 = upstream quirk for 4-channel latents) or 'all'")
    g.add_argument("--labels", choices=["balanced", "uniform"], default="balanced",
                   help="balanced: label(i) = i %% num_classes; uniform: seeded uniform draw per index")
    g.add_argument("--seed", type=int, default=0, help="base seed; image i uses seed hash(seed, i)")
    g.add_argument("--clip-denoised", choices=["auto", "on", "off"], default="auto",
                   help="clamp predicted x_0 to [-1, 1] each step; auto: on for pixel models, off for latents")

    g = p.add_argument_group("speed")
    g.add_argument("--batch-size", type=int, default=250, help="images per batch per process (the model sees 2x with CFG)")
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


def _precision(spec: str, device: torch.device) -> torch.dtype | None:
    if spec == "auto":
        spec = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if spec == "bf16" else None


def _check_args(args: argparse.Namespace) -> None:
    """Refuse every command-line value that is wrong on its own, before anything is loaded or written."""
    if args.assemble:
        if args.png_dir:
            check_writable_dir(args.png_dir, "--png-dir")
        return
    if not args.checkpoint or not args.out:
        raise BadInput("--checkpoint and --out are required (or --assemble DIR to only assemble)")
    if args.compile_mode != "default" and not args.compile:
        raise BadInput(f"--compile-mode {args.compile_mode} needs --compile")
    for name in ("num_samples", "steps", "batch_size", "shard_size", "vae_batch_size"):
        if getattr(args, name) <= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.steps > DIFFUSION_STEPS:
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
    """Entry point of ``python -m sampling.sample`` / ``accelerate launch -m sampling.sample``.

    Returns:
        0, or 2 after one ``error:`` line for bad input (``--debug`` shows the traceback).
    """
    args = build_parser().parse_args(argv)
    return run_main(lambda: _sample(args), debug=args.debug)


def _sample(args: argparse.Namespace) -> int:
    """Validate everything, then sample and assemble (the body of :func:`main`)."""
    _check_args(args)
    if args.assemble:
        _log(f"wrote {assemble(args.assemble, png_dir=args.png_dir)}")
        return 0
    from accelerate import Accelerator, InitProcessGroupKwargs

    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(minutes=args.dist_timeout_min))])
    is_main = accelerator.is_main_process
    sampler, settings = _build_sampler(args, accelerator.device, is_main)
    batch_size = min(args.batch_size, args.shard_size)
    # The last refusal that needs no writing: a folder sampled with other settings.
    check_manifest(args.out, shard_manifest(settings, args.num_samples, args.shard_size, batch_size))
    _log(f"sampling {args.num_samples} images with {accelerator.num_processes} process(es) into {args.out}: "
         + json.dumps(settings), is_main)
    start = time.time()
    run_shards(
        sampler, args.out, args.num_samples, args.shard_size, batch_size,
        rank=accelerator.process_index, world_size=accelerator.num_processes, manifest=settings,
        show_progress=is_main,
    )
    accelerator.wait_for_everyone()  # every shard is on disk before the main process assembles
    if is_main:
        _log(f"all shards done in {time.time() - start:.0f} s", is_main)
        if not args.no_assemble:
            _log(f"wrote {assemble(args.out, png_dir=args.png_dir)}", is_main)
    accelerator.wait_for_everyone()  # tear down together (a rank leaving early can abort gloo)
    accelerator.end_training()  # destroys the process group (one left alive aborts at exit)
    return 0


def _build_sampler(args: argparse.Namespace, device: torch.device, is_main: bool) -> tuple[Sampler, dict[str, Any]]:
    """The sampler the arguments describe, and the settings that define its pixels (the manifest)."""
    model = load_model(args.checkpoint, args.model, args.use_ema, dict(args.model_arg), verbose=is_main).to(device)
    cfg = model.config
    vae = load_vae(args.vae, cfg.in_channels)
    if vae is not None:
        vae = vae.to(device)
    schedule = resolve_guidance_schedule(args.guidance_schedule, model)
    channels = resolve_guidance_channels(args.guidance_channels, cfg.in_channels)
    autocast = _precision(args.precision, device)
    clip = args.clip_denoised == "on" or (args.clip_denoised == "auto" and vae is None)
    if args.shard_size % min(args.batch_size, args.shard_size):
        _log(f"note: --shard-size {args.shard_size} is not a multiple of --batch-size {args.batch_size}: "
             "each shard ends with a smaller batch (slower; with --compile also a recompile)", is_main)
    sampler = Sampler(
        denoiser=GuidedDenoiser(
            model, args.cfg_scale, schedule, args.scale_pow, channels, autocast, args.compile, args.compile_mode
        ),
        diffusion=create_diffusion(str(args.steps), learn_sigma=cfg.learn_sigma),
        latent_shape=(cfg.in_channels, cfg.input_size, cfg.input_size),
        num_classes=cfg.num_classes,
        device=device,
        seed=args.seed,
        label_rule=args.labels,
        vae=vae,
        vae_batch_size=args.vae_batch_size,
        clip_denoised=clip,
    )
    # Everything that changes the pixels; a resumed run must match it (shard_manifest adds N, the
    # shard size and the batch size; the process count does not change the result).
    settings = {
        # A local path is recorded absolute; a Hub id as typed (a path of that name would not exist).
        "checkpoint": str(Path(args.checkpoint).resolve()) if Path(args.checkpoint).exists() else args.checkpoint,
        "model": args.model or type(model).__name__,
        "model_args": dict(args.model_arg),
        "use_ema": args.use_ema,
        "vae": "none" if vae is None else (DEFAULT_VAE if args.vae == "auto" else args.vae),
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "guidance_schedule": schedule,
        "scale_pow": args.scale_pow if schedule == "power-cosine" else None,
        "guidance_channels": channels,
        "labels": args.labels,
        "seed": args.seed,
        "precision": "bf16" if autocast is not None else "fp32",
        "clip_denoised": clip,
        "noise_block": sampler.noise_block,  # defines the per-image noise stream
    }
    return sampler, settings


if __name__ == "__main__":
    sys.exit(main())
