"""The whole-map reference: SHD on (B, H, N, M) attention maps held in memory.

What figures, analysis, the oracles in ``tests/`` and the whole-map objective (``WholeMapObjective``)
use: squeeze a teacher layer's maps with alpha (:func:`squeeze_heads`, :class:`HeadSqueezer`,
:func:`squeeze_layers`), apply alpha to softened maps (:func:`apply_alphas`), the eq. (6) residual
(:func:`squeeze_objective`) and the loss of paper eq. 11 (:func:`shd_loss`). Memory is O(B H N M)
per layer. Training computes the same numbers over blocks of query rows from q, k, v with
:func:`~.chunked.shd_term`; both run the one alpha engine, :func:`~.alpha.mode_alphas` (whole maps
are one block).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import compute_dtype
from .alpha import group_inputs, head_weights, mode_alphas, take_heads, whole_map_blocks
from .chunked import LossKind, LossReduction
from .groups import SqueezeMode, is_identity, resolve_groups, validate_groups
from .solve import check_ridge

__all__ = ["squeeze_heads", "apply_alphas", "squeeze_objective", "HeadSqueezer", "squeeze_layers", "shd_loss"]


def _owner_mask(sizes: Sequence[int], head_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(k, c) 0/1: pseudo-head i owns sizes[i] consecutive heads' worth of columns."""
    widths = torch.tensor(sizes, device=device) * head_dim
    blocks = torch.repeat_interleave(torch.arange(len(sizes), device=device), widths)  # (c,) owner of each column
    return F.one_hot(blocks, len(sizes)).T.to(dtype)  # (k, c)


def _check_squeeze_inputs(attn: Tensor, values: Tensor, out_proj_weight: Tensor) -> None:
    if attn.ndim != 4 or values.ndim != 4:
        raise ValueError(
            f"attn must be (B, H, N, M) and values (B, H, M, d); got {tuple(attn.shape)} and {tuple(values.shape)}"
        )
    b, h, _, m = attn.shape
    if values.shape[:3] != (b, h, m):
        raise ValueError(
            f"values {tuple(values.shape)} do not match attn {tuple(attn.shape)}: expected (B={b}, H={h}, M={m}, d)"
        )
    if out_proj_weight.ndim != 2 or out_proj_weight.shape[1] != h * values.shape[-1]:
        raise ValueError(
            f"out_proj_weight {tuple(out_proj_weight.shape)} must be (D, H*d) = (D, {h * values.shape[-1]}) "
            "in nn.Linear.weight layout (head i owns columns i*d:(i+1)*d)"
        )


