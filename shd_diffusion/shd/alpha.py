"""Where alpha is computed: the eq. (6) engine both SHD paths run, for every squeeze mode.

For one teacher layer, :func:`mode_alphas` returns each teacher head's weight alpha (B, H_t):

1. gather each group's inputs once -- its heads' values concatenated and the Gram of their
   out-projection columns (:func:`group_inputs`);
2. walk the teacher's T = 1 maps one block of query rows at a time (a :data:`Blocks` source) and
   add up the reduced normal equations of eq. (6) (:func:`~.solve.group_terms`), batched over the
   samples and the groups of one size: every term is a sum over query rows;
3. solve once per group size (:func:`~.solve.solve_alphas`: the closed form, then the simplex rule).

The row-block term training uses (:func:`~.chunked.shd_term`) feeds it blocks of c rows recomputed
from q and k; the whole-map reference (:func:`~.reference.squeeze_heads`) feeds it one block of all
N rows (:func:`whole_map_blocks`). The per-group math and its derivation live in :mod:`.solve`.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .groups import SqueezeMode
from .solve import check_ridge, group_terms, solve_alphas

__all__ = ["Blocks", "whole_map_blocks", "mode_alphas", "head_weights", "group_inputs", "take_heads", "put_heads"]


def head_weights(out_proj_weight: Tensor, num_teacher_heads: int, head_dim: int, dtype: torch.dtype) -> Tensor:
    """The out-projection (D, H*d) as per-head blocks W_i^T: (H, d, D) in ``dtype``."""
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


def take_heads(x: Tensor, heads: Sequence[int], dim: int = 1) -> Tensor:
    """x[:, heads] (along ``dim``); a view when the heads are one contiguous run (no copy of the maps)."""
    runs = _runs(heads)
    if len(runs) == 1:
        return x.narrow(dim, heads[0], len(heads))
    return torch.cat([x.narrow(dim, first, length) for first, _, length in runs], dim=dim)


def put_heads(x: Tensor, heads: Sequence[int], src: Tensor | float) -> None:
    """x[:, heads] = src in place (src: a tensor with len(heads) columns, or a scalar)."""
    for first, pos, length in _runs(heads):
        if isinstance(src, Tensor):
            x.narrow(1, first, length).copy_(src.narrow(1, pos, length))
        else:
            x.narrow(1, first, length).fill_(src)


def group_inputs(
    values: Tensor, w_heads: Tensor, heads: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Concatenated values (B, M, c) and out-projection Gram (c, c) of the original ``heads``.

    Args:
        values: (B, H_t, M, d) per-head values. w_heads: (H_t, d, D) from :func:`head_weights`.
        heads: the teacher heads of one group (or of a merged pseudo-head pair), c = len(heads) * d.
        dtype: the solve dtype.
    """
    b, _, m, d = values.shape
    vcat = take_heads(values, heads).to(dtype).permute(0, 2, 1, 3).reshape(b, m, len(heads) * d)  # (B, M, kd)
    w_g = take_heads(w_heads, heads, dim=0).reshape(len(heads) * d, -1)  # (kd, D)
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
    vals = take_heads(values, heads).to(dtype).reshape(b, g, k, m, d)  # (B, G, k, M, d)
    vcat = vals.transpose(2, 3).reshape(b, g, m, k * d)  # (B, G, M, kd): block i = head i of the group
    w_g = take_heads(w_heads, heads, dim=0).reshape(g, k * d, -1)  # (G, kd, D)
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
    maps = take_heads(probs, heads).to(dtype).reshape(b, g, k, n, m)  # (B, G, k, c, M)
    if head_outputs is None:
        return maps, None
    d = head_outputs.shape[-1]
    outs = take_heads(head_outputs, heads).to(dtype).reshape(b, g, k, n, d)  # (B, G, k, c, d)
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
            acc[k] = _add_terms(acc[k], group_terms(maps, vcat, gram_w, [d] * k, target))  # (B,G,k,k), (B,G,k), (B,G)
    for k, same in by_size.items():
        heads = [i for group in same for i in group]
        put_heads(alphas, heads, solve_alphas(*acc[k], ridge, project).flatten(1))  # (B, G*k)
    return alphas


def _node_map(probs: Tensor, alphas: Tensor, heads: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A merged pseudo-head's map sum_{i in heads} alpha_i A_i for a row block: (B, c, M)."""
    a = take_heads(alphas, heads)[:, :, None, None]  # (B, k, 1, 1)
    return (a * take_heads(probs, heads).to(dtype)).sum(1)  # (B, c, M)


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
        inputs = [group_inputs(values, w_heads, p + q, dtype) for p, q in pairs]
        acc: list[tuple[Tensor, ...] | None] = [None] * len(pairs)
        for probs, _ in blocks():
            for j, ((p, q), (vcat, gram_w)) in enumerate(zip(pairs, inputs)):
                maps = torch.stack([_node_map(probs, alphas, p, dtype), _node_map(probs, alphas, q, dtype)], 1)  # (B, 2, c, M)
                acc[j] = _add_terms(acc[j], group_terms(maps, vcat, gram_w, [len(p) * d, len(q) * d]))
        for (p, q), terms in zip(pairs, acc):
            a = solve_alphas(*terms, ridge, project)  # (B, 2)
            put_heads(alphas, p, take_heads(alphas, p) * a[:, :1])
            put_heads(alphas, q, take_heads(alphas, q) * a[:, 1:])
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
    ridge: float | None,
    project: bool,
    dtype: torch.dtype,
) -> Tensor:
    """(B, H_t) alphas of a squeeze mode from a block source of the teacher's T = 1 maps.

    The solve runs in ``dtype`` with autocast off (a bf16 Gram would be singular).

    Args:
        blocks: the teacher's T = 1 maps by blocks of query rows (see :data:`Blocks`).
        values: (B, H_t, M, d) per-head values. out_proj_weight: (D, H_t * d) (``nn.Linear`` layout).
        groups: the mode's resolved groups (:func:`~.groups.resolve_groups`).
        mode: "lstsq", "constant", "hard" or "progressive".
        ridge: see :func:`~.reference.squeeze_heads`; None = the ``dtype`` default (:func:`~.solve.check_ridge`).
        project: keep alpha on the simplex. dtype: the solve dtype (float32 or float64).

    Returns:
        (B, H_t) alphas in ``dtype``: each teacher head's weight in its group (0 for heads "hard" leaves out).
    """
    b, num_teacher_heads, _, d = values.shape
    if mode in ("constant", "hard"):
        alphas = torch.zeros(b, num_teacher_heads, dtype=dtype, device=values.device)
        for g in groups:
            put_heads(alphas, g[:1] if mode == "hard" else g, 1.0 if mode == "hard" else 1.0 / len(g))
        return alphas
    ridge = check_ridge(ridge, dtype)
    with torch.autocast(values.device.type, enabled=False):
        w_heads = head_weights(out_proj_weight, num_teacher_heads, d, dtype)  # (H, d, D)
        if mode == "lstsq":
            return _lstsq_alphas(blocks, values, w_heads, groups, ridge, project, dtype)
        return _progressive_alphas(blocks, values, w_heads, len(groups), ridge, project, dtype)
