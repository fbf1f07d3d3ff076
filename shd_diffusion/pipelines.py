"""``ClassConditionalPipeline``: a diffusers pipeline that *is* this package's sampler.

It builds the :class:`~shd_diffusion.sampler.Sampler` that ``python -m sampling.sample`` builds
with its defaults (the respaced :class:`~shd_diffusion.diffusion.GaussianDiffusion`, the
:class:`~shd_diffusion.sampler.GuidedDenoiser`, x_0 clipping for pixel-space models, the VAE
decode and :func:`~shd_diffusion.sampler.to_uint8_images`) and runs it, so there is no second
implementation of a step, of guidance or of clipping. With ``seed=s`` image i gets the noise of
image i of ``sampling.sample --seed s``: same labels, same seed, same pixels.

Every setting defaults to what the sampler's ``auto`` picks: guidance schedule power-cosine for
MDTv2 and constant otherwise, guidance on the first 3 eps channels (all of them for pixel models),
the model's own null class, clipping for pixel-space models (no ``vae``). ``export`` writes the
choices it knows into ``model_index.json``.

    pipe = ClassConditionalPipeline.from_pretrained("exported_dir")
    images = pipe(class_labels=[1, 3], num_inference_steps=250, guidance_scale=3.8, seed=0).images
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from torch import nn

from shd_diffusion.diffusion import create_diffusion
from shd_diffusion.sampler import (
    DIFFUSION_STEPS,
    GUIDANCE_SCHEDULES,
    GuidedDenoiser,
    Sampler,
    resolve_clip_denoised,
    resolve_guidance_channels,
    resolve_guidance_schedule,
    to_uint8_images,
)

__all__ = ["ClassConditionalPipeline", "ddpm_scheduler"]

NUM_TRAIN_TIMESTEPS = DIFFUSION_STEPS
BETA_START, BETA_END = 1e-4, 0.02  # the linear schedule of create_diffusion (ADM / DiT)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def ddpm_scheduler(variance_type: str = "learned_range") -> DDPMScheduler:
    """The models' training process as a diffusers scheduler (linear betas 1e-4..0.02, 1000 steps).

    ``timestep_spacing="linspace"`` reproduces ADM's respacing (250 -> 0, 4, ..., 995, 999).
    ``DiTPipeline`` steps with it; ``ClassConditionalPipeline`` only checks that it describes the
    process :func:`~shd_diffusion.diffusion.create_diffusion` builds.
    """
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule="linear",
        variance_type=variance_type, clip_sample=False, timestep_spacing="linspace",
    )


class LabelledModel(nn.Module):
    """A transformer seen as this package's models: ``forward(x, t, y)``, ``in_channels``,
    ``null_class``, ``num_classes``, ``learn_sigma``, ``input_size`` (what the sampler reads).

    Wraps this package's DiT / MDTv2 and diffusers' ``DiTTransformer2DModel`` (the DiT export's
    ``transformer/``) alike; ``null_class`` None means the model's own.
    """

    def __init__(self, transformer: nn.Module, null_class: int | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        self.native = hasattr(transformer, "attention_layers")  # DiT / MDTv2 of this package
        self.in_channels = int(cfg.in_channels)
        self.input_size = int(cfg.input_size if self.native else cfg.sample_size)
        self.num_classes = int(cfg.num_classes if self.native else cfg.num_embeds_ada_norm)
        self.learn_sigma = bool(cfg.learn_sigma) if self.native else int(cfg.out_channels or 0) == 2 * self.in_channels
        own_null = int(transformer.null_class) if self.native else self.num_classes  # diffusers: label dropout -> row N
        self.null_class = own_null if null_class is None else int(null_class)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.native:
            return self.transformer(x, t, y)
        return self.transformer(x, timestep=t, class_labels=y).sample


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling exactly as ``sampling.sample`` does it (see the module docstring).

    Components: ``transformer`` (MDTv2 / DiT of this package, or a ``DiTTransformer2DModel``),
    ``scheduler`` (a ``DDPMScheduler`` that must describe the models' linear 1000-step process;
    sampling itself runs :class:`~shd_diffusion.diffusion.GaussianDiffusion`), ``vae``
    (``AutoencoderKL``, None for pixel-space models). Config: ``guidance_schedule`` (``"auto"``,
    ``"power-cosine"``, ``"constant"``), ``scale_pow``, ``guidance_channels`` (None = all eps
    channels), ``null_class`` (None = the model's), ``clip_denoised`` (``"auto"`` = clip predicted
    x_0 to [-1, 1] for pixel-space models, or a bool).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: Any,
        scheduler: DDPMScheduler,
        vae: Any = None,
        guidance_schedule: str = "auto",
        scale_pow: float = 4.0,
        guidance_channels: int | None = 3,
        null_class: int | None = None,
        clip_denoised: bool | str = "auto",
    ) -> None:
        super().__init__()
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {', '.join(GUIDANCE_SCHEDULES)}, got {guidance_schedule!r}")
        if clip_denoised not in ("auto", True, False):
            raise ValueError(f"clip_denoised must be 'auto', True or False, got {clip_denoised!r}")
        _check_scheduler(scheduler)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(guidance_schedule=guidance_schedule, scale_pow=float(scale_pow),
                                guidance_channels=guidance_channels,
                                null_class=None if null_class is None else int(null_class), clip_denoised=clip_denoised)

    def sampler(self, guidance_scale: float, num_inference_steps: int, seed: int) -> Sampler:
        """The :class:`~shd_diffusion.sampler.Sampler` this pipeline runs (what ``sampling.sample``
        builds for these settings with its defaults)."""
        cfg = self.config
        model = LabelledModel(self.transformer, cfg.null_class)
        schedule = resolve_guidance_schedule(cfg.guidance_schedule, self.transformer)
        clip = resolve_clip_denoised(cfg.clip_denoised, pixel_space=self.vae is None)
        channels = resolve_guidance_channels(cfg.guidance_channels, model.in_channels)
        denoiser = GuidedDenoiser(model, float(guidance_scale), schedule, cfg.scale_pow, channels)
        return Sampler(
            denoiser=denoiser,
            diffusion=create_diffusion(str(int(num_inference_steps)), learn_sigma=model.learn_sigma),
            latent_shape=(model.in_channels, model.input_size, model.input_size),
            num_classes=model.num_classes,
            device=self._execution_device,
            seed=seed,
            vae=self.vae,
            clip_denoised=clip,
        )

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int],
        guidance_scale: float = 3.8,
        num_inference_steps: int = 250,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label.

        Args:
            class_labels: class ids in [0, num_classes).
            guidance_scale: CFG scale s >= 1 (1 = off); power-cosine schedules ramp it over t.
            num_inference_steps: respaced DDPM steps (ADM respacing of 1000).
            seed: image i draws all its noise like image i of ``sampling.sample --seed seed``.
            generator: without ``seed``, the seed is drawn from it (else from torch's global RNG).
            latents: (B, C, H, W) x_T to start from instead of the seeded draw.
            output_type: ``"pil"`` (RGB, the sampler's uint8 pixels), ``"np"`` / ``"pt"`` (float
                images in [0, 1]) or ``"latent"`` (the final x_0 before decoding).
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is None:
            device = generator.device if generator is not None else "cpu"
            seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))  # one draw seeds every image
        sampler = self.sampler(guidance_scale, num_inference_steps, seed)
        y = _labels(class_labels, sampler.num_classes, sampler.device)
        x_T, gens = sampler.initial_noise(range(len(y)))  # (B, C, H, W), one generator per image
        if latents is not None:
            if tuple(latents.shape) != tuple(x_T.shape):
                raise ValueError(f"latents must have shape {tuple(x_T.shape)}, got {tuple(latents.shape)}")
            x_T = latents.to(device=x_T.device, dtype=x_T.dtype)
        z = sampler.denoise(x_T, y, gens)  # (B, C, H, W)
        images: Any = z if output_type == "latent" else sampler.decode(z)  # decoded: (B, 1 or 3, H', W') in [-1, 1]
        if output_type == "pil":
            images = [PIL.Image.fromarray(img) for img in to_uint8_images(images)]
        elif output_type in ("np", "pt"):
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type == "np":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (B, H', W', C)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _labels(class_labels: Sequence[int], num_classes: int, device: torch.device) -> torch.Tensor:
    """(B,) int64 labels; a label outside the model's classes is refused with the valid range."""
    labels = np.asarray(list(class_labels), dtype=np.int64).reshape(-1)  # (B,)
    if labels.size == 0:
        raise ValueError("class_labels is empty: pass one class id per image")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(f"class label {int(bad[0])} is outside this model's classes 0..{num_classes - 1}")
    return torch.as_tensor(labels, device=device)


def _check_scheduler(scheduler: DDPMScheduler) -> None:
    """The scheduler must describe the process the sampler runs (linear betas 1e-4..0.02, 1000 steps)."""
    cfg = scheduler.config
    found = (cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)
    if found != (NUM_TRAIN_TIMESTEPS, "linear", BETA_START, BETA_END):
        raise ValueError(
            f"scheduler describes {found} (steps, schedule, beta_start, beta_end); this pipeline samples the "
            f"models' linear {NUM_TRAIN_TIMESTEPS}-step process: use pipelines.ddpm_scheduler()"
        )
