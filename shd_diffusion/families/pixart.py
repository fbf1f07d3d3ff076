"""PixArt-alpha / PixArt-Sigma (diffusers ``PixArtTransformer2DModel``).

Trained as DiT is: Gaussian diffusion with learned variance (the output holds 2 x the latent
channels: eps and the variance interpolation), the model taking the integer DDPM timestep. The
caption conditions it through cross-attention with the caption mask; PixArt-alpha 1024 also takes
the image resolution and aspect ratio (``use_additional_conditions``). SHD distils each block's
self-attention (``attn1``); ``distill.cross_attention`` adds each block's cross-attention (``attn2``,
image queries over caption keys), which the default numbering skips (:mod:`shd_diffusion.t2i_attention`).
"""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel
from torch import Tensor, nn

from .text import text_family

__all__ = ["PIXART", "pixart_forward"]

VAE_FACTOR = 8  # pixels per latent cell of PixArt's SD / SDXL VAE (resolution conditioning is in pixels)


def _added_conditions(model: nn.Module, x: Tensor) -> dict[str, Tensor | None]:
    """``added_cond_kwargs``: None for both unless the model uses them (PixArt-alpha 1024)."""
    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    b, _, h, w = x.shape
    pixels = torch.tensor([h * VAE_FACTOR, w * VAE_FACTOR], dtype=x.dtype, device=x.device).expand(b, 2)  # (B, 2)
    return {"resolution": pixels, "aspect_ratio": pixels[:, :1] / pixels[:, 1:]}  # (B, 2), (B, 1) height / width


def pixart_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """eps and variance (B, 2C, H, W) for latents x_t (B, C, H, W) at DDPM timesteps t (B,)."""
    mask = cond.get("prompt_mask")
    return model(x_t, encoder_hidden_states=cond["prompt_embeds"], timestep=t,
                 encoder_attention_mask=None if mask is None else mask.to(x_t.dtype),
                 added_cond_kwargs=_added_conditions(model, x_t), return_dict=False)[0]


PIXART = text_family(
    PixArtTransformer2DModel,
    forward=pixart_forward,
    cond_keys=("prompt_embeds",),  # prompt_mask is used when stored
    latent_channels=lambda model: int(model.config.in_channels),
    packed=False,
    text_width="caption_channels",
    objective="diffusion",
    learn_sigma=lambda model: int(model.config.out_channels) == 2 * int(model.config.in_channels),
)
