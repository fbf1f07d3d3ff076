"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``, MMDiT and MMDiT-X).

Rectified flow with SD3's training defaults: logit-normal t (mean 0, std 1) shifted by 3.0, the
model taking ``t * 1000``. Conditioning: per-token text states (CLIP-L/G + T5, concatenated) and
the pooled CLIP embedding; no caption mask (SD3 attends every text token). SHD distils the joint
attention of each block ([image, text] tokens; image-query rows) and SD3.5's dual image-only
self-attention where a block has it.
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from ..diffusion.flow import FlowConfig
from .text import text_family

__all__ = ["SD3", "SD3_FLOW", "sd3_forward"]

SD3_FLOW = FlowConfig(sampling="logit_normal", logit_mean=0.0, logit_std=1.0, shift=3.0, timestep_scale=1000.0)


def sd3_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """Velocity (B, C, H, W) for latents x_t (B, C, H, W) at model timesteps t (B,) (= 1000 t)."""
    return model(x_t, encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
                 timestep=t, return_dict=False)[0]


SD3 = text_family(
    SD3Transformer2DModel,
    forward=sd3_forward,
    cond_keys=("prompt_embeds", "pooled_prompt_embeds"),
    latent_channels=lambda model: int(model.config.in_channels),
    packed=False,
    text_width="joint_attention_dim",
    pooled_width="pooled_projection_dim",
    objective="flow",
    flow=lambda latent_shape: SD3_FLOW,
)
