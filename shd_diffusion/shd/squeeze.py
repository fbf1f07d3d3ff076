"""Squeezing a teacher layer's maps with alpha: batching groups, modes, applying the weights.

The math of alpha lives in :mod:`.solve`; this module gathers each group's inputs (maps, values,
out-projection Grams), batches the groups of one size into one solve, and implements the modes
(lstsq, constant, hard, progressive) on whole (B, H, N, M) maps. :mod:`.chunked` runs the same
accumulation over blocks of query rows without ever holding the maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import compute_dtype
from .groups import SqueezeMode, resolve_groups, validate_groups
from .solve import _check_ridge, _group_terms, _solve_alphas

__all__ = ["squeeze_heads", "apply_alphas", "squeeze_objective", "HeadSqueezer", "squeeze_layers"]


def _head_weights(out_proj_weight: Tensor, num_teacher_heads: int, head_dim: int, dtype: torch.dtype) -> Tensor:
    d_model = out_proj_weight.shape[0]
    return out_proj_weight.to(dtype).view(d_model, num_teacher_heads, head_dim).permute(1, 2, 0)  # (H, d, D)


def _runs(heads: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive indices: (first head, position in ``heads``, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, i in enumerate(heads):
        if runs and i == runs[-1][0] + runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, pos, 1))
    return runs


# Head lists are selected through slices of their consecutive runs, never through a Python list
# index: on GPU a list index is a blocking host-to-device copy, i.e. a host sync.


def _take_heads(x: Tensor, heads: Sequence[int], dim: int = 1) -> Tensor:
    """x[:, heads] (along ``dim``); a view when the heads are one contiguous run (no copy of the maps)."""
    runs = _runs(heads)
    if len(runs) == 1:
        return x.narrow(dim, heads[0], len(heads))
    return torch.cat([x.narrow(dim, first, length) for first, _, length in runs], dim=dim)


def _put_heads(x: Tensor, heads: Sequence[int], src: Tensor | float) -> None:
    """x[:, heads] = src in place (src: a tensor with len(heads) columns, or a scalar)."""
    for first, pos, length in _runs(heads):
        if isinstance(src, Tensor):
            x.narrow(1, first, length).copy_(src.narrow(1, pos, length))
        else:
            x.narrow(1, first, length).fill_(src)


def _owner_mask(sizes: Sequence[int], head_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(k, c) 0/1: pseudo-head i owns sizes[i] consecutive heads' worth of columns."""
    widths = torch.tensor(sizes, device=device) * head_dim
    blocks = torch.repeat_interleave(torch.arange(len(sizes), device=device), widths)  # (c,) owner of each column
    return F.one_hot(blocks, len(sizes)).T.to(dtype)  # (k, c)


