"""Generative-model metrics as pure functions of feature / logit arrays (no I/O, no network).

Conventions follow the ADM evaluator (Dhariwal & Nichol 2021) and torch-fidelity:

* FID: Frechet distance between Gaussians fitted to Inception pool3 features.
* IS: exp(E_x KL(p(y|x) || p(y))) over ``splits`` contiguous chunks; mean and std over chunks.
* KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets (Binkowski et al. 2018).
* Precision / recall: k-NN manifolds (Kynkaenniemi et al. 2019), k = 3.

All heavy math runs in float64 unless stated, on numpy or torch; inputs may be either.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features.

    Args:
        features: (N, D), N >= 2.

    Returns:
        mu (D,), sigma (D, D), float64.
    """
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2 for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def covariance_factor(features: ArrayLike) -> np.ndarray:
    """B with B @ B.T == feature_stats(features)[1]: the centred features / sqrt(N - 1), transposed.

    For N <= D this rank-(N-1) factor is exact and much cheaper than factorising sigma itself.

    Args:
        features: (N, D), N >= 2.

    Returns:
        (D, N) float64.
    """
    f = _np64(features)
    return ((f - f.mean(axis=0)) / np.sqrt(f.shape[0] - 1)).T  # (D, N)


def _t64(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)


def _drop_roundoff(w: torch.Tensor) -> torch.Tensor:
    """Zero eigenvalues below round-off (n * eps * max|w|, as pinv's rcond).

    A singular covariance (N < D) has eigenvalues that are 0 in exact arithmetic but ~+-1e-13 in
    floating point; sqrt() would turn each into ~1e-7 and their sum would bias the trace by ~1e-3.
    """
    tol = w.shape[0] * torch.finfo(torch.float64).eps * w.abs().max().clamp_min(1e-300)
    return torch.where(w > tol, w, torch.zeros_like(w))


def _shifted(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m + c I, c) with c = max diag(m), so a symmetric PSD m has eigenvalues in [c, c + max eig].

    LAPACK's symmetric eigensolvers crawl on large clusters of (near-)zero eigenvalues, which every
    rank-deficient covariance has (500 x 500 of rank 15: seconds instead of milliseconds). The shift
    leaves eigenvectors unchanged and the absolute accuracy (eps * |m|) of the same order.
    """
    c = m.diagonal().max().clamp_min(0)
    return m + c * torch.eye(m.shape[0], dtype=m.dtype, device=m.device), c


def _psd_factor(sigma: torch.Tensor) -> torch.Tensor:
    """B with sigma = B B^T: Cholesky when sigma is positive definite, else eigh (V sqrt(w))."""
    chol, info = torch.linalg.cholesky_ex(sigma)
    if int(info) == 0:
        return chol  # (D, D) lower-triangular
    shifted, c = _shifted((sigma + sigma.T) / 2)
    w, v = torch.linalg.eigh(shifted)
    w = _drop_roundoff(w - c)
    keep = w > 0
    return v[:, keep] * w[keep].sqrt()  # (D, r)


def trace_sqrt_product(sigma1: ArrayLike, sigma2: ArrayLike, factor1: ArrayLike | None = None) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for PSD sigma1, sigma2, without a non-symmetric sqrtm.

    With sigma1 = B B^T, the non-zero eigenvalues of sigma1 sigma2 = B B^T sigma2 equal those of the
    symmetric PSD matrix B^T sigma2 B, so tr sqrtm(.) = sum sqrt(eigvalsh(B^T sigma2 B)). B is a
    Cholesky factor (positive definite sigma1), V sqrt(w) from eigh (singular sigma1), or the given
    ``factor1`` (e.g. :func:`covariance_factor`, cheap when N < D). No complex round-off as with
    scipy's sqrtm of the product.

    Args:
        sigma1, sigma2: (D, D) covariances.
        factor1: optional (D, r) B with B @ B.T == sigma1.

    Returns:
        The trace, as a Python float.
    """
    s2 = _t64(sigma2)
    b = _psd_factor(_t64(sigma1)) if factor1 is None else _t64(factor1)
    m = b.T @ s2 @ b  # (r, r)
    shifted, c = _shifted((m + m.T) / 2)
    w = torch.linalg.eigvalsh(shifted) - c
    return float(_drop_roundoff(w).sqrt().sum())


