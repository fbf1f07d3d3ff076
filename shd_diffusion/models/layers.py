"""Building blocks shared by DiT and MDTv2 (the base class they derive from is :mod:`.base`).

Parameter names follow the upstream code (facebookresearch/DiT, sail-sg/MDT, which take
``PatchEmbed`` and ``Mlp`` from timm), so official state dicts load with ``strict=True``:
``x_embedder.proj``, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table``,
``blocks.*.{attn,mlp.fc1,mlp.fc2,adaLN_modulation.1}``, ``final_layer.{linear,adaLN_modulation.1}``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shd_diffusion.attention import Attention
from shd_diffusion.precision import compute_dtype

__all__ = [
    "modulate",
    "rand_uniform",
    "get_2d_sincos_pos_embed",
    "PatchEmbed",
    "TimestepEmbedder",
    "LabelEmbedder",
    "Mlp",
    "AdaLNZeroBlock",
    "FinalLayer",
    "unpatchify",
    "cfg_pair_batch",
    "guided_output",
]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample shift/scale.

    Args:
        x: (B, N, D) normalised tokens.
        shift: (B, D). scale: (B, D).

    Returns:
        (B, N, D) modulated tokens.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (B, 1, D) broadcast over N


def _sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, embed_dim) as [sin(pos * omega), cos(pos * omega)], float64."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (D/2,)
    angles = pos.reshape(-1, 1).double() * omega.reshape(1, -1)  # (M, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of a square token grid (MAE/DiT convention).

    Tokens are in row-major order (index = row * grid_size + col). As upstream, the first half
    of the channels encodes the *column* and the second half the *row* (the MAE code builds its
    grid with ``meshgrid(w, h)``); computed in float64 like the numpy original.

    Args:
        embed_dim: D, divisible by 4.
        grid_size: tokens per side G.

    Returns:
        (G*G, D) float32 embedding.
    """
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos embedding needs hidden size divisible by 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # each (G, G)
    emb_col = _sincos_1d(embed_dim // 2, cols)  # (G*G, D/2)
    emb_row = _sincos_1d(embed_dim // 2, rows)  # (G*G, D/2)
    return torch.cat([emb_col, emb_row], dim=1).float()  # (G*G, D)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (timm's ``PatchEmbed`` layout: a strided conv ``proj``).

    Args:
        input_size: latent side length H = W.
        patch_size: patch side p (must divide ``input_size``).
        in_channels: latent channels C.
        hidden_size: token width D.
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, N, D) tokens in row-major patch order."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected latents of spatial size {self.input_size}x{self.input_size} "
                f"(the model's input_size), got {tuple(x.shape)}"
            )
        # A model cast to bf16 without autocast still accepts float32 latents.
        x = self.proj(x.to(self.proj.weight.dtype))  # (B, D, G, G)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> (B, D) vectors: sinusoidal features, then a 2-layer MLP.

    The features are computed in float32, as upstream, or in float64 when the MLP is float64
    (:func:`shd_diffusion.precision.compute_dtype`): float32 ``t * f`` with t up to 999 carries
    one ulp of ``exp`` times t, which differs between CPUs.

    Args:
        hidden_size: D.
        frequency_embedding_size: number of sinusoidal features (256 upstream).
        freq_shift: divide the frequency exponent by ``half - freq_shift`` instead of ``half``;
            1 is what diffusers' ``DiTTransformer2DModel`` computes, bit for bit.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0) -> None:
        super().__init__()
        if not 0 <= freq_shift < frequency_embedding_size // 2:
            raise ValueError(f"freq_shift must be in [0, {frequency_embedding_size // 2}), got {freq_shift}")
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = int(freq_shift)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    @staticmethod
    def timestep_embedding(
        t: torch.Tensor,
        dim: int,
        max_period: float = 10000.0,
        freq_shift: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """GLIDE/ADM sinusoidal features ``[cos(t * f), sin(t * f)]`` (cos first, as upstream).

        Args:
            t: (B,) timesteps, may be fractional.
            dim: feature count.
            max_period: sets the lowest frequency.
            freq_shift: exponent denominator ``dim // 2 - freq_shift`` (0 upstream, 1 diffusers).
            dtype: float32 (upstream) or float64.

        Returns:
            (B, dim) features in ``dtype``.
        """
        half = dim // 2
        exponent = -math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device)  # (half,)
        freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
        args = t.reshape(-1, 1).to(dtype) * freqs.reshape(1, -1)  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) -> (B, D)."""
        weight = self.mlp[0].weight
        freq = self.timestep_embedding(
            t, self.frequency_embedding_size, freq_shift=self.freq_shift, dtype=compute_dtype(weight)
        )  # (B, frequency_embedding_size)
        return self.mlp(freq.to(weight.dtype))


def rand_uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draw from ``generator`` (on its own device), moved to ``device``."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D) vectors, with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; the extra last row is the
    null class (:attr:`null_class` = ``num_classes``). As upstream, a model trained without label
    dropout has no null row (and cannot do CFG), which keeps its checkpoints loadable.

    Args:
        num_classes: number of real classes.
        hidden_size: D.
        dropout_prob: probability of replacing a label by the null class in training.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = float(dropout_prob)
        self.has_null_class = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (null) class."""
        if not self.has_null_class:
            raise ValueError("this model was built with class_dropout_prob=0: it has no null class for CFG")
        return self.num_classes

    def token_drop(
        self,
        labels: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Replace labels by the null class: randomly with ``dropout_prob``, or where forced.

        Args:
            labels: (B,) class ids.
            force_drop_ids: (B,) ints/bools; 1/True drops that label (no random draw).
            generator: RNG for the random draw.

        Returns:
            (B,) labels with dropped entries set to :attr:`null_class`.
        """
        if force_drop_ids is None:
            drop = rand_uniform((labels.shape[0],), generator, labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids.to(labels.device) == 1
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def forward(
        self,
        labels: torch.Tensor,
        train: bool,
        force_drop_ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """labels: (B,) -> (B, D); drops labels in training or where ``force_drop_ids`` says."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids, generator)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """Transformer MLP ``fc2(GELU_tanh(fc1(x)))`` with timm's parameter names.

    Args:
        in_features: D. hidden_features: inner width (mlp_ratio * D).
    """

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        return self.fc2(self.act(self.fc1(x)))


class AdaLNZeroBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT block; MDT block with ``skip``).

    Args:
        hidden_size: D.
        num_heads: attention heads (ignored when ``attn`` is given).
        mlp_ratio: MLP width / D.
        skip: add ``skip_linear: Linear(2D, D)`` that fuses a long-skip input first (MDT).
        attn: the attention module to use (default: plain :class:`Attention`).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        skip: bool = False,
        attn: Attention | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = attn if attn is not None else Attention(hidden_size, num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))
        self.skip_linear = nn.Linear(2 * hidden_size, hidden_size) if skip else None

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        skip: torch.Tensor | None = None,
        ids_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One block.

        Args:
            x: (B, K, D) tokens (K = N, or the K kept tokens of a masked pass).
            c: (B, D) condition (timestep + label embedding).
            skip: (B, K, D) long-skip input; required iff the block has ``skip_linear``.
            ids_keep: (B, K) original indices of the kept tokens in a masked pass (selects the
                attention bias entries), or None when all N tokens are present.

        Returns:
            (B, K, D) tokens.
        """
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("this block has skip_linear and needs a skip input")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, K, 2D) -> (B, K, D)
        # (B, 6D) -> six (B, D) modulations
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ids_keep=ids_keep)  # (B, K, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, K, D)
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its patch of outputs.

    Args:
        hidden_size: D. patch_size: p. out_channels: C_out.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D), c: (B, D) -> (B, N, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, 2D) -> two (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of patch embedding for per-token outputs.

    Args:
        x: (B, N, p*p*C) with N = G*G tokens in row-major order; channels vary fastest.
        patch_size: p. channels: C.

    Returns:
        (B, C, G*p, G*p) images.
    """
    b, n, _ = x.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"unpatchify needs a square token grid, got {n} tokens")
    x = x.reshape(b, g, g, patch_size, patch_size, channels)  # (B, Gh, Gw, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, Gh, p, Gw, p)
    return x.reshape(b, channels, g * patch_size, g * patch_size)  # (B, C, H, W)


def cfg_pair_batch(x: torch.Tensor) -> torch.Tensor:
    """The latents a CFG forward runs on: the first (conditional) half, twice (upstream).

    Args:
        x: (2B, C, H, W) latents whose second half belongs to the null-class samples.

    Returns:
        (2B, C, H, W) = cat([x[:B], x[:B]]).
    """
    if len(x) % 2:
        raise ValueError(f"CFG needs an even batch (conditional half + null half), got {len(x)}")
    half = x[: len(x) // 2]  # (B, C, H, W)
    return torch.cat([half, half], dim=0)  # (2B, C, H, W)


def guided_output(
    model_out: torch.Tensor, scale: torch.Tensor | float, eps_channels: int, guidance_channels: int | None
) -> torch.Tensor:
    """Classifier-free guidance on a batch whose first half is conditional, second half null.

    ``eps_guided = eps_uncond + scale * (eps_cond - eps_uncond)`` replaces the eps of *both*
    halves (upstream semantics, so the sampler sees a batch of identical pairs). Only the first
    ``guidance_channels`` channels are guided; the rest (the variance channels, and upstream's
    unguided 4th latent channel) are passed through per sample.

    The mix runs in float32 (also under autocast; float64 for a float64 model): a bf16
    difference scaled by ~4 loses the low bits of eps, and a bf16 scale would already be off
    (3.8 -> 3.797).

    Args:
        model_out: (2B, C_out, H, W) model output, any float dtype.
        scale: guidance scale, a float or a (B,) tensor per conditional sample.
        eps_channels: how many leading channels are eps (the latent channels).
        guidance_channels: guide channels ``[:guidance_channels]``; None guides all eps channels.

    Returns:
        (2B, C_out, H, W) guided output, float32 (float64 for a float64 ``model_out``).
    """
    if model_out.shape[0] % 2:
        raise ValueError(f"CFG needs an even batch (conditional half + null half), got {model_out.shape[0]}")
    k = eps_channels if guidance_channels is None else int(guidance_channels)
    if not 0 < k <= eps_channels:
        raise ValueError(f"guidance_channels must be in [1, {eps_channels}] or None, got {guidance_channels}")
    dtype = compute_dtype(model_out)
    model_out = model_out.to(dtype)  # elementwise ops are not autocast ops, so this stays in dtype
    eps, rest = model_out[:, :k], model_out[:, k:]  # (2B, k, H, W), (2B, C_out - k, H, W)
    cond, uncond = eps.chunk(2, dim=0)  # each (B, k, H, W)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=eps.device, dtype=dtype).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    half = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([half, half], dim=0), rest], dim=1)  # (2B, C_out, H, W)
