"""Squeezing-Heads Distillation: squeeze teacher heads into student heads, map layers, the loss.

Where alpha is computed
-----------------------
For a group G of k teacher heads (one group per student head) the squeezed map is
``A~ = sum_i alpha_i A_i`` with ``sum_i alpha_i = 1``, and alpha minimises paper eq. (6)::

    f(alpha) = || A~ S - T ||_F^2,   S = sum_{j in G} X_j,   T = sum_{i in G} A_i X_i,
    X_i = V_i W_i^T  (N x D),        W_i = out_proj_weight[:, i*d:(i+1)*d]  (D x d).

Head-dim space. With V_G = [V_j]_{j in G} (M x kd) and W_G = [W_j]_{j in G} (D x kd),
``A_i S = (A_i V_G) W_G^T =: U_i W_G^T`` and ``T = Z W_G^T`` where Z takes block i of U_i
(``A_i V_i``). Every Frobenius product is then ``<P W_G^T, Q W_G^T> = tr(P^T Q W_G^T W_G)``:
a (kd x kd) Gram of the out-projection columns replaces the N x D products, and ``U_i`` is an
ordinary attention product. Only differences of the U_i enter (below), so the products are taken
of map differences, ``E_i = (A_i - A_0) V_G``: k - 1 attention-sized products (N x M x kd) per
group plus O(N (kd)^2), with rounding relative to how much the heads differ (TF32 matmuls stay
accurate). Z itself only sets the ridge's scale; the teacher's attention already computed it
(``head_outputs``), otherwise it costs k products of width d.

Solution. Write ``alpha = u + delta`` with ``u = 1/k`` (uniform) and ``sum(delta) = 0``. On that
affine hull ``sum_i delta_i A_i S = sum_i delta_i (U_i - Ubar) W_G^T`` (Ubar = mean_i U_i), so

    f = delta^T Mc delta + 2 h^T delta + f(u),
    Mc_ij = <C_i Gw, C_j>,  h_i = <C_i Gw, R>,  C_i = U_i - Ubar,  R = Ubar - Z,  Gw = W_G^T W_G.

``Mc 1 = 0`` and ``h . 1 = 0``, so the constrained minimiser (the KKT solution of the bordered
system) is ``delta = -(Mc + ridge I + 1 1^T)^{-1} h``: the rank-one term fixes the direction the
constraint removes and leaves delta in the sum-zero subspace. Centring on the uniform alpha means the
ridge pulls towards equal weights, which is the natural answer when heads are indistinguishable
(identical heads: Mc = 0, h = 0, alpha = 1/k exactly). The ridge is relative to the problem scale
``||T||^2``, the energy of the group's true output (1e-6 in float32, 1e-12 in float64), i.e. at the
float32 noise floor. It
must be at least the machine epsilon of the solve dtype: below that ``1 + ridge == 1`` and the
system is singular for indistinguishable heads (which the error-free solve would turn into NaN).

The simplex. The squeezed map is a KL target, so it must stay a distribution. When the
unconstrained optimum has a negative weight, alpha is replaced by the *exact* minimiser of eq. (6)
over the probability simplex (not the Euclidean projection of alpha, which can increase f by much
more than necessary). The simplex QP is solved exactly by enumerating supports: the optimum lies in
the relative interior of one face, where it is that face's equality-constrained minimiser; among
the feasible face minimisers the one with the smallest f wins. A face minimiser counts as feasible
when every weight is >= -64 eps max_i |alpha_i| (eps of the solve dtype: 7.6e-6 relative in
float32, 1.4e-14 in float64), a tolerance relative to alpha's own scale for the solve's rounding.
Groups of more than ``_MAX_ENUM_K`` heads (2^k faces) fall back to accelerated projected gradient.

Batching. All groups of one size are solved together (12 -> 6: one solve; 16 -> 6: one for the
size-3 and one for the size-2 groups), and nothing waits on the device: groups of up to
``_ALWAYS_ENUM_K`` heads run the face enumeration for every sample and keep it only where the free
alpha left the simplex (``torch.where``), solves skip the error check that would synchronise
(``solve_ex``; the ridge keeps the systems non-singular), and head lists are taken as slices of
their consecutive runs (a Python-list index is a blocking host-to-device copy). Only larger groups
still ask the host whether any sample needs the simplex step.

The T = 1 maps drive alpha (alpha preserves the teacher's real output); :func:`apply_alphas`
then applies the same alpha to the temperature-softened maps used for distillation (paper eq. 10).
alpha is treated as a constant (computed under ``torch.no_grad``), as in the paper.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SqueezeMode",
    "LossKind",
    "LossReduction",
    "default_groups",
    "validate_groups",
    "hard_selection",
    "progressive_groups",
    "resolve_groups",
    "head_similarity",
    "cluster_heads",
    "match_heads",
    "squeeze_heads",
    "apply_alphas",
    "project_simplex",
    "squeeze_objective",
    "naive_squeeze_alphas",
    "naive_squeeze_objective",
    "HeadSqueezer",
    "squeeze_layers",
    "layer_mapping",
    "validate_pair",
    "shd_loss",
]

SqueezeMode = Literal["lstsq", "constant", "hard", "progressive"]
_MODES: tuple[str, ...] = get_args(SqueezeMode)
LossKind = Literal["kl", "mse"]
LossReduction = Literal["sum", "mean"]

# Groups up to this size solve the simplex QP exactly by enumerating its 2^k - 1 faces.
_MAX_ENUM_K = 10
# Groups up to this size enumerate the faces for every sample (at most 15 tiny solves each), so the
# simplex step needs no data-dependent branch, i.e. no host sync.
_ALWAYS_ENUM_K = 4
# Ridge on the centred Gram, relative to ||T||_F^2 (the group's true output), per compute dtype.
_RIDGE = {torch.float64: 1e-12, torch.float32: 1e-6}


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------


def _check_head_counts(num_teacher_heads: int, num_student_heads: int) -> None:
    if num_teacher_heads < 1 or num_student_heads < 1:
        raise ValueError(
            f"head counts must be >= 1, got teacher {num_teacher_heads} and student {num_student_heads}"
        )
    if num_student_heads > num_teacher_heads:
        raise ValueError(
            f"student has {num_student_heads} heads > teacher {num_teacher_heads} heads: "
            "SHD squeezes teacher heads, it cannot create new ones"
        )


def default_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Contiguous groups of near-equal size, larger groups first (16 -> 6: sizes 3,3,3,3,2,2).

    Args:
        num_teacher_heads: H_t.
        num_student_heads: H_s <= H_t.

    Returns:
        H_s lists of teacher head indices; group j feeds student head j.
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    base, extra = divmod(num_teacher_heads, num_student_heads)
    groups, start = [], 0
    for j in range(num_student_heads):
        size = base + (1 if j < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def validate_groups(
    groups: Sequence[Sequence[int]],
    num_teacher_heads: int,
    num_student_heads: int,
    require_partition: bool = True,
) -> list[list[int]]:
    """Check a user grouping and return it as plain ``list[list[int]]`` (order kept).

    Args:
        groups: one sequence of teacher head indices per student head.
        num_teacher_heads: H_t. num_student_heads: H_s.
        require_partition: every teacher head must appear (True for squeezing; False lets
            :func:`apply_alphas` take the hard-selection groups, which skip heads).

    Returns:
        The groups as lists of ints.

    Raises:
        ValueError: naming the problem (count, empty group, bad index, duplicate, missing head).
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    if isinstance(groups, (str, bytes)) or len(groups) != num_student_heads:
        count = "a string" if isinstance(groups, (str, bytes)) else f"{len(groups)} groups"
        raise ValueError(
            f"head grouping has {count} but the student has {num_student_heads} heads: "
            "give exactly one group of teacher heads per student head"
        )
    seen: dict[int, int] = {}
    out: list[list[int]] = []
    for j, group in enumerate(groups):
        if isinstance(group, (int, str, bytes)) or len(group) == 0:
            raise ValueError(
                f"head group {j} is empty or not a list ({group!r}): every student head needs >= 1 teacher head"
            )
        ints = []
        for i in group:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"head group {j} contains {i!r}, which is not an integer head index")
            if not 0 <= i < num_teacher_heads:
                raise ValueError(
                    f"head group {j} contains head {i}, out of range for a teacher with "
                    f"{num_teacher_heads} heads (valid 0..{num_teacher_heads - 1})"
                )
            if i in seen:
                raise ValueError(f"teacher head {i} appears in head groups {seen[i]} and {j}: groups must be disjoint")
            seen[i] = j
            ints.append(int(i))
        out.append(ints)
    if require_partition:
        missing = sorted(set(range(num_teacher_heads)) - set(seen))
        if missing:
            raise ValueError(
                f"teacher heads {missing} are in no head group: the groups must cover all "
                f"{num_teacher_heads} teacher heads"
            )
    return out


