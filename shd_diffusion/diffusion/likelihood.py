"""Pure Gaussian likelihood helpers of the variational bound (ADM's, kept numerically identical)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mean_flat", "normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood"]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all non-batch dimensions.

    Args:
        x: (B, ...) tensor.

    Returns:
        (B,) tensor.
    """
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats (broadcasting).

    Args:
        mean1, logvar1: mean and log-variance of the first Gaussian.
        mean2, logvar2: mean and log-variance of the second Gaussian.

    Returns:
        KL divergence, broadcast shape of the inputs.
    """
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Standard normal CDF via the tanh approximation (max abs error ~2e-4), as ADM uses.

    Kept instead of the exact ``erf`` so VB values stay comparable with the published
    (IDDPM/ADM/DiT/MDT) losses.

    Args:
        x: any tensor.

    Returns:
        Phi(x), same shape.
    """
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability of 8-bit data under a Gaussian integrated over each value's bin.

    ``x`` is assumed to be uint8 data rescaled to [-1, 1], so bins are ``2 / 255`` wide; the two
    extreme values take the whole tail beyond them.

    Args:
        x: data in [-1, 1].
        means: Gaussian means, same shape as ``x``.
        log_scales: Gaussian log standard deviations, same shape as ``x``.

    Returns:
        Elementwise log-likelihood in nats, same shape as ``x``.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (x - means + half_bin))
    cdf_lower = approx_standard_normal_cdf(inv_std * (x - means - half_bin))
    # Clamp before the log: deep in a tail the approximated CDF difference can underflow to 0.
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))  # bin [-inf, -1 + 1/255] for x = -1
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))  # bin [1 - 1/255, inf]
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    # 0.999 rather than 1.0 tolerates float noise in the rescaled data.
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))
