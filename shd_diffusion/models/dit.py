"""DiT (Peebles & Xie): class-conditional diffusion transformer with adaLN-Zero blocks.

Same parameter names and math as facebookresearch/DiT ``models.py``, so released EMA state
dicts load with ``strict=True`` and give the same outputs (tested against reference outputs of
the official code). Attention runs through :class:`shd_diffusion.attention.Attention`, so maps can
be captured with :func:`shd_diffusion.attention.capture_attention`.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from diffusers.configuration_utils import register_to_config
from torch import nn

from shd_diffusion.attention import Attention
from shd_diffusion.models.base import PUBLISHED_SIZES, DiffusionTransformerBase
from shd_diffusion.models.layers import (
    AdaLNZeroBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    cfg_pair_batch,
    guided_output,
    unpatchify,
)

__all__ = ["DiT", "DIT_CONFIGS"]


class DiT(DiffusionTransformerBase):
    """Diffusion transformer (DiT). Keyword arguments and defaults are upstream's (DiT-XL/2).

    Args:
        input_size: latent side length (32 for 256 px with the SD VAE).
        patch_size: patch side p.
        in_channels: latent channels.
        hidden_size: token width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        class_dropout_prob: label dropout in training (enables the null class for CFG).
        num_classes: number of classes (the label table has one more row, the null class).
        learn_sigma: also predict the variance interpolation v (2x in_channels outputs).
        freq_shift: timestep features use frequencies ``10000^(-i / (128 - freq_shift))``: 0 is
            the original DiT, 1 is diffusers' ``DiTTransformer2DModel`` (its ``Timesteps`` module
            hard-codes ``downscale_freq_shift=1``), so converted diffusers models stay exact.
        mlp_norm_eps: eps of the LayerNorm before each MLP (1e-6 upstream; diffusers' port uses
            its ``norm_eps``, 1e-5 by default).
    """

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=freq_shift)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table, kept as a frozen Parameter (not a buffer) because that is how the
        # official checkpoints store it.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        for block in self.blocks:
            block.norm2.eps = float(mlp_norm_eps)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def attention_layers(self) -> list[Attention]:
        """Attention modules in execution order: ``blocks[0..depth-1].attn``."""
        return [block.attn for block in self.blocks]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Predict noise (and variance interpolation) for noisy latents.

        Args:
            x: (B, C, H, W) noisy latents.
            t: (B,) timesteps in [0, 1000).
            y: (B,) class labels (``null_class`` for unconditional).
            force_drop_ids: (B,) 1 where the label must be replaced by the null class.
            generator: RNG for the label-dropout draw in train mode (reproducible training).

        Returns:
            (B, C_out, H, W): eps in the first ``in_channels`` channels, then v if learn_sigma.
        """
        # Under autocast the fp32 pos_embed promotes the sum, keeping the residual stream fp32.
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self._condition(t, y, force_drop_ids, generator)  # (B, D)
        for block in self.blocks:
            h = self._run_block(block, h, c)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, self.patch_size, self.out_channels)  # (B, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        guidance_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guided forward (upstream semantics, constant scale).

        The batch's first half is conditional, the second half must carry ``null_class`` labels;
        as upstream, the latents of the first half are used for both halves and the guided eps
        replaces both halves.

        Args:
            x: (2B, C, H, W) latents. t: (2B,) timesteps. y: (2B,) labels.
            cfg_scale: guidance scale s (1 = no guidance).
            guidance_channels: guide only eps channels ``[:3]`` like both upstreams (default, for
                comparable FID); None guides all eps channels.

        Returns:
            (2B, C_out, H, W) guided output, float32 or float64 (see :func:`guided_output`).
        """
        out = self.forward(cfg_pair_batch(x), t, y)  # (2B, C_out, H, W)
        return guided_output(out, float(cfg_scale), self.in_channels, guidance_channels)


# --------------------------------------------------------------------------------------------
# Named configs: DiT-{S,B,L,XL}/{2,4,8}, the published sizes and patch sizes
# --------------------------------------------------------------------------------------------

DIT_CONFIGS: dict[str, Callable[..., DiT]] = {
    f"DiT-{size}/{patch}": partial(DiT, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads)
    for size, (depth, hidden, heads) in PUBLISHED_SIZES.items()
    for patch in (2, 4, 8)
}
