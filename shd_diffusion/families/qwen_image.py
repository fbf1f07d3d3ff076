"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``: double-stream MMDiT).

Rectified flow as FLUX (logit-normal t, shift ``exp(flux_mu(image tokens))`` with the constants
QwenImagePipeline falls back to, the model taking t in [0, 1]); latents packed into 2 x 2 patches
with ``img_shapes`` (1, H/2, W/2). Conditioning: Qwen2.5-VL states with their caption mask, which
the attention applies as a key mask, so padded caption keys get zero probability in both maps.
"""

from __future__ import annotations

from diffusers import QwenImageTransformer2DModel
from torch import Tensor, nn

from .flux import flux_flow
from .text import pack_2x2, text_family, unpack_2x2

__all__ = ["QWEN_IMAGE", "qwen_forward"]


def qwen_forward(model: nn.Module, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """Velocity (B, C, H, W) for latents x_t (B, C, H, W) at times t (B,) in [0, 1]."""
    b, _, h, w = x_t.shape
    out = model(pack_2x2(x_t), encoder_hidden_states=cond["prompt_embeds"],
                encoder_hidden_states_mask=cond["prompt_mask"], timestep=t,
                img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]  # (B, H/2 * W/2, 4C)
    return unpack_2x2(out, h, w)


QWEN_IMAGE = text_family(
    QwenImageTransformer2DModel,
    forward=qwen_forward,
    cond_keys=("prompt_embeds", "prompt_mask"),
    latent_channels=lambda model: int(model.config.in_channels) // 4,
    packed=True,
    text_width="joint_attention_dim",
    objective="flow",
    flow=flux_flow,
)