def frechet_distance(
    mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, factor1: ArrayLike | None = None
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
        factor1: optional (D, r) B with B @ B.T == sigma1 (see :func:`trace_sqrt_product`).

    Returns:
        The distance (>= 0 up to round-off), as a Python float.
    """
    mu1, mu2, s1, s2 = _np64(mu1), _np64(mu2), _np64(sigma1), _np64(sigma2)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"stat shapes disagree: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2, factor1))


def inception_score(logits: ArrayLike, splits: int = 10) -> tuple[float, float]:
    """Inception Score from classifier logits.

    Args:
        logits: (N, K) pre-softmax scores (the scorer passes torch-fidelity's ``logits_unbiased``,
            i.e. pool3 @ W without bias, as ADM's evaluator and torch-fidelity's ISC do).
        splits: number of contiguous chunks (np.array_split); N >= splits.

    Returns:
        (mean, std) of exp(mean_x KL(p(y|x) || p_chunk(y))) over chunks.
    """
    x = _np64(logits)
    if x.ndim != 2 or x.shape[0] < splits or splits < 1:
        raise ValueError(f"IS needs (N, K) logits with N >= splits={splits}, got shape {x.shape}")
    x = x - x.max(axis=1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(axis=1, keepdims=True))  # (N, K) log-softmax
    scores = []
    for chunk in np.array_split(log_p, splits):
        p = np.exp(chunk)  # (n, K)
        log_py = np.log(p.mean(axis=0))  # (K,) chunk marginal
        kl = (p * (chunk - log_py)).sum(axis=1)  # (n,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
    features1: ArrayLike,
    features2: ArrayLike,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: unbiased MMD^2 with kernel (x.y / d + 1)^3 over random subsets.

    Draws exactly as torch-fidelity's ``kid_features_to_metric``: one ``np.random.RandomState(seed)``;
    per subset ``choice(N1, subset_size, replace=False)`` rows of set 1, then the same for set 2.
    With the same seed (torch-fidelity's default ``rng_seed`` is 2020) the subsets, hence the
    values, match it (tested). For independent sets the estimate is unbiased. A set against *itself* reads
    slightly negative, E = -(2/N)(mean_i k(x_i, x_i) - mean_{i!=j} k(x_i, x_j)), because a row drawn
    into both subsets adds its diagonal kernel value to the cross term; with subset_size = N it is
    exactly that value.

    Args:
        features1, features2: (N1, D), (N2, D).
        num_subsets: number of subsets averaged.
        subset_size: rows per subset; must be <= min(N1, N2) and >= 2.
        seed: ``np.random.RandomState`` seed for the subset draws.

    Returns:
        (mean, std) of the per-subset MMD^2 estimates.
    """
    f1, f2 = _np64(features1), _np64(features2)
    n = min(len(f1), len(f2))
    if subset_size < 2 or subset_size > n:
        raise ValueError(
            f"KID subset_size={subset_size} needs 2 <= subset_size <= min(N1, N2) = {n}: "
            "lower the subset size or provide more samples"
        )
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    d, m = f1.shape[1], subset_size
    rng = np.random.RandomState(seed)  # legacy RNG on purpose: torch-fidelity's draws
    mmds = np.empty(num_subsets)
    for i in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]  # (m, D)
        y = f2[rng.choice(len(f2), m, replace=False)]  # (m, D)
        kxx = (x @ x.T / d + 1) ** 3  # (m, m)
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        # Unbiased: drop the diagonals of the within-set terms.
        sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds[i] = sxx + syy - 2 * kxy.mean()
    return float(mmds.mean()), float(mmds.std())


def _as_tensor(x: ArrayLike, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) via |a|^2 + |b|^2 - 2ab, clamped at 0."""
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * a @ b.T  # (A, B)
    return d.clamp_min_(0)


def knn_radii(
    features: ArrayLike,
    k: int = 3,
    batch_size: int = 10000,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour within the set.

    The point itself counts as the 0-th neighbour (distance 0), as in Kynkaenniemi et al.'s and
    ADM's code, so this is the k-th nearest *other* point. Computed in (batch, batch) blocks keeping
    a running k+1 smallest, so memory is O(batch^2), never O(N^2).

    Args:
        features: (N, D) with N > k.
        k: neighbourhood size.
        batch_size: block edge.
        dtype, device: compute dtype and device.

    Returns:
        (N,) squared radii.
    """
    f = _as_tensor(features, dtype, device)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {n}")
    radii = torch.empty(n, dtype=dtype, device=device)
    for i in range(0, n, batch_size):
        rows = f[i : i + batch_size]  # (b, D)
        best = torch.empty((rows.shape[0], 0), dtype=dtype, device=device)  # running k+1 smallest
        for j in range(0, n, batch_size):
            cand = torch.cat([best, _sq_dists(rows, f[j : j + batch_size])], dim=1)  # (b, <= k+1 + b')
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i : i + batch_size] = best[:, k]
    return radii


def precision_recall(
    real: ArrayLike,
    fake: ArrayLike,
    k: int = 3,
    batch_size: int = 10000,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019; ADM evaluator), k-NN manifolds.

    A set's manifold is the union of balls centred on its points with radius = distance to the
    point's k-th nearest neighbour in the same set. Precision = fraction of fake points inside the
    real manifold; recall = fraction of real points inside the fake manifold (boundary counts as
    inside). The fake-vs-real distance blocks are computed once and serve both directions.

    Args:
        real: (Nr, D) reference features.
        fake: (Nf, D) generated features.
        k: neighbourhood size (3 as in the paper and ADM).
        batch_size: block edge; memory is O(batch_size^2) regardless of Nr, Nf.
        dtype: compute dtype (float32 like ADM; float64 for exact small cases).
        device: compute device.

    Returns:
        (precision, recall) in [0, 1].
    """
    r = _as_tensor(real, dtype, device)
    f = _as_tensor(fake, dtype, device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dims differ: real {r.shape[1]} vs fake {f.shape[1]}")
    r_radii = knn_radii(r, k, batch_size, dtype, device)  # (Nr,)
    f_radii = knn_radii(f, k, batch_size, dtype, device)  # (Nf,)
    fake_in_real = torch.zeros(f.shape[0], dtype=torch.bool, device=device)
    real_in_fake = torch.zeros(r.shape[0], dtype=torch.bool, device=device)
    for i in range(0, f.shape[0], batch_size):
        for j in range(0, r.shape[0], batch_size):
            d = _sq_dists(f[i : i + batch_size], r[j : j + batch_size])  # (bf, br)
            fake_in_real[i : i + batch_size] |= (d <= r_radii[None, j : j + batch_size]).any(dim=1)
            real_in_fake[j : j + batch_size] |= (d <= f_radii[i : i + batch_size, None]).any(dim=0)
    return fake_in_real.double().mean().item(), real_in_fake.double().mean().item()