def _pair_inputs(
    values: Tensor, w_heads: Tensor, heads: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Concatenated values (B, M, c) and out-projection Gram (c, c) of the original ``heads``."""
    b, _, m, d = values.shape
    vcat = _take_heads(values, heads).to(dtype).permute(0, 2, 1, 3).reshape(b, m, len(heads) * d)  # (B, M, kd)
    w_g = _take_heads(w_heads, heads, dim=0).reshape(len(heads) * d, -1)  # (kd, D)
    return vcat, w_g @ w_g.T  # (kd, kd)


# A block source: a callable that, each time it is called, yields the teacher's T = 1 maps for
# consecutive blocks of query rows, ``(probs (B, H_t, c, M), head outputs (B, H_t, c, d) or None)``.
# Every term of eq. (6) is a sum over query rows, so alpha accumulates over blocks; the whole-map
# path is one block of all N rows. Progressive squeezing calls the source once per level.
Blocks = Callable[[], Iterator[tuple[Tensor, Tensor | None]]]


def whole_map_blocks(attn: Tensor, head_outputs: Tensor | None = None) -> Blocks:
    """The block source of whole (B, H_t, N, M) maps: one block holding every query row."""
    return lambda: iter([(attn, head_outputs)])


def _group_values(
    values: Tensor, w_heads: Tensor, groups: Sequence[Sequence[int]], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Concatenated values (B, G, M, kd) and out-projection Grams (G, kd, kd) of G same-size groups."""
    b, _, m, d = values.shape
    g, k = len(groups), len(groups[0])
    heads = [i for group in groups for i in group]
    vals = _take_heads(values, heads).to(dtype).reshape(b, g, k, m, d)  # (B, G, k, M, d)
    vcat = vals.transpose(2, 3).reshape(b, g, m, k * d)  # (B, G, M, kd): block i = head i of the group
    w_g = _take_heads(w_heads, heads, dim=0).reshape(g, k * d, -1)  # (G, kd, D)
    return vcat, w_g @ w_g.transpose(1, 2)  # Gram (G, kd, kd)


def _group_maps(
    probs: Tensor, groups: Sequence[Sequence[int]], dtype: torch.dtype, head_outputs: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Maps (B, G, k, c, M) of G same-size groups, and their outputs Z (B, G, c, kd) if given.

    The maps are a view of ``probs`` when the groups' heads form one contiguous run (defaults).
    """
    b, _, n, m = probs.shape
    g, k = len(groups), len(groups[0])
    heads = [i for group in groups for i in group]
    maps = _take_heads(probs, heads).to(dtype).reshape(b, g, k, n, m)  # (B, G, k, c, M)
    if head_outputs is None:
        return maps, None
    d = head_outputs.shape[-1]
    outs = _take_heads(head_outputs, heads).to(dtype).reshape(b, g, k, n, d)  # (B, G, k, c, d)
    return maps, outs.transpose(2, 3).reshape(b, g, n, k * d)  # Z (B, G, c, kd)


def _add_terms(acc: tuple[Tensor, ...] | None, terms: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return terms if acc is None else tuple(a + t for a, t in zip(acc, terms))


@torch.no_grad()
def _lstsq_alphas(
    blocks: Blocks,
    values: Tensor,
    w_heads: Tensor,
    groups: list[list[int]],
    ridge: float,
    project: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Direct eq. (6) alpha per group: Gram terms summed over the row blocks, then one solve per size."""
    b, num_teacher_heads, _, d = values.shape
    alphas = torch.ones(b, num_teacher_heads, dtype=dtype, device=values.device)
    by_size: dict[int, list[list[int]]] = {}
    for group in groups:
        if len(group) > 1:  # singletons keep alpha = 1
            by_size.setdefault(len(group), []).append(group)
    inputs = {k: _group_values(values, w_heads, same, dtype) for k, same in by_size.items()}
    acc: dict[int, tuple[Tensor, ...] | None] = dict.fromkeys(by_size)
    for probs, outs in blocks():
        for k, same in by_size.items():  # batched over samples x groups of one size
            maps, target = _group_maps(probs, same, dtype, outs)
            vcat, gram_w = inputs[k]
            acc[k] = _add_terms(acc[k], _group_terms(maps, vcat, gram_w, [d] * k, target))  # (B,G,k,k), (B,G,k), (B,G)
    for k, same in by_size.items():
        heads = [i for group in same for i in group]
        _put_heads(alphas, heads, _solve_alphas(*acc[k], ridge, project).flatten(1))  # (B, G*k)
    return alphas


def _node_map(probs: Tensor, alphas: Tensor, heads: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A merged pseudo-head's map sum_{i in heads} alpha_i A_i for a row block: (B, c, M)."""
    a = _take_heads(alphas, heads)[:, :, None, None]  # (B, k, 1, 1)
    return (a * _take_heads(probs, heads).to(dtype)).sum(1)  # (B, c, M)


@torch.no_grad()
def _progressive_alphas(
    blocks: Blocks,
    values: Tensor,
    w_heads: Tensor,
    num_student_heads: int,
    ridge: float,
    project: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Algorithm 1: merge adjacent pairs with the pairwise-optimal alpha until H_s heads remain.

    A merged pseudo-head stands for its squeezed map A~ = sum alpha_i A_i (alpha so far) and for
    S = sum of its heads' X_i, so the next level solves eq. (6) for the pair with targets
    A~_p S_p + A~_q S_q. Original heads' final weights are the products of the alphas along their
    merge path. One pass over the row blocks per level.
    """
    b, num_teacher_heads, _, d = values.shape
    alphas = torch.ones(b, num_teacher_heads, dtype=dtype, device=values.device)
    nodes = [[i] for i in range(num_teacher_heads)]
    while len(nodes) > num_student_heads:
        pairs = [(nodes[i], nodes[i + 1]) for i in range(0, len(nodes) - 1, 2)]
        inputs = [_pair_inputs(values, w_heads, p + q, dtype) for p, q in pairs]
        acc: list[tuple[Tensor, ...] | None] = [None] * len(pairs)
        for probs, _ in blocks():
            for j, ((p, q), (vcat, gram_w)) in enumerate(zip(pairs, inputs)):
                maps = torch.stack([_node_map(probs, alphas, p, dtype), _node_map(probs, alphas, q, dtype)], 1)  # (B, 2, c, M)
                acc[j] = _add_terms(acc[j], _group_terms(maps, vcat, gram_w, [len(p) * d, len(q) * d]))
        for (p, q), terms in zip(pairs, acc):
            a = _solve_alphas(*terms, ridge, project)  # (B, 2)
            _put_heads(alphas, p, _take_heads(alphas, p) * a[:, :1])
            _put_heads(alphas, q, _take_heads(alphas, q) * a[:, 1:])
        # The odd last head is carried to the next level unchanged.
        nodes = [p + q for p, q in pairs] + ([nodes[-1]] if len(nodes) % 2 else [])
    return alphas


@torch.no_grad()
def mode_alphas(
    blocks: Blocks,
    values: Tensor,
    out_proj_weight: Tensor,
    groups: list[list[int]],
    mode: SqueezeMode,
    ridge: float,
    project: bool,
    dtype: torch.dtype,
) -> Tensor:
    """(B, H_t) alphas of a squeeze mode from a block source (see :data:`Blocks`).

    ``groups`` are the mode's resolved groups (:func:`~.groups.resolve_groups`); the solve runs in
    ``dtype`` with autocast off (a bf16 Gram would be singular).
    """
    b, num_teacher_heads, _, d = values.shape
    if mode in ("constant", "hard"):
        alphas = torch.zeros(b, num_teacher_heads, dtype=dtype, device=values.device)
        for g in groups:
            _put_heads(alphas, g[:1] if mode == "hard" else g, 1.0 if mode == "hard" else 1.0 / len(g))
        return alphas
    with torch.autocast(values.device.type, enabled=False):
        w_heads = _head_weights(out_proj_weight, num_teacher_heads, d, dtype)  # (H, d, D)
        if mode == "lstsq":
            return _lstsq_alphas(blocks, values, w_heads, groups, ridge, project, dtype)
        return _progressive_alphas(blocks, values, w_heads, len(groups), ridge, project, dtype)


def is_identity(groups: Sequence[Sequence[int]], num_teacher_heads: int) -> bool:
    """Whether squeezing is the identity: H_t == H_s and group j is teacher head j."""
    return len(groups) == num_teacher_heads and all(list(g) == [j] for j, g in enumerate(groups))


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
    ridge = _check_ridge(ridge, dtype)
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
    w_heads = _head_weights(out_proj_weight, num_teacher_heads, d, dtype)
    out = []
    for group in groups:
        maps = _take_heads(attn, group).to(dtype)  # (B, k, N, M)
        vcat, gram_w = _pair_inputs(values, w_heads, group, dtype)
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

