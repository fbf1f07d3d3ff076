"""``ClassConditionalPipeline``: a diffusers pipeline that samples like this package's sampler.

DDPM with the learned-range variance (ADM respacing via ``timestep_spacing="linspace"``) and
classifier-free guidance as in :func:`shd_diffusion.models.layers.guided_output`: MDTv2's
power-cosine scale schedule or DiT's constant scale, by default on the first 3 eps channels
(both upstreams' quirk). Exported MDTv2 students use it (``export`` writes the folder); it also
runs an exported DiT's ``transformer/`` with the learned variance that ``DiTPipeline`` drops.

    pipe = ClassConditionalPipeline.from_pretrained("exported_dir")
    images = pipe(class_labels=[207, 360], num_inference_steps=250, guidance_scale=3.8).images
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from shd_diffusion.vae import SD_VAE_SCALE_FACTOR
from shd_diffusion.models.layers import guided_output
from shd_diffusion.models.mdt import power_cosine_cfg_scale

__all__ = ["ClassConditionalPipeline", "ddpm_scheduler"]

NUM_TRAIN_TIMESTEPS = 1000


def ddpm_scheduler(variance_type: str = "learned_range") -> DDPMScheduler:
    """The models' training process as a diffusers scheduler (linear betas 1e-4..0.02, 1000 steps).

    ``timestep_spacing="linspace"`` reproduces ADM's respacing (250 -> 0, 4, ..., 995, 999).
    """
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        variance_type=variance_type, clip_sample=False, timestep_spacing="linspace",
    )


def _forward(transformer: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Model output for this package's models (``model(x, t, y)``) or diffusers' DiT."""
    if hasattr(transformer, "attention_layers"):  # DiT / MDTv2 of this package
        return transformer(x, t, y)
    return transformer(x, timestep=t, class_labels=y).sample


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling with learned-range DDPM and MDT / DiT guidance.

    Components: ``transformer`` (MDTv2 / DiT of this package, or a ``DiTTransformer2DModel``),
    ``scheduler`` (a ``DDPMScheduler``; its variance becomes learned-range for models that
    predict it), ``vae`` (``AutoencoderKL`` or None for pixel-space models). Config:
    ``guidance_schedule`` (``"power-cosine"`` or ``"constant"``), ``scale_pow``,
    ``guidance_channels`` (None = all eps channels), ``null_class``.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: Any,
        scheduler: DDPMScheduler,
        vae: Any = None,
        guidance_schedule: str = "power-cosine",
        scale_pow: float = 4.0,
        guidance_channels: int | None = 3,
        null_class: int = 1000,
    ) -> None:
        super().__init__()
        if guidance_schedule not in ("power-cosine", "constant"):
            raise ValueError(f"guidance_schedule must be 'power-cosine' or 'constant', got {guidance_schedule!r}")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(guidance_schedule=guidance_schedule, scale_pow=float(scale_pow),
                                guidance_channels=guidance_channels, null_class=int(null_class))

    def _guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
        """(B, C_out, H, W) float32 output: guided eps of the conditional half, its own rest."""
        cfg = self.config
        if scale <= 1.0:
            return _forward(self.transformer, x, t, y).float()
        null = torch.full_like(y, cfg.null_class)
        out = _forward(self.transformer, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2B, C_out, H, W)
        if cfg.guidance_schedule == "power-cosine":
            s: torch.Tensor | float = power_cosine_cfg_scale(t, scale, NUM_TRAIN_TIMESTEPS, cfg.scale_pow)  # (B,)
        else:
            s = scale
        channels = cfg.guidance_channels if cfg.guidance_channels is None or cfg.guidance_channels < x.shape[1] else None
        return guided_output(out, s, x.shape[1], channels)[: x.shape[0]]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Sequence[int],
        guidance_scale: float = 3.8,
        num_inference_steps: int = 250,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Sample one image per label.

        Args:
            class_labels: class ids.
            guidance_scale: CFG scale s (1 = off); power-cosine schedules ramp it over t.
            num_inference_steps: respaced DDPM steps (ADM respacing).
            generator: drives x_T (unless ``latents``) and the per-step noise.
            latents: (B, C, H, W) x_T to start from.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"``.
            return_dict: return an ``ImagePipelineOutput`` (else a tuple).
        """
        model = self.transformer
        cfg = model.config
        channels = int(cfg.in_channels)
        size = int(cfg.input_size if "input_size" in cfg else cfg.sample_size)
        y = torch.tensor(list(class_labels), device=self._execution_device, dtype=torch.long)
        x = latents if latents is not None else randn_tensor((len(y), channels, size, size), generator=generator,
                                                             device=self._execution_device, dtype=torch.float32)
        scheduler = self.scheduler
        if _predicts_variance(cfg) and scheduler.config.variance_type != "learned_range":
            scheduler = DDPMScheduler.from_config(scheduler.config, variance_type="learned_range")
        scheduler.set_timesteps(num_inference_steps, device=x.device)
        for t in self.progress_bar(scheduler.timesteps):
            tt = t.expand(len(y)).to(x.device)
            out = self._guided(x, tt, y, float(guidance_scale))
            x = scheduler.step(out, t, x, generator=generator).prev_sample
        if output_type == "latent":
            images: Any = x
        else:
            images = self.vae.decode(x / SD_VAE_SCALE_FACTOR).sample if self.vae is not None else x
            images = (images / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _predicts_variance(cfg: Any) -> bool:
    """Whether a model config describes a learned-sigma model (2x in_channels outputs)."""
    if "learn_sigma" in cfg:
        return bool(cfg.learn_sigma)
    out = cfg.get("out_channels") if hasattr(cfg, "get") else getattr(cfg, "out_channels", None)
    return out is not None and int(out) == 2 * int(cfg.in_channels)