def squeeze_heads(
    attn: Tensor,
    values: Tensor,
    out_proj_weight: Tensor,
    num_heads: int,
    groups: Sequence[Sequence[int]] | None = None,
    mode: SqueezeMode = "lstsq",
    generator_seed: int = 0,
    *,
    head_outputs: Tensor | None = None,
    project: bool = True,
    ridge: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Squeeze H_t teacher attention maps into ``num_heads`` maps (paper eq. 6), per sample.

    Args:
        attn: (B, H_t, N, N) teacher probabilities at T = 1 (N x M for cross-attention).
        values: (B, H_t, N, d) per-head values.
        out_proj_weight: (D, H_t*d) out-projection weight in ``nn.Linear.weight`` layout.
        num_heads: H_s, the student's head count.
        groups: explicit teacher-head groups (one per student head) for "lstsq"/"constant";
            default :func:`default_groups`; pass :func:`~.groups.cluster_heads` output for head matching.
        mode: "lstsq" (exact eq. 6 per group, default), "constant" (alpha = 1/k), "hard" (one
            seeded random teacher head per student head), "progressive" (pairwise merging).
        generator_seed: seed of the "hard" selection.
        head_outputs: (B, H_t, N, d) the teacher's per-head attention outputs A_i V_i, as
            ``capture_attention(..., export_values=True)`` exports them. Optional: they only set
            the ridge's scale ||T||^2 and save one attention-sized product per group ("lstsq").
        project: keep alpha on the simplex (exact constrained minimiser). False returns the
            unconstrained eq. (6) solution, whose maps may have negative entries (analysis only).
        ridge: ridge on the centred Gram relative to ||T||^2 (the group's true output); default 1e-6 (float32
            solves) / 1e-12 (float64). Must be finite and >= the solve dtype's machine epsilon
            (float32 1.2e-7, float64 2.2e-16); ridge = 0 leaves indistinguishable heads singular.

    Returns:
        maps (B, H_s, N, N) in ``attn``'s dtype, and alphas (B, H_t): each teacher head's weight in
        its group, in the solve dtype (float32, or float64 for float64 inputs; also under autocast,
        which the solve disables). If H_t == H_s with
        the default grouping, ``attn`` itself is returned with alphas all 1.
    """
    _check_squeeze_inputs(attn, values, out_proj_weight)
    b, num_teacher_heads, n, _ = attn.shape
    if head_outputs is not None and head_outputs.shape != (b, num_teacher_heads, n, values.shape[-1]):
        raise ValueError(
            f"head_outputs {tuple(head_outputs.shape)} must be (B, H_t, N, d) = "
            f"{(b, num_teacher_heads, n, values.shape[-1])}: the per-head attention outputs A_i V_i"
        )
    dtype = compute_dtype(attn, values, out_proj_weight)
    ridge = check_ridge(ridge, dtype)
    resolved = resolve_groups(num_teacher_heads, num_heads, mode, groups, generator_seed)
    if is_identity(resolved, num_teacher_heads):
        return attn, torch.ones(b, num_teacher_heads, dtype=dtype, device=attn.device)
    blocks = whole_map_blocks(attn, head_outputs)
    alphas = mode_alphas(blocks, values, out_proj_weight, resolved, mode, ridge, project, dtype)
    return apply_alphas(attn, alphas, resolved), alphas


def apply_alphas(maps: Tensor, alphas: Tensor, groups: Sequence[Sequence[int]]) -> Tensor:
    """Combine teacher maps with given weights: out[:, j] = sum_{i in groups[j]} alphas[:, i] maps[:, i].

    Use it to apply alphas computed from the T = 1 maps to temperature-softened maps (paper
    eq. 10): alpha preserves the teacher's real output, the softened maps are what is distilled.
    Accumulates in float32 (float64 for float64 maps), one group at a time to bound memory, and is
    differentiable with respect to ``maps``.

    Args:
        maps: (B, H_t, N, M) teacher maps (any temperature).
        alphas: (B, H_t) or (H_t,) weights, e.g. from :func:`squeeze_heads`.
        groups: H_s disjoint groups of teacher heads (need not cover all heads, as for "hard").

    Returns:
        (B, H_s, N, M) in ``maps``' dtype.
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be (B, H, N, M), got shape {tuple(maps.shape)}")
    b, num_teacher_heads, _, _ = maps.shape
    groups = validate_groups(groups, num_teacher_heads, len(groups), require_partition=False)
    if alphas.ndim == 1:
        alphas = alphas.expand(b, -1)
    if alphas.shape != (b, num_teacher_heads):
        raise ValueError(f"alphas {tuple(alphas.shape)} must be (B, H_t) = ({b}, {num_teacher_heads})")
    acc_dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    a = alphas.to(acc_dtype)[:, :, None, None]  # (B, H_t, 1, 1)
    out = []
    for group in groups:
        acc = a[:, group[0]] * maps[:, group[0]].to(acc_dtype)  # (B, N, M)
        for i in group[1:]:
            acc = acc + a[:, i] * maps[:, i].to(acc_dtype)
        out.append(acc.to(maps.dtype))
    return torch.stack(out, dim=1)  # (B, H_s, N, M)


@torch.no_grad()
def squeeze_objective(
    attn: Tensor, values: Tensor, out_proj_weight: Tensor, groups: Sequence[Sequence[int]], alphas: Tensor
) -> Tensor:
    """Eq. (6) residual ||A~_G S_G - T_G||_F^2 per sample and group, computed in head-dim space.

    Args:
        attn: (B, H_t, N, M). values: (B, H_t, M, d). out_proj_weight: (D, H_t*d).
        groups: H_s groups. alphas: (B, H_t).

    Returns:
        (B, H_s) residuals in the solve dtype.
    """
    _check_squeeze_inputs(attn, values, out_proj_weight)
    num_teacher_heads, d = attn.shape[1], values.shape[-1]
    dtype = compute_dtype(attn, values, out_proj_weight, alphas)
    w_heads = head_weights(out_proj_weight, num_teacher_heads, d, dtype)
    out = []
    for group in groups:
        maps = take_heads(attn, group).to(dtype)  # (B, k, N, M)
        vcat, gram_w = group_inputs(values, w_heads, group, dtype)
        u_all = maps @ vcat.unsqueeze(1)  # (B, k, N, c)
        owner = _owner_mask([1] * len(group), d, dtype, attn.device)
        target = torch.einsum("bknc,kc->bnc", u_all, owner)  # (B, N, c)
        err = torch.einsum("bk,bknc->bnc", alphas[:, group].to(dtype), u_all) - target  # (B, N, c)
        out.append(torch.einsum("bnc,bnc->b", err @ gram_w, err))
    return torch.stack(out, dim=1)  # (B, H_s)


# --------------------------------------------------------------------------------------------
# Per layer: the squeeze settings of one layer pair (the training loop keeps one per pair) and
# whole-map squeezing of a list of layers
# --------------------------------------------------------------------------------------------


@dataclass
class HeadSqueezer:
    """How one teacher layer is squeezed for one student layer (groups resolved once).

    Attributes:
        teacher_heads: H_t. student_heads: H_s. mode: see :func:`squeeze_heads`.
        groups: explicit groups (e.g. head matching's :func:`~.groups.cluster_heads`); None = the mode's default.
        seed: seed of the "hard" selection.
    """

    teacher_heads: int
    student_heads: int
    mode: SqueezeMode = "lstsq"
    groups: list[list[int]] | None = None
    seed: int = 0
    resolved: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.resolved = resolve_groups(self.teacher_heads, self.student_heads, self.mode, self.groups, self.seed)

    def __call__(
        self,
        probs: Tensor,
        values: Tensor,
        out_proj_weight: Tensor,
        maps: Tensor | None = None,
        head_outputs: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """alpha from the T = 1 ``probs``; returns (squeezed ``maps`` (or probs), alphas).

        ``head_outputs`` (B, H_t, N, d), optional: see :func:`squeeze_heads`.
        """
        if probs.shape[1] != self.teacher_heads:
            raise ValueError(f"teacher maps have {probs.shape[1]} heads, this squeezer expects {self.teacher_heads}")
        squeezed, alphas = squeeze_heads(
            probs, values, out_proj_weight, self.student_heads,
            groups=self.groups, mode=self.mode, generator_seed=self.seed, head_outputs=head_outputs,
        )
        if maps is not None and maps is not probs:
            squeezed = apply_alphas(maps, alphas, self.resolved)
        return squeezed, alphas


def squeeze_layers(
    squeezers: HeadSqueezer | Sequence[HeadSqueezer],
    probs: Sequence[Tensor],
    values: Sequence[Tensor],
    out_weights: Sequence[Tensor],
    maps: Sequence[Tensor] | None = None,
    head_outputs: Sequence[Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Squeeze a list of teacher layers (as exported by ``capture_attention(export_values=True)``).

    Args:
        squeezers: one per layer, or one shared by all layers.
        probs: per layer (B, H_t, N, N) T = 1 probabilities (drive alpha).
        values: per layer (B, H_t, N, d). out_weights: per layer (D, H_t*d).
        maps: per layer softened maps to squeeze with those alphas; None = squeeze ``probs``.
        head_outputs: per layer (B, H_t, N, d) per-head attention outputs (optional, see
            :func:`squeeze_heads`).

    Returns:
        (squeezed maps per layer (B, H_s, N, N), alphas per layer (B, H_t)).
    """
    n = len(probs)
    if isinstance(squeezers, HeadSqueezer):
        squeezers = [squeezers] * n
    lengths = {len(squeezers), len(values), len(out_weights), n}
    lengths |= {len(x) for x in (maps, head_outputs) if x is not None}
    if len(lengths) != 1:
        raise ValueError(
            "squeeze_layers needs one squeezer/values/weights(/maps/head_outputs) entry per layer, got "
            f"lengths {sorted(lengths)}"
        )
    out_maps, out_alphas = [], []
    for l in range(n):
        m, a = squeezers[l](
            probs[l], values[l], out_weights[l], None if maps is None else maps[l],
            None if head_outputs is None else head_outputs[l],
        )
        out_maps.append(m)
        out_alphas.append(a)
    return out_maps, out_alphas


# --------------------------------------------------------------------------------------------
# The loss on whole maps (paper eq. 11)
# --------------------------------------------------------------------------------------------


def shd_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    *,
    beta: float,
    kind: LossKind = "kl",
    reduction: LossReduction = "sum",
    eps: float = 1e-10,
) -> Tensor:
    """Per-sample SHD loss between student maps and squeezed teacher maps (paper eq. 11).

    Per layer l and student head j, with rows n = 1..N (query tokens) and keys k:
      * kind "kl":  (1/N) sum_n sum_k p_t log(p_t / p_s), i.e. KL(teacher || student) averaged
        over query rows; 0 log 0 = 0, and log p_s uses ``p_s.clamp_min(eps)`` (student maps are
        probabilities; entries below eps get no gradient through the log).
      * kind "mse": (1/(N M)) sum_n sum_k (p_s - p_t)^2.
    reduction "sum" adds these over all layers and heads (eq. 11, the paper default); "mean"
    divides that sum by the number of layer-heads sum_l H_s. The result is multiplied by beta.
    Teacher maps are detached; computation is in float32 (float64 for float64 students).

    The whole-map path (tests and benchmarks); training computes the same term blockwise
    with :func:`~.chunked.shd_term` and weights it by ``distill.shd_beta`` in the objective. So
    ``beta`` has no default: a caller says which weight it means (1.0 for the bare term).

    Args:
        student_maps: per layer (B, H_s, N, M) student probabilities (with graph).
        teacher_maps: per layer (B, H_s, N, M) squeezed teacher probabilities.
        beta: loss weight (keyword only; the paper uses 2.0 for image generation).
        kind: "kl" or "mse". reduction: "sum" or "mean". eps: log clamp.

    Returns:
        (B,) per-sample loss; the training loop reduces over the batch.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"unknown SHD loss kind {kind!r}; choose 'kl' or 'mse'")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown SHD reduction {reduction!r}; choose 'sum' or 'mean'")
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"shd_loss needs the same non-zero number of student and teacher layers, got "
            f"{len(student_maps)} and {len(teacher_maps)}"
        )
    total: Tensor | None = None
    count = 0
    for l, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(
                f"layer {l}: student maps {tuple(s.shape)} and squeezed teacher maps {tuple(t.shape)} "
                "must both be (B, H_s, N, M); squeeze the teacher to the student's head count first"
            )
        dtype = compute_dtype(s)
        s = s.to(dtype)
        t = t.detach().to(dtype)
        if kind == "kl":
            per_row = (torch.xlogy(t, t) - t * s.clamp_min(eps).log()).sum(-1)  # (B, H, N)
            per_head = per_row.mean(-1)  # (B, H)
        else:
            per_head = (s - t).pow(2).mean((-2, -1))  # (B, H)
        layer = per_head.sum(-1)  # (B,)
        total = layer if total is None else total + layer
        count += s.shape[1]
    assert total is not None
    if reduction == "mean":
        total = total / count
    return beta * total