def hard_selection(num_teacher_heads: int, num_student_heads: int, generator_seed: int = 0) -> list[int]:
    """The hard-selection ablation's teacher heads (paper Tab. 7): a seeded random subset.

    A CPU ``torch.Generator`` draws the subset, so it does not depend on the device; the heads are
    returned sorted and student head j imitates teacher head ``selection[j]``.

    Args:
        num_teacher_heads: H_t. num_student_heads: H_s. generator_seed: seed of the draw.

    Returns:
        H_s distinct sorted teacher head indices.
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    gen = torch.Generator().manual_seed(int(generator_seed))
    chosen = torch.randperm(num_teacher_heads, generator=gen)[:num_student_heads]
    return sorted(chosen.tolist())


def _halving_sequence(num_teacher_heads: int, num_student_heads: int) -> list[int]:
    seq = [num_teacher_heads]
    while seq[-1] > num_student_heads:
        seq.append((seq[-1] + 1) // 2)
    return seq


def progressive_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Teacher heads that end up in each student head under progressive pairwise merging.

    Each level merges adjacent pairs (2i, 2i+1) and carries an odd last head (Algorithm 1 of the
    authors' rebuttal): 9 -> 5 -> 3 gives [[0..3], [4..7], [8]].

    Args:
        num_teacher_heads: H_t.
        num_student_heads: H_s; must lie on the halving path of H_t (rounding up).

    Returns:
        H_s contiguous lists of teacher head indices, in head order; group j feeds student head j.

    Raises:
        ValueError: when halving (rounding up) never lands on H_s (e.g. 16 -> 8 -> 4, not 6).
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    seq = _halving_sequence(num_teacher_heads, num_student_heads)
    if seq[-1] != num_student_heads:
        path = " -> ".join(str(n) for n in _halving_sequence(num_teacher_heads, 1))
        raise ValueError(
            f"progressive squeezing halves the head count ({path}) and never reaches "
            f"{num_student_heads} student heads; use mode='lstsq' (direct k -> 1 groups) or a "
            "student head count on that path"
        )
    groups = [[i] for i in range(num_teacher_heads)]
    while len(groups) > num_student_heads:
        groups = [sum(groups[i : i + 2], []) for i in range(0, len(groups), 2)]
    return groups


def resolve_groups(
    num_teacher_heads: int,
    num_student_heads: int,
    mode: SqueezeMode = "lstsq",
    groups: Sequence[Sequence[int]] | None = None,
    generator_seed: int = 0,
) -> list[list[int]]:
    """The groups a squeeze mode uses, i.e. what :func:`apply_alphas` needs.

    Args:
        num_teacher_heads: H_t. num_student_heads: H_s.
        mode: "lstsq" / "constant" (``groups`` or :func:`default_groups`), "hard" (one selected
            head per group, see :func:`hard_selection`), "progressive" (:func:`progressive_groups`).
        groups: explicit grouping (lstsq/constant only).
        generator_seed: seed of the hard selection.

    Returns:
        H_s lists of teacher head indices.
    """
    if mode not in _MODES:
        raise ValueError(f"unknown squeeze mode {mode!r}; choose one of {', '.join(_MODES)}")
    if mode in ("hard", "progressive") and groups is not None:
        raise ValueError(
            f"squeeze mode {mode!r} chooses its own heads; explicit groups are only for 'lstsq' and 'constant'"
        )
    if mode == "hard":
        return [[i] for i in hard_selection(num_teacher_heads, num_student_heads, generator_seed)]
    if mode == "progressive":
        return progressive_groups(num_teacher_heads, num_student_heads)
    if groups is None:
        return default_groups(num_teacher_heads, num_student_heads)
    return validate_groups(groups, num_teacher_heads, num_student_heads)


@torch.no_grad()
def head_similarity(attn: Tensor) -> Tensor:
    """Sum over samples of the cosine similarity between every two heads' flattened maps.

    Summed (not averaged) so calibration can run in chunks: add the chunks' results and divide
    by the sample count. Computed in float32 with autocast off.

    Args:
        attn: (B, H, N, M) attention probabilities.

    Returns:
        (H, H) float32.
    """
    if attn.ndim != 4:
        raise ValueError(f"attn must be (B, H, N, M), got shape {tuple(attn.shape)}")
    with torch.autocast(attn.device.type, enabled=False):
        flat = F.normalize(attn.float().flatten(2), dim=-1)  # (B, H, N*M)
        return (flat @ flat.transpose(1, 2)).sum(0)  # (H, H)


def cluster_heads(similarity: Tensor, num_student_heads: int, max_group_size: int | None = None) -> list[list[int]]:
    """Greedy average-linkage clustering of heads into ``num_student_heads`` groups.

    Repeatedly merges the two most similar clusters (average of their pairwise similarities;
    ties: lowest head indices) until H_s remain.

    Args:
        similarity: (H_t, H_t) symmetric head similarities (e.g. :func:`head_similarity` / B).
        num_student_heads: H_s.
        max_group_size: optional cap on a group's size; merges beyond it are skipped.

    Returns:
        H_s groups, each sorted, ordered by their smallest head.

    Raises:
        ValueError: if ``max_group_size`` makes H_s groups unreachable by greedy merging.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be (H, H), got shape {tuple(similarity.shape)}")
    num_teacher_heads = similarity.shape[0]
    _check_head_counts(num_teacher_heads, num_student_heads)
    sim = similarity.tolist()
    clusters = [[i] for i in range(num_teacher_heads)]
    while len(clusters) > num_student_heads:
        best: tuple[float, int, int] | None = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            if max_group_size is not None and len(clusters[a]) + len(clusters[b]) > max_group_size:
                continue
            link = sum(sim[i][j] for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
            if best is None or link > best[0]:
                best = (link, a, b)
        if best is None:
            raise ValueError(
                f"head matching cannot reach {num_student_heads} groups with max_group_size="
                f"{max_group_size} (stuck at sizes {[len(c) for c in clusters]}); raise max_group_size or use None"
            )
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


def match_heads(
    attn_calib: Tensor, num_student_heads: int, max_group_size: int | None = None
) -> list[list[int]]:
    """Group similar teacher heads ("head matching", paper Tab. 5), once on a calibration batch.

    Similarity of heads a, b is the cosine similarity of their flattened maps, averaged over the
    calibration samples (per-sample rather than of batch-mean maps, because alpha is per sample:
    two heads that agree on every sample squeeze with no loss, mean maps can agree by accident).
    Groups come from :func:`cluster_heads` (greedy average linkage). For a calibration set too
    large for one batch, sum :func:`head_similarity` over chunks and call :func:`cluster_heads`.

    Args:
        attn_calib: (B, H_t, N, M) teacher probabilities on a calibration batch.
        num_student_heads: H_s.
        max_group_size: optional cap on a group's size; merges beyond it are skipped.

    Returns:
        H_s groups, each sorted, ordered by their smallest head.

    Raises:
        ValueError: if ``max_group_size`` makes H_s groups unreachable by greedy merging.
    """
    if attn_calib.ndim != 4:
        raise ValueError(f"attn_calib must be (B, H, N, M), got shape {tuple(attn_calib.shape)}")
    _check_head_counts(attn_calib.shape[1], num_student_heads)
    return cluster_heads(head_similarity(attn_calib) / attn_calib.shape[0], num_student_heads, max_group_size)


# --------------------------------------------------------------------------------------------
# Alpha: exact minimiser of eq. (6) in head-dim space
# --------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs solve in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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


def _group_terms(
    maps: Tensor, vcat: Tensor, gram_w: Tensor, widths: Sequence[int], target: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced quadratic of eq. (6) around the uniform alpha, in head-dim space.

    Everything is built from the map differences D_i = A_i - A_0: with E_i = D_i V_G (E_0 = 0),
    C_i = U_i - Ubar = E_i - Ebar and R = Ubar - Z has block i equal to -(block i of C_i). So only
    k - 1 attention-sized products are formed (one fewer than U_1..U_k), identical heads give
    exactly C = R = 0, and rounding (e.g. TF32 matmuls) is relative to the heads' *differences*,
    not to their outputs, which may be far larger.

    Leading dims ``...`` batch independent problems: (B,) for one group, (B, G) for G groups of
    the same size solved together.

    Args:
        maps: (..., k, N, M) maps of the k (pseudo-)heads, compute dtype.
        vcat: (..., M, c) values of all original heads under the group, concatenated.
        gram_w: (..., c, c) W_G^T W_G of their out-projection columns (broadcast over B: (c, c) or
            (G, c, c)).
        widths: k column counts: (pseudo-)head i owns the next widths[i] columns of ``vcat``
            (d for an original head, (number of heads) * d for a merged one).
        target: (..., N, c) Z, block i = A_i V_i (the teacher's per-head attention outputs), only
            for the problem scale; None = computed here (k products of width widths[i]).

    Returns:
        Mc (..., k, k), h (..., k), scale (...) = ||T||^2 = ||Z W_G^T||^2, with
        f(u + delta) - f(u) = delta^T Mc delta + 2 h^T delta.
    """
    k, n = maps.shape[-3], maps.shape[-2]
    bounds = [0, *itertools.accumulate(widths)]
    diffs = maps[..., 1:, :, :] - maps[..., :1, :, :]  # (..., k-1, N, M): D_i, exactly 0 for identical heads
    # One matmul for the k - 1 differences: stack their rows, so V_G is read once.
    e = (diffs.flatten(-3, -2) @ vcat).unflatten(-2, (k - 1, n))  # (..., k-1, N, c): E_i = D_i V_G
    e_bar = e.sum(-3, keepdim=True) / k  # (..., 1, N, c): mean over all k heads (E_0 = 0)
    centred = e - e_bar  # (..., k-1, N, c): C_1..C_{k-1}; C_0 = -Ebar = -(sum of these)
    own = [e_bar[..., 0, :, bounds[0] : bounds[1]]] + [
        -centred[..., i - 1, :, bounds[i] : bounds[i + 1]] for i in range(1, k)
    ]
    resid = torch.cat(own, dim=-1).flatten(-2)  # (..., N*c): R, residual of the uniform squeeze
    # Mc and h over heads 1..k-1; head 0's row/column follow from sum_i C_i = 0, so Mc 1 = 0 and
    # h . 1 = 0 hold exactly.
    c_w = (centred.flatten(-3, -2) @ gram_w).unflatten(-2, (k - 1, n)).flatten(-2)  # (..., k-1, N*c)
    m_red = c_w @ centred.flatten(-2).transpose(-2, -1)  # (..., k-1, k-1)
    h_red = (c_w @ resid.unsqueeze(-1)).squeeze(-1)  # (..., k-1)
    row = -m_red.sum(-2, keepdim=True)  # (..., 1, k-1): Mc_{0,j} = -sum_i Mc_ij
    corner = m_red.sum((-2, -1))[..., None, None]  # (..., 1, 1)
    mc = torch.cat([torch.cat([corner, row], -1), torch.cat([row.transpose(-2, -1), m_red], -1)], -2)  # (..., k, k)
    h = torch.cat([-h_red.sum(-1, keepdim=True), h_red], -1)  # (..., k)
    if target is None:
        target = torch.cat(
            [maps[..., i, :, :] @ vcat[..., bounds[i] : bounds[i + 1]] for i in range(k)], dim=-1
        )  # (..., N, c): Z
    scale = ((target @ gram_w) * target).sum((-2, -1))  # (...): ||T||^2, the group's true output energy
    return mc, h, scale


def _objective(q: Tensor, h: Tensor, alpha: Tensor) -> Tensor:
    """f(alpha) - f(u) of the (normalised, ridged) reduced quadratic; alpha (..., k)."""
    delta = alpha - 1.0 / alpha.shape[-1]
    return torch.einsum("...i,...ij,...j->...", delta, q, delta) + 2 * (h * delta).sum(-1)


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v (..., k) onto the probability simplex (sort-based)."""
    k = v.shape[-1]
    srt = v.sort(dim=-1, descending=True).values
    css = srt.cumsum(-1) - 1
    ranks = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    cond = srt - css / ranks > 0
    rho = cond.to(v.dtype).mul(ranks).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)


def _face_feasible(alpha: Tensor) -> Tensor:
    """(...) True where every weight of alpha (..., k) is >= -64 eps max_i |alpha_i| (rounding slack)."""
    tol = 64 * torch.finfo(alpha.dtype).eps * alpha.abs().amax(-1, keepdim=True)  # (..., 1)
    return (alpha >= -tol).all(-1)


def _simplex_qp_enum(q: Tensor, h: Tensor) -> Tensor:
    """Exact argmin of _objective over the simplex by enumerating faces. q (..., k, k), h (..., k)."""
    k = h.shape[-1]
    u = 1.0 / k
    bits = torch.arange(1, 2**k, device=h.device)
    masks = ((bits[:, None] >> torch.arange(k, device=h.device)) & 1).to(h.dtype)  # (F, k) faces
    nf = masks.shape[0]
    # Face S: [[Q_SS, 1_S], [1_S^T, 0]] [alpha; mu] = [(Q u - h)_S; 1], alpha_i = 0 off S.
    kkt = h.new_zeros(*h.shape[:-1], nf, k + 1, k + 1)  # (..., F, k+1, k+1)
    mm = masks[:, :, None] * masks[:, None, :]  # (F, k, k)
    kkt[..., :k, :k] = q.unsqueeze(-3) * mm + torch.diag_embed(1 - masks)
    kkt[..., :k, k] = masks
    kkt[..., k, :k] = masks
    rhs = h.new_zeros(*h.shape[:-1], nf, k + 1, 1)  # (..., F, k+1, 1)
    rhs[..., :k, 0] = (u * q.sum(-1) - h).unsqueeze(-2) * masks
    rhs[..., k, 0] = 1
    # Every face system is non-singular for a ridged q; solve_ex skips the check (a host sync).
    alpha = torch.linalg.solve_ex(kkt, rhs).result[..., :k, 0]  # (..., F, k)
    f = _objective(q.unsqueeze(-3), h.unsqueeze(-2), alpha)  # (..., F)
    f = f.masked_fill(~_face_feasible(alpha), float("inf"))
    best = f.argmin(-1)  # (...); singletons are always feasible
    return alpha.gather(-2, best[..., None, None].expand(*best.shape, 1, k)).squeeze(-2)  # (..., k)


def _simplex_qp_pgd(q: Tensor, h: Tensor, start: Tensor, iters: int = 2000) -> Tensor:
    """Accelerated projected gradient for large groups (approximate, converges to the optimum)."""
    step = 1.0 / (2 * torch.linalg.eigvalsh(q)[:, -1:]).clamp_min(1e-30)  # (P, 1) = 1 / Lipschitz
    k = h.shape[-1]
    x = y = project_simplex(start)
    t = 1.0
    for _ in range(iters):
        grad = 2 * (q @ (y - 1.0 / k).unsqueeze(-1)).squeeze(-1) + 2 * h
        x_new = project_simplex(y - step * grad)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def _renormalise(alpha: Tensor) -> Tensor:
    """Clip rounding-level negatives of a simplex solution and restore sum(alpha) = 1."""
    alpha = alpha.clamp_min(0)
    return alpha / alpha.sum(-1, keepdim=True)


def _solve_alphas(mc: Tensor, h: Tensor, scale: Tensor, ridge: float, project: bool) -> Tensor:
    """alpha (..., k) from the reduced quadratic: closed-form KKT, then the simplex if needed.

    Leading dims ``...`` are independent problems (samples, or samples x groups of one size).
    """
    k = h.shape[-1]
    s = scale.clamp_min(torch.finfo(scale.dtype).tiny).unsqueeze(-1)  # (..., 1)
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    q = mc / s.unsqueeze(-1) + ridge * eye  # (..., k, k), ridged in units of the problem scale
    hn = h / s  # (..., k)
    # + 1 1^T fixes sum(delta) = 0; ridge > 0 makes the system positive definite, so solve_ex can
    # skip the singularity check (a host sync on GPU).
    delta = -torch.linalg.solve_ex(q + 1.0, hn.unsqueeze(-1)).result.squeeze(-1)  # (..., k)
    alpha = delta + 1.0 / k
    if not project:
        return alpha
    bad = (alpha < 0).any(-1)  # (...) free optimum left the simplex
    if k <= min(_ALWAYS_ENUM_K, _MAX_ENUM_K):
        # Cheap enough for every sample: select without asking the host whether any is bad.
        return torch.where(bad.unsqueeze(-1), _renormalise(_simplex_qp_enum(q, hn)), alpha)
    if bool(bad.any()):  # larger groups: only the samples that need it (one host sync)
        if k <= _MAX_ENUM_K:
            fixed = _simplex_qp_enum(q[bad], hn[bad])
        else:
            fixed = _simplex_qp_pgd(q[bad], hn[bad], alpha[bad])
        alpha = alpha.clone()
        alpha[bad] = _renormalise(fixed)
    return alpha


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


def _group_batch(
    attn: Tensor,
    values: Tensor,
    w_heads: Tensor,
    groups: Sequence[Sequence[int]],
    dtype: torch.dtype,
    head_outputs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Stacked inputs of G groups of the same size k, for one batched solve.

    Returns:
        maps (B, G, k, N, M), concatenated values (B, G, M, kd), out-projection Grams (G, kd, kd),
        and the concatenated per-head outputs Z (B, G, N, kd) if ``head_outputs`` is given. The
        maps are a view of ``attn`` when the groups' heads form one contiguous run (defaults).
    """
    b, _, n, m = attn.shape
    d = values.shape[-1]
    g, k = len(groups), len(groups[0])
    heads = [i for group in groups for i in group]
    maps = _take_heads(attn, heads).to(dtype).reshape(b, g, k, n, m)  # (B, G, k, N, M)
    vals = _take_heads(values, heads).to(dtype).reshape(b, g, k, m, d)  # (B, G, k, M, d)
    vcat = vals.transpose(2, 3).reshape(b, g, m, k * d)  # (B, G, M, kd): block i = head i of the group
    w_g = _take_heads(w_heads, heads, dim=0).reshape(g, k * d, -1)  # (G, kd, D)
    target = None
    if head_outputs is not None:
        outs = _take_heads(head_outputs, heads).to(dtype).reshape(b, g, k, n, d)  # (B, G, k, N, d)
        target = outs.transpose(2, 3).reshape(b, g, n, k * d)  # (B, G, N, kd): Z
    return maps, vcat, w_g @ w_g.transpose(1, 2), target  # Gram (G, kd, kd)


@torch.no_grad()
def _lstsq_alphas(
    attn: Tensor,
    values: Tensor,
    w_heads: Tensor,
    groups: list[list[int]],
    ridge: float,
    project: bool,
    dtype: torch.dtype,
    head_outputs: Tensor | None = None,
) -> Tensor:
    b, num_teacher_heads, _, _ = attn.shape
    alphas = torch.ones(b, num_teacher_heads, dtype=dtype, device=attn.device)
    by_size: dict[int, list[list[int]]] = {}
    for group in groups:
        if len(group) > 1:  # singletons keep alpha = 1
            by_size.setdefault(len(group), []).append(group)
    for k, same in by_size.items():  # one solve per distinct group size, batched over samples x groups
        maps, vcat, gram_w, target = _group_batch(attn, values, w_heads, same, dtype, head_outputs)
        mc, h, scale = _group_terms(maps, vcat, gram_w, [values.shape[-1]] * k, target)  # (B,G,k,k), (B,G,k), (B,G)
        heads = [i for group in same for i in group]
        _put_heads(alphas, heads, _solve_alphas(mc, h, scale, ridge, project).flatten(1))  # (B, G*k)
    return alphas


@torch.no_grad()
def _progressive_alphas(
    attn: Tensor,
    values: Tensor,
    w_heads: Tensor,
    num_student_heads: int,
    ridge: float,
    project: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Algorithm 1: merge adjacent pairs with the pairwise-optimal alpha until H_s heads remain.

    A merged pseudo-head keeps its squeezed map A~ and stands for S = sum of its heads' X_i, so the
    next level solves eq. (6) for the pair with targets A~_p S_p + A~_q S_q. Original heads' final
    weights are the products of the alphas along their merge path.
    """
    b, num_teacher_heads, _, _ = attn.shape
    alphas = torch.ones(b, num_teacher_heads, dtype=dtype, device=attn.device)
    nodes: list[tuple[Tensor | None, list[int]]] = [(None, [i]) for i in range(num_teacher_heads)]

    def node_map(node: tuple[Tensor | None, list[int]]) -> Tensor:
        return attn[:, node[1][0]].to(dtype) if node[0] is None else node[0]  # (B, N, M)

    while len(nodes) > num_student_heads:
        merged = []
        for i in range(0, len(nodes), 2):
            if i + 1 == len(nodes):  # odd last head: carried to the next level unchanged
                merged.append(nodes[i])
                continue
            (p, q) = nodes[i], nodes[i + 1]
            maps = torch.stack([node_map(p), node_map(q)], dim=1)  # (B, 2, N, M)
            heads = p[1] + q[1]
            vcat, gram_w = _pair_inputs(values, w_heads, heads, dtype)
            d = values.shape[-1]
            mc, h, scale = _group_terms(maps, vcat, gram_w, [len(p[1]) * d, len(q[1]) * d])
            a = _solve_alphas(mc, h, scale, ridge, project)  # (B, 2)
            _put_heads(alphas, p[1], _take_heads(alphas, p[1]) * a[:, :1])
            _put_heads(alphas, q[1], _take_heads(alphas, q[1]) * a[:, 1:])
            new_map = a[:, 0, None, None] * maps[:, 0] + a[:, 1, None, None] * maps[:, 1]  # (B, N, M)
            merged.append((new_map, heads))
        nodes = merged
    return alphas


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


def _check_ridge(ridge: float | None, dtype: torch.dtype) -> float:
    """The ridge to use: the dtype default for None, else a validated user value."""
    if ridge is None:
        return _RIDGE[dtype]
    eps = torch.finfo(dtype).eps
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < eps:
        raise ValueError(
            f"ridge={ridge!r} is not a finite number >= {eps:.1e} (machine epsilon of the {dtype} "
            "solve): a smaller ridge leaves the Gram of indistinguishable heads singular. "
            f"Pass ridge=None for the default ({_RIDGE[dtype]:g}) or a value >= {eps:.1e}"
        )
    return float(ridge)


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
            default :func:`default_groups`; pass :func:`match_heads` output for head matching.
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
    dtype = _compute_dtype(attn, values, out_proj_weight)
    ridge = _check_ridge(ridge, dtype)
    resolved = resolve_groups(num_teacher_heads, num_heads, mode, groups, generator_seed)
    if all(g == [j] for j, g in enumerate(resolved)) and num_teacher_heads == num_heads:
        return attn, torch.ones(b, num_teacher_heads, dtype=dtype, device=attn.device)

    if mode == "constant":
        alphas = torch.zeros(b, num_teacher_heads, dtype=dtype, device=attn.device)
        for g in resolved:
            _put_heads(alphas, g, 1.0 / len(g))
    elif mode == "hard":
        alphas = torch.zeros(b, num_teacher_heads, dtype=dtype, device=attn.device)
        _put_heads(alphas, [g[0] for g in resolved], 1.0)
    else:
        # The training step runs under autocast; a bf16 Gram would be singular, so the solve opts out.
        with torch.autocast(attn.device.type, enabled=False):
            w_heads = _head_weights(out_proj_weight, num_teacher_heads, values.shape[-1], dtype)  # (H, d, D)
            if mode == "lstsq":
                alphas = _lstsq_alphas(attn, values, w_heads, resolved, ridge, project, dtype, head_outputs)
            else:
                alphas = _progressive_alphas(attn, values, w_heads, num_heads, ridge, project, dtype)
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
    dtype = _compute_dtype(attn, values, out_proj_weight, alphas)
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
# Test oracle / benchmark baseline: the N x D formulation, written out literally
# --------------------------------------------------------------------------------------------


def _naive_products(
    attn: Tensor, values: Tensor, out_proj_weight: Tensor, group: Sequence[int], dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    d = values.shape[-1]
    a = attn[:, list(group)].to(dtype)  # (B, k, N, M)
    x = torch.stack(
        [values[:, i].to(dtype) @ out_proj_weight[:, i * d : (i + 1) * d].to(dtype).T for i in group], dim=1
    )  # (B, k, M, D): X_i = V_i W_i^T
    p = a @ x.sum(1, keepdim=True)  # (B, k, N, D): A_i S
    t = (a @ x).sum(1)  # (B, N, D): sum_i A_i X_i
    return p, t


def naive_squeeze_alphas(
    attn: Tensor,
    values: Tensor,
    out_proj_weight: Tensor,
    groups: Sequence[Sequence[int]],
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """TEST ORACLE / benchmark baseline: unconstrained eq. (6) alpha from the explicit N x D products.

    Forms X_i = V_i W_i^T, P_i = A_i S and T literally, the Gram M_ij = <P_i, P_j> and
    c_i = <P_i, T>, and solves the bordered KKT system [[2M, 1], [1^T, 0]] by least squares
    (minimum-norm for singular Grams). No simplex projection. Memory O(k N D) per group.

    Returns:
        (B, H_t) alphas in ``dtype``.
    """
    b, num_teacher_heads = attn.shape[:2]
    alphas = torch.ones(b, num_teacher_heads, dtype=dtype, device=attn.device)
    for group in groups:
        k = len(group)
        if k == 1:
            continue
        p, t = _naive_products(attn, values, out_proj_weight, group, dtype)
        gram = torch.einsum("bind,bjnd->bij", p, p)  # (B, k, k)
        cross = torch.einsum("bind,bnd->bi", p, t)  # (B, k)
        kkt = torch.zeros(b, k + 1, k + 1, dtype=dtype, device=attn.device)
        kkt[:, :k, :k] = 2 * gram
        kkt[:, :k, k] = 1
        kkt[:, k, :k] = 1
        rhs = torch.cat([2 * cross, torch.ones(b, 1, dtype=dtype, device=attn.device)], dim=1)
        alphas[:, group] = torch.linalg.lstsq(kkt, rhs.unsqueeze(-1)).solution.squeeze(-1)[:, :k]
    return alphas


def naive_squeeze_objective(
    attn: Tensor, values: Tensor, out_proj_weight: Tensor, groups: Sequence[Sequence[int]], alphas: Tensor
) -> Tensor:
    """TEST ORACLE: eq. (6) residual (B, H_s) from explicit N x D products, in float64."""
    out = []
    for group in groups:
        p, t = _naive_products(attn, values, out_proj_weight, group, torch.float64)
        err = torch.einsum("bk,bknd->bnd", alphas[:, list(group)].double(), p) - t  # (B, N, D)
        out.append(err.pow(2).sum((1, 2)))
    return torch.stack(out, dim=1)


# --------------------------------------------------------------------------------------------
# Per-layer convenience for the training loop
# --------------------------------------------------------------------------------------------


@dataclass
class HeadSqueezer:
    """How one teacher layer is squeezed for one student layer (groups resolved once).

    Attributes:
        teacher_heads: H_t. student_heads: H_s. mode: see :func:`squeeze_heads`.
        groups: explicit groups (e.g. from :func:`match_heads`); None = the mode's default.
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

    @classmethod
    def matched(cls, attn_calib: Tensor, student_heads: int, max_group_size: int | None = None) -> "HeadSqueezer":
        """An "lstsq" squeezer whose groups come from :func:`match_heads` on a calibration batch."""
        groups = match_heads(attn_calib, student_heads, max_group_size)
        return cls(attn_calib.shape[1], student_heads, "lstsq", groups)

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
# Layer mapping and pair validation
# --------------------------------------------------------------------------------------------


def layer_mapping(
    num_student_layers: int, num_teacher_layers: int, override: Sequence[int] | None = None
) -> list[int]:
    """Teacher layer (0-indexed) supervising each student layer.

    Student layer j (1-indexed) <- teacher layer round(j * L_t / L_s) (1-indexed), rounding halves
    up (floor(x + 0.5), computed in integers) rather than Python's banker's rounding, and at least
    teacher layer 1 when the student is deeper. 48 -> 24 maps student 4 to teacher 8 (index 7).

    Args:
        num_student_layers: L_s. num_teacher_layers: L_t.
        override: explicit 0-indexed teacher layer per student layer (validated).

    Returns:
        L_s teacher layer indices.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got student {num_student_layers} and teacher {num_teacher_layers}"
        )
    if override is not None:
        if len(override) != num_student_layers:
            raise ValueError(
                f"layer mapping override has {len(override)} entries but the student has "
                f"{num_student_layers} layers: give one teacher layer per student layer"
            )
        for j, t in enumerate(override):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_teacher_layers:
                raise ValueError(
                    f"layer mapping override[{j}] = {t!r} is not a teacher layer: the teacher has "
                    f"{num_teacher_layers} layers (0-indexed: 0..{num_teacher_layers - 1})"
                )
        return [int(t) for t in override]
    # floor(j L_t / L_s + 1/2) = (2 j L_t + L_s) // (2 L_s), exact in integers.
    return [
        max(1, (2 * j * num_teacher_layers + num_student_layers) // (2 * num_student_layers)) - 1
        for j in range(1, num_student_layers + 1)
    ]


def validate_pair(student_heads: int, teacher_heads: int, student_tokens: int, teacher_tokens: int) -> None:
    """Check that a student/teacher attention pair can be distilled with SHD.

    Args:
        student_heads: H_s of the student layer.
        teacher_heads: H_t of the teacher layer it imitates.
        student_tokens: N of the student's attention maps.
        teacher_tokens: N of the teacher's attention maps.

    Returns:
        None; the pair is valid when no error is raised.

    Raises:
        ValueError: different token grids, or more student heads than teacher heads.
    """
    if student_tokens != teacher_tokens:
        raise ValueError(
            f"teacher has {teacher_tokens} tokens but student has {student_tokens}: SHD needs the "
            "same token grid (same input_size/patch_size)"
        )
    if student_heads > teacher_heads:
        raise ValueError(
            f"student has {student_heads} heads > teacher {teacher_heads} heads: SHD squeezes "
            "teacher heads, it cannot create new ones"
        )
    if student_heads < 1:
        raise ValueError(f"student must have >= 1 head, got {student_heads}")


# --------------------------------------------------------------------------------------------
# Loss (paper eq. 11)
# --------------------------------------------------------------------------------------------


def shd_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    beta: float = 2.0,
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

    Args:
        student_maps: per layer (B, H_s, N, M) student probabilities (with graph).
        teacher_maps: per layer (B, H_s, N, M) squeezed teacher probabilities.
        beta: loss weight. kind: "kl" or "mse". reduction: "sum" or "mean". eps: log clamp.

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
        dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
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
