"""Class-conditional sampling: per-image seeds and labels, the guided denoiser, and the sampler.

The library behind ``python -m sampling.sample`` (its command line is :mod:`shd_diffusion.commands.sample`,
which builds its sampler with :func:`sampler_from_checkpoint`; the resumable sharded run folder is
:mod:`shd_diffusion.shards`). Rules that make a result
reproducible:

* Image ``i`` gets its class label from :func:`class_labels` (``"balanced"``: ``i % num_classes``;
  ``"uniform"``: ``derive_seed(LABEL_KEY, seed, i) % num_classes``) and *all* of its noise from its
  own ``torch.Generator`` seeded with ``derive_seed(NOISE_KEY, seed, i)`` (:func:`image_seeds`):
  first x_T (``randn((C, H, W))``), then, for DDPM, the ancestral noise in blocks of
  ``NOISE_BLOCK_STEPS`` steps (see :meth:`GaussianDiffusion.p_sample_loop`). Nothing depends on
  which process or which batch the image lands in. :data:`SEED_SCHEME` names this derivation in
  the run folder's manifest, so a folder sampled with another one is refused on resume.
* ``autocast_dtype`` (bf16 on CUDA by default in the command) autocasts only the network;
  guidance, the diffusion update and VAE decoding stay float32.
* Pixels use DiT's convention ``clamp(127.5 * x + 128, 0, 255)`` truncated to uint8
  (:func:`to_uint8_images`, the one conversion; MDT truncates ``(x + 1) * 127.5``, on average
  0.5 lower). Grayscale samples are replicated to 3 channels.

Classifier-free guidance runs the model once on ``[x, x]`` with labels ``[y, null]`` and applies
:func:`shd_diffusion.models.layers.guided_output` (the function the models' ``forward_with_cfg``
use): by default the model family's schedule (constant for DiT, power-cosine for MDTv2; see
:mod:`shd_diffusion.families`), guiding only the first 3 eps channels like both upstreams. Only the conditional half is carried between steps
(upstream's null half is ignored by ``forward_with_cfg`` anyway), so noise is drawn for one row
per image.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .diffusion import NOISE_BLOCK_STEPS, GaussianDiffusion, create_diffusion
from .models.layers import guided_output
from .models.loading import weights_sha256
from .models.sources import load_model
from .families import family_of
from .models.mdt import power_cosine_cfg_scale
from .seeding import derive_seeds
from .vae import SD_VAE_SCALE_FACTOR, load_vae, resolve_vae_spec

__all__ = [
    "COMPILE_MODES",
    "DIFFUSION_STEPS",
    "LABEL_KEY",
    "NOISE_KEY",
    "SAMPLERS",
    "SEED_SCHEME",
    "image_seeds",
    "class_labels",
    "GUIDANCE_SCHEDULES",
    "resolve_autocast",
    "resolve_clip_denoised",
    "resolve_guidance_channels",
    "resolve_guidance_schedule",
    "GuidedDenoiser",
    "to_uint8_images",
    "Sampler",
    "stream_fields",
    "SamplingSpec",
    "sampler_from_checkpoint",
]

DIFFUSION_STEPS = 1000  # the models' original timestep scale
# torch.compile modes offered by --compile-mode; the last two capture CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
_CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
SAMPLERS = ("ddpm", "ddim")  # the diffusion's ancestral loop, or its DDIM loop

LabelRule = Literal["balanced", "uniform"]
Schedule = Literal["constant", "power-cosine"]
GUIDANCE_SCHEDULES = ("auto", "power-cosine", "constant")  # what --guidance-schedule accepts
Method = Literal["ddpm", "ddim"]

# Distinct keys keep the label stream and the noise stream of one seed unrelated.
NOISE_KEY = "shd-sample-noise"
LABEL_KEY = "shd-sample-label"
SEED_SCHEME = "blake2b-1"  # recorded in the manifest: derive_seed(KEY, seed, i) per image


# --------------------------------------------------------------------------------------------
# Per-image randomness: a pure function of (seed, index)
# --------------------------------------------------------------------------------------------


def _check_seed_and_indices(indices: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)  # (n,)
    if idx.size and idx.min() < 0:
        raise ValueError("image indices must be >= 0")
    return idx


def image_seeds(indices: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """Generator seed of each image: ``derive_seed(NOISE_KEY, seed, i)``.

    Hashing (rather than ``seed + i``) keeps runs with neighbouring base seeds unrelated.

    Args:
        indices: (n,) image indices >= 0.
        seed: base seed >= 0.

    Returns:
        (n,) int64 seeds in [0, 2^63).
    """
    return derive_seeds(_check_seed_and_indices(indices, seed), NOISE_KEY, seed)


def class_labels(
    indices: Sequence[int] | np.ndarray, num_classes: int, rule: LabelRule = "balanced", seed: int = 0
) -> np.ndarray:
    """Class label of each image index.

    Rules:
        ``"balanced"``: ``label(i) = i % num_classes`` (every class equally often when N is a
            multiple of ``num_classes``, e.g. 50 per class for 50,000 ImageNet samples).
        ``"uniform"``: ``label(i) = derive_seed(LABEL_KEY, seed, i) % num_classes``, an independent
            uniform draw per index (modulo bias < num_classes / 2^63).

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
        return derive_seeds(_check_seed_and_indices(idx, seed), LABEL_KEY, seed) % num_classes
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
    """``"auto"`` -> the model family's schedule (:attr:`~shd_diffusion.families.FamilySpec.guidance_schedule`:
    ``"power-cosine"`` for MDTv2, ``"constant"`` for DiT, each upstream's choice)."""
    if spec == "auto":
        return family_of(model).guidance_schedule
    if spec not in GUIDANCE_SCHEDULES:
        raise ValueError(f"unknown guidance schedule {spec!r}: use auto, constant or power-cosine")
    return spec  # type: ignore[return-value]


