"""The one VAE loader (latent models): a diffusers ``AutoencoderKL`` from a Hub id or a local folder.

Training (latents on the fly, preview grids), sampling (decoding), latent extraction and export
all load the decoder here, so the default, the offline error and the channel check are the same
everywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .cli import BadInput

__all__ = ["DEFAULT_VAE", "SD_VAE_SCALE_FACTOR", "load_vae", "resolve_vae_spec", "latent_normalization", "pipeline_latents"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE DiT and MDTv2 were trained and scored with
SD_VAE_SCALE_FACTOR = 0.18215  # makes SD-VAE latents roughly unit variance (LDM/DiT convention)


def resolve_vae_spec(spec: str | Path | None, in_channels: int, setting: str = "--vae") -> str | None:
    """``"auto"``/None -> None for 1/3-channel pixel models, :data:`DEFAULT_VAE` for latents;
    ``"none"`` -> None (refused for a latent model); anything else is returned as a string.
    ``setting`` is the flag or config key the user sets, named in every refusal."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return None if in_channels in (1, 3) else DEFAULT_VAE
    if spec == "none":
        if in_channels not in (1, 3):
            raise BadInput(f"{setting} none needs a pixel-space model (1 or 3 channels); this one has {in_channels}: "
                           f"set {setting} to a VAE")
        return None
    return spec


def load_vae(
    spec: str | Path | None, in_channels: int, device: str | torch.device = "cpu", setting: str = "--vae"
) -> nn.Module | None:
    """The frozen, eval-mode VAE for a model with ``in_channels`` channels, or None (pixel space).

    ``spec`` as :func:`resolve_vae_spec`. A folder or Hub id that cannot be loaded, or a VAE whose
    latent channels differ from the model's, is a :class:`~shd_diffusion.cli.BadInput` naming the fix.
    """
    name = resolve_vae_spec(spec, in_channels, setting)
    if name is None:
        return None
    from diffusers import AutoencoderKL  # heavy import, only for latent models

    try:
        vae = AutoencoderKL.from_pretrained(name)
    except (OSError, ValueError) as err:  # missing folder, bad config, offline without a cached copy
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        how = f"{setting} PATH" if setting.startswith("--") else f"{setting}=PATH"  # a flag or a config key
        raise BadInput(
            f"could not load the VAE {name!r} ({reason}): pass a local AutoencoderKL folder ({how}), "
            "or download the Hub id once with network access (it lands in the Hugging Face cache)"
        ) from None
    if vae.config.latent_channels != in_channels:
        raise BadInput(f"VAE {name!r} has {vae.config.latent_channels} latent channels, the model {in_channels}: "
                       f"set {setting} to a matching VAE")
    return vae.to(device).eval().requires_grad_(False)


def latent_normalization(vae: nn.Module) -> dict[str, object]:
    """How a text-to-image pipeline maps its VAE's raw latents to what its transformer reads.

    ``{"scale_factor": s, "shift_factor": m}``: z -> (z - m) * s (PixArt: m = 0; SD3 / FLUX.1 read
    ``vae.config.shift_factor``); Qwen-Image's VAE normalises per channel instead:
    ``{"latents_mean": [...], "latents_std": [...]}``, z -> (z - mean) / std. The inverse of what
    each pipeline does before ``vae.decode``.
    """
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        return {"latents_mean": [float(v) for v in mean], "latents_std": [float(v) for v in std]}
    shift = getattr(cfg, "shift_factor", None)
    return {"scale_factor": float(cfg.scaling_factor), "shift_factor": float(shift or 0.0)}


@torch.no_grad()
def pipeline_latents(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Latents of images exactly as a text-to-image family trains on them: the one place for this.

    The posterior mean (deterministic, as :func:`shd_diffusion.latents.encode_latents`), then the
    pipeline's normalisation (:func:`latent_normalization`), in float32.

    Args:
        vae: the pipeline's VAE (``AutoencoderKL``; ``AutoencoderKLQwenImage`` takes one frame).
        x: (B, 3, H, W) images in [-1, 1].

    Returns:
        (B, C, H/f, W/f) float32 latents, f the VAE's downsampling factor.
    """
    frames = type(vae).__name__ == "AutoencoderKLQwenImage"  # a video VAE: (B, 3, T, H, W) with T = 1
    x = x.to(device=next(vae.parameters()).device, dtype=vae.dtype)
    z = vae.encode(x[:, :, None] if frames else x).latent_dist.mean.float()  # (B, C, [1,] h, w)
    z = z[:, :, 0] if frames else z  # (B, C, h, w)
    norm = latent_normalization(vae)
    if "latents_mean" in norm:
        mean = torch.tensor(norm["latents_mean"], device=z.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
        std = torch.tensor(norm["latents_std"], device=z.device).view(1, -1, 1, 1)
        return (z - mean) / std
    return (z - norm["shift_factor"]) * norm["scale_factor"]
