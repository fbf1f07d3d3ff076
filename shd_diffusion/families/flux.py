"""FLUX.1 (diffusers ``FluxTransformer2DModel``: double-stream, then single-stream blocks).

Rectified flow with FLUX's resolution-dependent shift: logit-normal t shifted by
``exp(flux_mu(image tokens))``, the model taking t itself (it scales by 1000 inside). Latents are
packed into 2 x 2 patches (a sequence of 4 C channels) with (0, row, column) position ids; text ids
are zero. Conditioning: T5 states and the pooled CLIP embedding; FLUX takes no caption mask
(upstream attends padded T5 tokens, so their keys stay in the map). A guidance-distilled model
(``guidance_embeds``, FLUX.1-dev) is told :data:`TRAIN_GUIDANCE`.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from ..diffusion.flow import FlowConfig, flux_mu
from .text import grid_ids, pack_2x2, text_family, unpack_2x2

__all__ = ["FLUX", "TRAIN_GUIDANCE", "flux_flow", "flux_forward"]

TRAIN_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: teacher and student are both told it


def flux_flow(latent_shape: tuple[int, ...]) -> FlowConfig:
    """Logit-normal t, shift exp(mu) with mu from the packed image sequence length (H/2 * W/2)."""
    _, h, w = latent_shape
    return FlowConfig(sampling="logit_normal", mu=flux_mu((h // 2) * (w // 2)), timestep_scale=1.0)


def flux_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """Velocity (B, C, H, W) for latents x_t (B, C, H, W) at times t (B,) in [0, 1]."""
    b, _, h, w = x_t.shape
    text = cond["prompt_embeds"]  # (B, L, D_text)
    guidance = torch.full((b,), TRAIN_GUIDANCE, device=x_t.device) if model.config.guidance_embeds else None
    out = model(pack_2x2(x_t), encoder_hidden_states=text, pooled_projections=cond["pooled_prompt_embeds"],
                timestep=t, img_ids=grid_ids(h // 2, w // 2, x_t.device),
                txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device), guidance=guidance,
                return_dict=False)[0]  # (B, H/2 * W/2, 4C)
    return unpack_2x2(out, h, w)


FLUX = text_family(
    FluxTransformer2DModel,
    forward=flux_forward,
    cond_keys=("prompt_embeds", "pooled_prompt_embeds"),
    latent_channels=lambda model: int(model.config.in_channels) // 4,
    packed=True,
    text_width="joint_attention_dim",
    pooled_width="pooled_projection_dim",
    objective="flow",
    flow=flux_flow,
    export_note=f"A student of a guidance-distilled teacher (FLUX.1-dev) reads `guidance_scale` as its embedded "
                f"guidance, as the teacher does; it was distilled at {TRAIN_GUIDANCE}.",
)
