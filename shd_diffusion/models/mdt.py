"""MDTv2 (Gao et al., Masked Diffusion Transformer v2).

Same parameter names and math as sail-sg/MDT ``masked_diffusion/models.py`` (class ``MDTv2``),
so official checkpoints load with ``strict=True`` and give the same outputs (tested against
reference outputs of the official code).

Layout: ``en_inblocks`` (half_depth) -> ``en_outblocks`` (half_depth, each fusing a U-Net-style
long skip from the mirrored in-block) -> [masked pass only: side-interpolater ``sideblocks.0``]
-> ``de_blocks`` (decode_layer, each fusing the input embedding) -> ``final_layer``, with
half_depth = (depth - decode_layer) / 2. Every attention adds a BEiT-style relative position bias.
"""

from __future__ import annotations

import math
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
    rand_uniform,
    guided_output,
    unpatchify,
)
from shd_diffusion.precision import compute_dtype

__all__ = [
    "MDTv2",
    "RelativePositionBias",
    "gather_rows",
    "RelPosAttention",
    "random_masking",
    "power_cosine_cfg_scale",
    "MASK_RATIO_JITTER",
    "MDT_DECODE_LAYER",
    "MDT_MASK_RATIO",
    "MDTV2_CONFIGS",
]

# The masked pass draws its mask ratio from U(mask_ratio, mask_ratio + MASK_RATIO_JITTER) (upstream).
MASK_RATIO_JITTER = 0.2


class _RowGather(torch.autograd.Function):
    """``table[index]`` whose backward sums repeated rows in a fixed order on CPU.

    Autograd's own backward of advanced indexing is ``index_put_(accumulate=True)``, which on CPU
    adds duplicate rows from several threads in a varying order, so two identical runs drift
    apart in the last bits. ``index_add_`` reduces them deterministically on CPU. On CUDA the
    sort-based ``index_put_`` is the deterministic one (``index_add_`` uses atomics there).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.num_rows = table.shape[0]
        return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[1])  # (*index, H)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        flat_index = index.reshape(-1)  # (M,)
        flat_grad = grad.reshape(flat_index.numel(), -1)  # (M, H)
        out = flat_grad.new_zeros(ctx.num_rows, flat_grad.shape[1])  # (R, H)
        if out.device.type == "cpu":
            return out.index_add_(0, flat_index, flat_grad), None
        return out.index_put_((flat_index,), flat_grad, accumulate=True), None


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``table`` (R, H) at ``index`` (any shape): (*index.shape, H), the same values as
    ``table[index]``, with a gradient that is bitwise reproducible run to run (see _RowGather)."""
    return _RowGather.apply(table, index)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by the 2D offset between two tokens of a square grid (BEiT).

    The table has (2G-1)^2 + 3 rows like BEiT's (the 3 extra rows are for class-token pairs,
    unused here, kept so the official checkpoints load).

    Args:
        grid_size: tokens per side G (N = G*G tokens).
        num_heads: H.
    """

    def __init__(self, grid_size: int, num_heads: int) -> None:
        super().__init__()
        self.grid_size = grid_size
        span = 2 * grid_size - 1
        self.num_relative_distance = span * span + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(self.num_relative_distance, num_heads))
        coords = torch.stack(
            torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
        ).flatten(1)  # (2, N): (row, col) of each token, row-major
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N) offsets query - key
        index = (rel[0] + grid_size - 1) * span + (rel[1] + grid_size - 1)  # (N, N) in [0, span^2)
        # Persistent: the official state dicts carry it, and strict loading expects it.
        self.register_buffer("relative_position_index", index, persistent=True)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The bias for all token pairs, or only between each sample's kept tokens.

        Args:
            ids_keep: (B, K) indices of the tokens a masked pass keeps, or None for all N tokens.

        Returns:
            (H, N, N), or (B, H, K, K) with ``ids_keep``.
        """
        table, index = self.relative_position_bias_table, self.relative_position_index
        if ids_keep is None:
            return gather_rows(table, index).permute(2, 0, 1).contiguous()  # (N, N, H) -> (H, N, N)
        pairs = index[ids_keep[:, :, None], ids_keep[:, None, :]]  # (B, K, K) table rows, no grad
        return gather_rows(table, pairs).permute(0, 3, 1, 2).contiguous()  # (B, K, K, H) -> (B, H, K, K)


