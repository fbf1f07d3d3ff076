"""diffusers' ``DiTTransformer2DModel`` with the timestep-frequency shift as a config entry.

diffusers' DiT hard-codes ``downscale_freq_shift=1`` in its timestep features; the original DiT
(and this package's :class:`~shd_diffusion.models.DiT` by default) uses 0. This subclass stores
``freq_shift`` in ``config.json`` so a DiT trained with the original features exports exactly.

The file imports only torch and diffusers: ``export`` copies it next to the weights, so the
folder loads without this package (``DiTPipeline.from_pretrained(dir, trust_remote_code=True)``).
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel
from diffusers.configuration_utils import register_to_config

__all__ = ["DiTTransformer2DModelFreqShift"]


class DiTTransformer2DModelFreqShift(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose timestep features divide by ``128 - freq_shift``.

    Arguments are ``DiTTransformer2DModel``'s (same defaults) plus ``freq_shift`` (0 = original
    DiT, 1 = the parent class).
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
        freq_shift: int = 0,
    ) -> None:
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
        )
        for block in self.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = freq_shift