def resolve_clip_denoised(spec: str | bool, pixel_space: bool) -> bool:
    """``--clip-denoised``: ``"auto"`` clamps predicted x_0 to [-1, 1] for pixel-space models only (a
    latent's range is not [-1, 1]); ``"on"`` / True and ``"off"`` / False force it either way."""
    if spec == "auto":
        return pixel_space
    if spec in ("on", "off") or isinstance(spec, bool):
        return spec in ("on", True)
    raise ValueError(f"clip_denoised must be auto, on or off, got {spec!r}")


def resolve_autocast(spec: str, device: torch.device) -> torch.dtype | None:
    """``--precision``: ``"auto"`` is bf16 autocast on CUDA and fp32 elsewhere; ``"bf16"`` / ``"fp32"`` force it.

    Returns:
        The autocast dtype for :class:`GuidedDenoiser` (None = no autocast, fp32).
    """
    if spec == "auto":
        spec = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if spec == "bf16" else None


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


def stream_fields(method: Method = "ddpm", ddim_eta: float = 0.0, noise_block: int = NOISE_BLOCK_STEPS) -> dict[str, object]:
    """How each image's randomness is drawn and used, beyond the settings: the seed derivation,
    the sampling loop and its noise layout. A run folder records these so that a resume under
    another scheme is refused (it would mix two pixel definitions in one sample set)."""
    return {"seed_scheme": SEED_SCHEME, "sampler": method, "ddim_eta": ddim_eta if method == "ddim" else None,
            "noise_block": noise_block}


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
        method: ``"ddpm"`` (ancestral steps) or ``"ddim"`` (:meth:`GaussianDiffusion.ddim_sample_loop`
            over the same respaced steps).
        ddim_eta: DDIM stochasticity (0 = deterministic given x_T); ``"ddim"`` only.
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
    method: Method = "ddpm"
    ddim_eta: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.method!r}: use one of {', '.join(SAMPLERS)}")
        if self.method == "ddpm" and self.ddim_eta != 0.0:
            raise ValueError(f"ddim_eta {self.ddim_eta} needs method 'ddim'")

    def stream_fields(self) -> dict[str, object]:
        """This sampler's :func:`stream_fields` (for the run folder's manifest)."""
        return stream_fields(self.method, self.ddim_eta, self.noise_block)

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
            self.vae.decode(chunk / SD_VAE_SCALE_FACTOR).sample  # fp32: one call per image, cheap vs sampling
            for chunk in z.split(self.vae_batch_size)
        ]
        return torch.cat(parts)  # (n, 1 or 3, H, W)

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
        return self.denoise(x_T, torch.as_tensor(labels, device=self.device), gens), labels

    @torch.no_grad()
    def denoise(self, x_T: torch.Tensor, y: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        """The reverse diffusion from given x_T (n, C, h, w), labels y (n,) and per-image generators
        (the loop :meth:`sample_latents` runs; ``ClassConditionalPipeline`` runs it too).

        Returns:
            (n, C, h, w) final samples x_0.
        """
        if self.method == "ddim":
            z = self.diffusion.ddim_sample_loop(
                self.denoiser, x_T, model_kwargs={"y": y}, generators=gens, eta=self.ddim_eta,
                clip_denoised=self.clip_denoised,
            )  # (n, C, h, w)
        else:
            z = self.diffusion.p_sample_loop(
                self.denoiser, x_T, model_kwargs={"y": y}, generators=gens, clip_denoised=self.clip_denoised,
                noise_block=self.noise_block,
            )  # (n, C, h, w)
        return z

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


# --------------------------------------------------------------------------------------------
# From a checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SamplingSpec:
    """Everything that says how to sample a checkpoint (``python -m sampling.sample``'s model,
    sampling and speed flags; their defaults are the command's).

    Attributes:
        checkpoint: any source of :func:`shd_diffusion.models.sources.load_model`.
        model: registry name (official files), or None.
        model_args: constructor overrides for ``model``.
        use_ema: the EMA weights of a checkpoint that has them.
        vae: ``"auto"``, ``"none"``, a Hub id or a folder (:func:`shd_diffusion.vae.resolve_vae_spec`).
        steps: respaced diffusion steps.
        method: ``"ddpm"`` or ``"ddim"``; ``ddim_eta`` its stochasticity.
        cfg_scale, guidance_schedule, scale_pow, guidance_channels: classifier-free guidance
            (:class:`GuidedDenoiser`; ``"auto"`` choices resolved by the ``resolve_*`` functions).
        labels, seed: :func:`class_labels` and :func:`image_seeds`.
        clip_denoised: ``"auto"``, ``"on"`` or ``"off"`` (:func:`resolve_clip_denoised`).
        precision: ``"auto"``, ``"bf16"`` or ``"fp32"`` (:func:`resolve_autocast`).
        compile, compile_mode: ``torch.compile`` of the network.
        vae_batch_size: latents decoded per VAE call.
    """

    checkpoint: str | os.PathLike[str]
    model: str | None
    model_args: Mapping[str, Any]
    use_ema: bool
    vae: str
    steps: int
    method: Method
    ddim_eta: float
    cfg_scale: float
    guidance_schedule: str
    scale_pow: float
    guidance_channels: int | str
    labels: LabelRule
    seed: int
    clip_denoised: str
    precision: str
    compile: bool
    compile_mode: str
    vae_batch_size: int


def sampler_from_checkpoint(
    spec: SamplingSpec, device: torch.device, verbose: bool = False
) -> tuple[Sampler, dict[str, Any]]:
    """Load the model and VAE ``spec`` names onto ``device`` and build its :class:`Sampler`.

    Args:
        spec: the checkpoint and every sampling choice.
        device: where the model, the VAE and the generators live.
        verbose: say which weights were loaded (main process only).

    Returns:
        The sampler, and the settings that define its pixels (every ``"auto"`` resolved, the
        sampled weights by content as ``weights_sha256``): what a sample folder's manifest
        records, so a resume with anything else is refused.
    """
    model = load_model(spec.checkpoint, spec.model, spec.use_ema, dict(spec.model_args), verbose=verbose)
    # The sampled weights by content: other weights at the same path must not resume this folder.
    weights = weights_sha256(model.state_dict())
    model = model.to(device)
    cfg = model.config
    vae = load_vae(spec.vae, cfg.in_channels, device)
    schedule = resolve_guidance_schedule(spec.guidance_schedule, model)
    channels = resolve_guidance_channels(spec.guidance_channels, cfg.in_channels)
    autocast = resolve_autocast(spec.precision, device)
    clip = resolve_clip_denoised(spec.clip_denoised, pixel_space=vae is None)
    sampler = Sampler(
        denoiser=GuidedDenoiser(
            model, spec.cfg_scale, schedule, spec.scale_pow, channels, autocast, spec.compile, spec.compile_mode
        ),
        diffusion=create_diffusion(str(spec.steps), learn_sigma=cfg.learn_sigma),
        latent_shape=(cfg.in_channels, cfg.input_size, cfg.input_size),
        num_classes=cfg.num_classes,
        device=device,
        seed=spec.seed,
        label_rule=spec.labels,
        vae=vae,
        vae_batch_size=spec.vae_batch_size,
        clip_denoised=clip,
        method=spec.method,
        ddim_eta=spec.ddim_eta,
    )
    # Everything that changes the pixels; a resumed run must match it (shards.shard_manifest adds
    # the sampler's stream fields, N, the shard size and the batch size; the process count does
    # not change the result).
    checkpoint = str(spec.checkpoint)
    settings = {
        # A local path is recorded absolute; a Hub id as typed (a path of that name would not exist).
        "checkpoint": str(Path(checkpoint).resolve()) if Path(checkpoint).exists() else checkpoint,
        "model": spec.model or type(model).__name__,
        "model_args": dict(spec.model_args),
        "use_ema": spec.use_ema,
        "weights_sha256": weights,
        "vae": resolve_vae_spec(spec.vae, cfg.in_channels) or "none",
        "steps": spec.steps,
        "cfg_scale": spec.cfg_scale,
        "guidance_schedule": schedule,
        "scale_pow": spec.scale_pow if schedule == "power-cosine" else None,
        "guidance_channels": channels,
        "labels": spec.labels,
        "seed": spec.seed,
        "precision": "bf16" if autocast is not None else "fp32",
        "clip_denoised": clip,
    }
    return sampler, settings