class RelPosAttention(Attention):
    """:class:`Attention` with MDT's relative position bias as the additive logit bias.

    Args:
        dim: D. num_heads: H. grid_size: tokens per side G. qkv_bias: bias on ``qkv``.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int, qkv_bias: bool = True) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.rel_pos_bias = RelativePositionBias(grid_size, num_heads)

    def attention_bias(self, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Relative bias for all tokens, or only between the kept tokens of a masked pass.

        Args:
            ids_keep: (B, K) indices of the tokens this layer sees, or None for all N tokens.

        Returns:
            (1, H, N, N), or (B, H, K, K) gathered to the kept tokens.
        """
        if ids_keep is None:
            return self.rel_pos_bias().unsqueeze(0)  # (1, H, N, N)
        return self.rel_pos_bias(ids_keep)  # (B, H, K, K)


def random_masking(
    x: torch.Tensor, num_keep: int, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of tokens per sample (MAE-style shuffle by sorting noise).

    Args:
        x: (B, N, D) tokens.
        num_keep: K, tokens kept per sample.
        noise: (B, N) uniform noise; the K tokens with the smallest noise are kept.

    Returns:
        x_kept (B, K, D); mask (B, N) with 1 at removed tokens; ids_restore (B, N), the inverse
        permutation; ids_keep (B, K), original indices of the kept tokens.
    """
    b, n, d = x.shape
    ids_shuffle = noise.argsort(dim=1)  # (B, N)
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :num_keep]  # (B, K)
    x_kept = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, d))  # (B, K, D)
    mask = torch.ones(b, n, device=x.device)  # (B, N) in shuffled order
    mask[:, :num_keep] = 0  # the first K shuffled tokens are the kept ones
    mask = mask.gather(1, ids_restore)  # (B, N) back in token order
    return x_kept, mask, ids_restore, ids_keep


def power_cosine_cfg_scale(
    t: torch.Tensor,
    cfg_scale: float,
    diffusion_steps: int = 1000,
    scale_pow: float = 4.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """MDTv2's guidance schedule ``(s - 1) * (1 - cos(pi * (1 - t/T)^pow)) / 2 + 1``.

    The scale is ~1 near t = T (pure noise) and rises to s as t -> 0.

    Args:
        t: (B,) timesteps on the original T-step scale.
        cfg_scale: s, the scale reached at t = 0.
        diffusion_steps: T.
        scale_pow: the power (4 upstream).
        dtype: float32 (upstream) or float64 (a float64 model's guidance).

    Returns:
        (B,) per-sample guidance scales in ``dtype``.
    """
    ramp = (1 - torch.cos(math.pi * (1 - t.to(dtype) / diffusion_steps) ** scale_pow)) / 2
    return (cfg_scale - 1) * ramp + 1


class MDTv2(DiffusionTransformerBase):
    """Masked Diffusion Transformer v2. Keyword arguments and defaults are upstream's (XL/2).

    Args:
        input_size: latent side length. patch_size: p. in_channels: latent channels.
        hidden_size: D. depth: total blocks, excluding the side-interpolater.
        num_heads: H. mlp_ratio: MLP width / D.
        class_dropout_prob: label dropout in training (enables the null class for CFG).
        num_classes: number of classes. learn_sigma: also predict the variance interpolation.
        mask_ratio: minimum mask ratio of the masked pass (the ratio is drawn from
            U(mask_ratio, mask_ratio + 0.2)); None disables the masked pass and freezes
            ``mask_token`` like upstream.
        decode_layer: number of decoder blocks; depth - decode_layer must be even (split equally
            between en_inblocks and en_outblocks). Part of a checkpoint's architecture.
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
        mask_ratio: float | None = None,
        decode_layer: int = 4,
    ) -> None:
        super().__init__()
        decode_layer = int(decode_layer)
        if not 0 <= decode_layer <= depth or (depth - decode_layer) % 2:
            raise ValueError(
                f"decode_layer={decode_layer} does not split depth={depth}: need 0 <= decode_layer <= depth "
                "and depth - decode_layer even (the encoder has equal in/out halves)"
            )
        if mask_ratio is not None and not 0 <= mask_ratio < 1 - MASK_RATIO_JITTER:
            raise ValueError(
                f"mask_ratio={mask_ratio} must be in [0, {1 - MASK_RATIO_JITTER}): the masked pass draws "
                f"ratios up to mask_ratio + {MASK_RATIO_JITTER} and must keep some tokens"
            )
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.decode_layer = decode_layer
        self.half_depth = (depth - decode_layer) // 2

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches, grid = self.x_embedder.num_patches, self.x_embedder.grid_size
        # Learnable, initialised with the sin-cos table.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))

        def block(skip: bool) -> AdaLNZeroBlock:
            attn = RelPosAttention(hidden_size, num_heads, grid, qkv_bias=True)
            return AdaLNZeroBlock(hidden_size, num_heads, mlp_ratio, skip=skip, attn=attn)

        self.en_inblocks = nn.ModuleList(block(skip=False) for _ in range(self.half_depth))
        self.en_outblocks = nn.ModuleList(block(skip=True) for _ in range(self.half_depth))
        self.de_blocks = nn.ModuleList(block(skip=True) for _ in range(decode_layer))
        self.sideblocks = nn.ModuleList([block(skip=False)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        # Present in every official checkpoint; only trained when masking is on.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.mask_ratio is not None)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The shared upstream init, then MDT's own: decoder pos embed, zero patch bias, mask token.

        Upstream MDT zeroes the patch conv's bias (DiT keeps the conv default) and draws
        ``mask_token`` last, after every shared draw.
        """
        super().initialize_weights()
        self.decoder_pos_embed.data.copy_(self.pos_embed.data)  # (1, N, D) the same sin-cos table
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def attention_layers(self) -> list[Attention]:
        """Attention modules in execution order of the unmasked pass.

        en_inblocks, en_outblocks, de_blocks; not the side-interpolater, which only runs in the
        masked pass (so capture never touches it and it keeps the fast path).
        """
        return [blk.attn for blk in (*self.en_inblocks, *self.en_outblocks, *self.de_blocks)]

    def _draw_mask(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None,
        mask_ratio_draw: float | None = None,
        mask_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw this batch's mask ratio and per-sample keep sets, and drop the masked tokens.

        ``mask_ratio_draw`` (U(0, 1), one per batch) and ``mask_noise`` ((B, N) U(0, 1)) replace the
        generator's draws when given, so a caller can key them to the step and to each sample.
        """
        assert self.mask_ratio is not None
        b, n, _ = x.shape
        if mask_ratio_draw is None:
            # One ratio per batch; drawn on the CPU (or the generator's device) to avoid a GPU sync.
            where = generator.device if generator is not None else torch.device("cpu")
            mask_ratio_draw = float(rand_uniform((1,), generator, where))
        ratio = self.mask_ratio + MASK_RATIO_JITTER * mask_ratio_draw
        num_keep = int(n * (1 - ratio))
        if mask_noise is None:
            mask_noise = rand_uniform((b, n), generator, x.device)  # (B, N)
        elif mask_noise.shape != (b, n):
            raise ValueError(f"mask_noise must be (B, N) = ({b}, {n}), got {tuple(mask_noise.shape)}")
        return random_masking(x, num_keep, mask_noise)

    def forward_side_interpolater(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor
    ) -> torch.Tensor:
        """Fill the masked positions from the kept tokens (masked pass only).

        Args:
            x: (B, K, D) encoder output at the kept tokens. c: (B, D) condition.
            mask: (B, N), 1 at masked tokens. ids_restore: (B, N) inverse shuffle.

        Returns:
            (B, N, D): side-block output at masked positions, the encoder output elsewhere,
            both with ``decoder_pos_embed`` added.
        """
        b, k, d = x.shape
        n = ids_restore.shape[1]
        fill = self.mask_token.to(x.dtype).expand(b, n - k, d)  # (B, N-K, D)
        x = torch.cat([x, fill], dim=1)  # (B, N, D) in shuffled order
        x = x.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))  # (B, N, D) in token order
        x = x + self.decoder_pos_embed
        before = x
        for blk in self.sideblocks:
            x = self._run_block(blk, x, c, None, None)
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        # Only the masked positions take the interpolated tokens; kept ones pass through.
        return x * m + (1 - m) * before

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        enable_mask: bool = False,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        mask_ratio_draw: float | None = None,
        mask_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict noise (and variance interpolation) for noisy latents.

        Args:
            x: (B, C, H, W) noisy latents. t: (B,) timesteps. y: (B,) labels.
            enable_mask: run the masked pass (training): the encoder sees a random subset of
                tokens and the side-interpolater fills in the rest. Deterministic given
                ``generator``; needs ``mask_ratio``.
            force_drop_ids: (B,) 1 where the label must be replaced by the null class.
            generator: RNG for the label-dropout draw (train mode), then the mask draw.
            mask_ratio_draw: masked pass: U(0, 1) draw of the batch's extra mask ratio (ratio =
                mask_ratio + 0.2 * draw); None = from ``generator``.
            mask_noise: masked pass: (B, N) U(0, 1) per-token noise, the lowest K kept; None =
                from ``generator``.

        Returns:
            (B, C_out, H, W): eps in the first ``in_channels`` channels, then v if learn_sigma.
        """
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c = self._condition(t, y, force_drop_ids, generator)  # (B, D)
        input_skip = h  # the decoder blocks re-read the input embedding
        ids_keep = mask = ids_restore = None
        if enable_mask:
            if self.mask_ratio is None:
                raise ValueError("enable_mask=True needs a model built with mask_ratio (e.g. mask_ratio=0.3)")
            h, mask, ids_restore, ids_keep = self._draw_mask(h, generator, mask_ratio_draw, mask_noise)  # (B, K, D)

        skips = []
        for blk in self.en_inblocks:
            h = self._run_block(blk, h, c, None, ids_keep)
            skips.append(h)
        for blk in self.en_outblocks:
            h = self._run_block(blk, h, c, skips.pop(), ids_keep)

        if enable_mask:
            h = self.forward_side_interpolater(h, c, mask, ids_restore)  # (B, N, D)
        else:
            h = h + self.decoder_pos_embed
        for blk in self.de_blocks:
            h = self._run_block(blk, h, c, input_skip, None)
        h = self.final_layer(h, c)  # (B, N, p*p*C_out)
        return unpatchify(h, self.patch_size, self.out_channels)  # (B, C_out, H, W)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float | None = None,
        diffusion_steps: int = 1000,
        scale_pow: float = 4.0,
        guidance_channels: int | None = 3,
    ) -> torch.Tensor:
        """Classifier-free guided forward with MDTv2's power-cosine scale schedule.

        The batch's first half is conditional, the second half must carry ``null_class`` labels;
        as upstream, the latents of the first half are used for both halves and the guided eps
        replaces both halves. The scale of pair i is ``power_cosine_cfg_scale(t[i], ...)``.
        As upstream (sail-sg/MDT ``forward_with_cfg(x, t, y, cfg_scale=None, ...)``),
        ``cfg_scale=None`` means no guidance: a plain forward of the batch as given.

        Args:
            x: (2B, C, H, W) latents. t: (2B,) timesteps on the original 1000-step scale.
            y: (2B,) labels.
            cfg_scale: peak guidance scale s (the paper uses 3.8), or None for no guidance.
            diffusion_steps: T of the schedule. scale_pow: schedule power.
            guidance_channels: guide only eps channels ``[:3]`` like upstream (default); None
                guides all eps channels.

        Returns:
            (2B, C_out, H, W) guided output, float32 or float64 (see :func:`guided_output`); with
            ``cfg_scale=None``, ``forward(x, t, y)`` unchanged.
        """
        if cfg_scale is None:
            return self.forward(x, t, y)
        out = self.forward(cfg_pair_batch(x), t, y)  # (2B, C_out, H, W)
        half_t = t[: len(x) // 2]  # (B,)
        scale = power_cosine_cfg_scale(half_t, cfg_scale, diffusion_steps, scale_pow, compute_dtype(out))  # (B,)
        return guided_output(out, scale, self.in_channels, guidance_channels)


# --------------------------------------------------------------------------------------------
# Named configs: MDTv2-{S,B,L,XL}/2
# --------------------------------------------------------------------------------------------
# ``decode_layer`` is configuration, not a constant: it sets the encoder/decoder split, so it is
# part of a checkpoint's architecture (override it: ``create_model(name, decode_layer=k)``).
# The defaults are starting points:
#   - S/2 and B/2: 6, upstream's S/2 training script (``run.sh``: ``--decode_layer 6``). The
#     maintainers have said the MDT paper's values (not the README's) are the right ones for the
#     small models, so check the paper / checkpoint of the run you reproduce;
#   - L/2 and XL/2: 4, what the released MDTv2-XL/2 checkpoint is sampled with
#     (``run_sample.sh``; also upstream's constructor default). No L/2 recipe is published.

MDT_DECODE_LAYER: dict[str, int] = {"S": 6, "B": 6, "L": 4, "XL": 4}
MDT_MASK_RATIO = 0.3  # upstream training: --mask_ratio 0.30, so the masked pass is available

MDTV2_CONFIGS: dict[str, Callable[..., MDTv2]] = {
    f"MDTv2-{size}/2": partial(
        MDTv2,
        depth=depth,
        hidden_size=hidden,
        patch_size=2,
        num_heads=heads,
        decode_layer=MDT_DECODE_LAYER[size],
        mask_ratio=MDT_MASK_RATIO,
    )
    for size, (depth, hidden, heads) in PUBLISHED_SIZES.items()
}
