"""Alpha for one group: the exact minimiser of paper eq. (6) in head-dim space, with the simplex rule.

:mod:`.alpha` runs it for a whole layer (gathering the groups, accumulating :func:`group_terms`
over blocks of query rows, calling :func:`solve_alphas` once per group size); this module holds
the per-group quadratic, its solve and the derivation.

The derivation
--------------
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
group plus O(k N (kd)^2) for the Gram, with rounding relative to how much the heads differ (TF32 matmuls stay
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
``||T||^2``, the energy of the group's true output: 1e-6 in float32 (about 8 eps, its noise
floor), 1e-12 in float64. It must be at least the machine epsilon of the solve dtype: below that
``1 + ridge == 1`` and the system is singular for indistinguishable heads (which the error-free
solve would turn into NaN).

The simplex. The squeezed map is a KL target, so it must stay a distribution. When the
unconstrained optimum has a negative weight, alpha is replaced by the *exact* minimiser of eq. (6)
over the probability simplex (not the Euclidean projection of alpha, which can increase f by much
more than necessary). The simplex QP is solved exactly by enumerating supports: the optimum lies in
the relative interior of one face, where it is that face's equality-constrained minimiser; among
the feasible face minimisers the one with the smallest f wins. A face minimiser counts as feasible
when every weight is >= -64 eps max_i |alpha_i| (eps of the solve dtype: 7.6e-6 relative in
float32, 1.4e-14 in float64), a tolerance relative to alpha's own scale for the solve's rounding.
Groups of more than ``_MAX_ENUM_K`` heads (2^k - 1 faces) fall back to accelerated projected gradient.

Batching. All groups of one size are solved together (12 -> 6: one solve; 16 -> 6: one for the
size-3 and one for the size-2 groups), and nothing waits on the device: groups of up to
``_ALWAYS_ENUM_K`` heads run the face enumeration for every sample and keep it only where the free
alpha left the simplex (``torch.where``), solves skip the error check that would synchronise
(``solve_ex``; the ridge keeps the systems non-singular), and head lists are taken as slices of
their consecutive runs (a Python-list index is a blocking host-to-device copy). Only larger groups
still ask the host whether any sample needs the simplex step.

The T = 1 maps drive alpha (alpha preserves the teacher's real output); :func:`~.reference.apply_alphas`
then applies the same alpha to the temperature-softened maps used for distillation (paper eq. 10).
alpha is treated as a constant (computed under ``torch.no_grad``), as in the paper.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["group_terms", "solve_alphas", "check_ridge", "project_simplex"]

# Groups up to this size solve the simplex QP exactly by enumerating its 2^k - 1 faces.
_MAX_ENUM_K = 10
# Groups up to this size enumerate the faces for every sample (at most 15 tiny solves each), so the
# simplex step needs no data-dependent branch, i.e. no host sync.
_ALWAYS_ENUM_K = 4
# Ridge on the centred Gram, relative to ||T||_F^2 (the group's true output), per compute dtype.
_RIDGE = {torch.float64: 1e-12, torch.float32: 1e-6}


def group_terms(
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


def solve_alphas(mc: Tensor, h: Tensor, scale: Tensor, ridge: float, project: bool) -> Tensor:
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


def check_ridge(ridge: float | None, dtype: torch.dtype) -> float:
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
