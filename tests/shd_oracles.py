"""Test oracles for SHD: the eq. (6) alpha and residual from the explicit N x D products.

Memory O(k N D) per group: never for training, only to check the head-dim-space solve.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


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

