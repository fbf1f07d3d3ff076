"""Gaussian diffusion with learned variance (improved DDPM / ADM), as DiT and MDTv2 use it.

One :class:`GaussianDiffusion` holds a beta schedule and its derived float64 tables. It does not
own the network: :meth:`GaussianDiffusion.training_losses` and
:meth:`GaussianDiffusion.p_mean_variance` take the model's *output*, so the training loop calls the
model itself (it needs to capture attention maps and run the teacher on the same inputs).

Conventions:

* ``t`` passed to this module is always an index into *this* diffusion's tables (``0 ..
  num_timesteps - 1``). For a respaced diffusion (e.g. 250 sampling steps) the network is
  conditioned on the *original* timestep ``timestep_map[t]`` (``0 .. 999``): the sampling loops do
  that translation before calling ``model_fn``, because the models and MDT's guidance schedule
  were trained on / written for the original 1000-step scale.
* With ``learn_sigma`` the model outputs ``2C`` channels: ``eps`` then ``v``; ``v`` in [-1, 1]
  interpolates the log-variance between the posterior variance (``v = -1``) and ``beta_t``
  (``v = 1``).
* Losses come back as named per-sample ``(B,)`` terms; the training loop reduces them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "linear_beta_schedule",
    "space_timesteps",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "GaussianDiffusion",
    "create_diffusion",
]

#: ``model_fn(x, t_model, **model_kwargs) -> model_output``; ``t_model`` holds original timesteps.
ModelFn = Callable[..., Tensor]


# --------------------------------------------------------------------------------------------
# Schedules and respacing
# --------------------------------------------------------------------------------------------


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear beta schedule, rescaled so any step count spans the same noise range.

    Args:
        num_timesteps: number of diffusion steps T.

    Returns:
        (T,) float64 betas from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    # The endpoints were tuned for T = 1000; scaling keeps alphas_cumprod[-1] roughly constant.
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def _parse_section_counts(section_counts: str | int | Sequence[int]) -> list[int]:
    if isinstance(section_counts, bool):
        raise TypeError("section_counts must be a string like '250' or '10,20,30', or a list of ints")
    if isinstance(section_counts, int):
        counts = [section_counts]
    elif isinstance(section_counts, str):
        parts = [p.strip() for p in section_counts.split(",")]
        try:
            counts = [int(p) for p in parts]
        except ValueError:
            raise ValueError(
                f"bad timestep respacing {section_counts!r}: use a step count ('250'), "
                "per-section counts ('10,20,30') or 'ddimN' ('ddim50')"
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts:
        raise ValueError("timestep respacing needs at least one section count")
    if any(c < 1 for c in counts):
        raise ValueError(f"every section needs at least 1 step, got counts {counts}")
    return counts


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Pick the original timesteps a respaced (shorter) diffusion keeps, following ADM.

    ``"N"`` keeps N roughly evenly spaced steps including both 0 and ``num_timesteps - 1``
    (``"250"`` of 1000 gives 0, 4, 8, ..., 995, 999 with strides of 4 or 5, the same as
    diffusers' ``timestep_spacing="linspace"``). ``"a,b,c"`` splits the
    process into equal sections (earlier sections get the remainder) and spaces ``a``, ``b``,
    ``c`` steps within each. ``"ddimN"`` uses the smallest integer stride whose
    ``range(0, T, stride)`` has exactly N steps (the DDIM paper's uniform spacing).

    Within a section of ``size`` steps, step k is ``start + round(k * (size - 1) / (count - 1))``
    with the fractional position accumulated in floating point and Python's round-half-to-even,
    exactly as ADM does, so the kept set matches ADM / DiT / MDT checkpoints' sampling.

    Args:
        num_timesteps: length T of the original process.
        section_counts: ``"250"``, ``"10,20,30"``, ``"ddim50"``, an int, or a list of ints.

    Returns:
        The set of kept original timesteps.

    Raises:
        ValueError: for malformed strings, sections with fewer than 1 step, more steps than a
            section holds, or a ``ddimN`` with no integer stride giving exactly N steps.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if isinstance(section_counts, str) and section_counts.strip().startswith("ddim"):
        spec = section_counts.strip()
        try:
            desired = int(spec[len("ddim") :])
        except ValueError:
            raise ValueError(
                f"bad DDIM respacing {spec!r}: expected 'ddimN' with an integer N, e.g. 'ddim50'"
            ) from None
        if desired < 1 or desired > num_timesteps:
            raise ValueError(f"{spec!r}: need 1 <= N <= {num_timesteps} steps")
        for stride in range(1, num_timesteps + 1):
            steps = range(0, num_timesteps, stride)
            if len(steps) == desired:
                return set(steps)
        raise ValueError(
            f"{spec!r}: no integer stride gives exactly {desired} of {num_timesteps} steps; "
            f"pick another N or use plain '{desired}' spacing"
        )

    counts = _parse_section_counts(section_counts)
    base, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)  # the first `extra` sections absorb the remainder
        if count > size:
            raise ValueError(
                f"respacing {section_counts!r}: section {i} has {size} timesteps but {count} were "
                f"requested; ask for at most {size} per section (at most {num_timesteps} in all)"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride  # accumulated like ADM, so rounding ties land identically
        start += size
    return set(kept)


# --------------------------------------------------------------------------------------------
# Pure likelihood helpers
# --------------------------------------------------------------------------------------------


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


def _check_generators(x: Tensor, generators: Sequence[torch.Generator]) -> None:
    """One generator per sample, on ``x``'s device type; else a ValueError naming the fix."""
    if len(generators) != x.shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {x.shape[0]}: pass one torch.Generator "
            "per sample (for CFG batches [cond, uncond], pass one per row, e.g. gens + gens)"
        )
    for g in generators:
        if g.device.type != x.device.type:
            raise ValueError(
                f"generator on {g.device} but samples on {x.device}: create them with "
                f"torch.Generator(device='{x.device}')"
            )


def _make_noise(x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise like ``x``; sample i drawn from ``generators[i]`` alone when given."""
    if generators is None:
        return torch.randn_like(x)
    _check_generators(x, generators)
    # Per-row draws, so a sample's trajectory never depends on which batch it was sampled in.
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generators]
    )  # (B, C, H, W)


#: Ancestral steps whose noise each image draws in one generator call in ``p_sample_loop``.
#: Part of the noise definition: another value gives other (equally valid) samples.
NOISE_BLOCK_STEPS = 25


def _make_noise_block(x: Tensor, generators: Sequence[torch.Generator], steps: int) -> Tensor:
    """Noise of the next ``steps`` ancestral steps, one ``randn((steps, C, H, W))`` per sample.

    One call per sample per block instead of per step: B * ceil(T / block) small kernels in a
    T-step loop rather than B * T. Sample i's values come from ``generators[i]`` alone.

    Returns:
        (steps, B, C, H, W): entry ``[j]`` is the noise of the block's j-th step.
    """
    _check_generators(x, generators)
    shape = (steps, *x.shape[1:])
    per_sample = [torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) for g in generators]
    return torch.stack(per_sample, dim=1)  # (steps, B, C, H, W)


# --------------------------------------------------------------------------------------------
# The diffusion process
# --------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with eps prediction and (optionally) learned-range variance.

    All tables are float64 numpy arrays of length ``num_timesteps``; they are gathered into
    tensors of the input's dtype and device on use.

    Args:
        betas: (T,) float64 noise schedule, each in (0, 1].
        learn_sigma: model outputs ``2C`` channels (eps, v) and the variance is learned
            (ADM's learned-range); otherwise ``C`` channels of eps and ADM's fixed-large variance
            (what DiT uses without learned sigma).
        timestep_map: original timestep for each index of this (possibly respaced) diffusion;
            identity when None.
    """

    def __init__(
        self,
        betas: np.ndarray,
        learn_sigma: bool = True,
        timestep_map: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.learn_sigma = learn_sigma
        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        self.timestep_map = np.asarray(timestep_map, dtype=np.int64)
        if self.timestep_map.shape != (self.num_timesteps,):
            raise ValueError(
                f"timestep_map has {self.timestep_map.size} entries for {self.num_timesteps} betas"
            )

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; reuse t = 1's value so the log (and the learned
        # interpolation that starts from it) stays finite.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.log(np.maximum(self.posterior_variance, 1e-20))
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar
        self.log_betas = np.log(betas)
        # ADM's "fixed large" variance (beta_t), with t = 0 borrowing the posterior variance of
        # t = 1 for a sensible decoder likelihood.
        if self.num_timesteps > 1:
            self.fixed_large_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        else:
            self.fixed_large_log_variance = self.log_betas.copy()

        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}

    # ---- table gathering ------------------------------------------------------------------

    def _table(self, name: str, device: torch.device) -> Tensor:
        """``getattr(self, name)`` as a tensor on ``device``, cached so sampling does no H2D copies."""
        key = (name, device)
        table = self._device_tables.get(key)
        if table is None:
            array = getattr(self, name)
            # MPS has no float64; elsewhere keep float64 until the final cast.
            if array.dtype == np.int64:
                dtype = torch.int64
            else:
                dtype = torch.float32 if device.type == "mps" else torch.float64
            table = torch.as_tensor(array, dtype=dtype).to(device)
            self._device_tables[key] = table
        return table

    def _extract(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        """Gather table ``name`` at indices ``t`` (B,), shaped (B, 1, ..., 1) in ``like``'s dtype."""
        values = self._table(name, t.device)[t].to(device=like.device, dtype=like.dtype)  # (B,)
        return values.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Original (unrespaced) timesteps for indices ``t``: what the network is conditioned on.

        Args:
            t: (B,) int64 indices into this diffusion.

        Returns:
            (B,) int64 original timesteps.
        """
        return self._table("timestep_map", t.device)[t]

    def snr(self, t: Tensor) -> Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)``.

        Args:
            t: (B,) int64 indices.

        Returns:
            (B,) float32 SNR on ``t``'s device.
        """
        abar = self._table("alphas_cumprod", t.device)[t]
        return (abar / (1.0 - abar)).float()

    def min_snr_weight(self, t: Tensor, gamma: float = 5.0) -> Tensor:
        """Min-SNR-gamma loss weights for eps prediction: ``min(SNR, gamma) / SNR`` (MDT: gamma 5).

        Down-weights the easy low-noise timesteps whose eps loss would otherwise dominate.

        Args:
            t: (B,) int64 indices.
            gamma: SNR clamp.

        Returns:
            (B,) float32 weights in (0, 1], for ``training_losses(mse_weight=...)``.
        """
        abar = self._table("alphas_cumprod", t.device)[t]
        snr = abar / (1.0 - abar)
        return (snr.clamp(max=gamma) / snr).float()

    # ---- forward process and posterior ----------------------------------------------------

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw ``x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)``.

        Args:
            x_start: (B, C, H, W) clean data x_0.
            t: (B,) int64 indices.
            noise: standard normal noise like ``x_start``; drawn when None.

        Returns:
            (B, C, H, W) noised x_t.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of ``q(x_{t-1} | x_t, x_0)``.

        Args:
            x_start: (B, C, H, W) x_0.
            x_t: (B, C, H, W) x_t.
            t: (B,) int64 indices.

        Returns:
            mean (B, C, H, W), variance (B, 1, 1, 1), log_variance (B, 1, 1, 1) (clipped at t = 0).
        """
        mean = (
            self._extract("posterior_mean_coef1", t, x_t) * x_start
            + self._extract("posterior_mean_coef2", t, x_t) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 implied by ``x_t`` and predicted noise: ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``.

        Args:
            x_t: (B, C, H, W).
            t: (B,) int64 indices.
            eps: (B, C, H, W) predicted noise.

        Returns:
            (B, C, H, W) predicted x_0.
        """
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """Noise implied by ``x_t`` and a predicted x_0 (inverse of :meth:`predict_xstart_from_eps`).

        Args:
            x_t: (B, C, H, W).
            t: (B,) int64 indices.
            pred_xstart: (B, C, H, W).

        Returns:
            (B, C, H, W) eps.
        """
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart) / self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---- reverse process ------------------------------------------------------------------

    def _split_output(self, model_output: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, v) from a model output, checking the channel count against ``learn_sigma``."""
        channels = x_t.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape != (x_t.shape[0], expected, *x_t.shape[2:]):
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not fit x_t {tuple(x_t.shape)}: with "
                f"learn_sigma={self.learn_sigma} the model must output {expected} channels; build the "
                "model and the diffusion with the same learn_sigma"
            )
        if not self.learn_sigma:
            return model_output, None
        eps, v = model_output.split(channels, dim=1)  # (B, C, H, W) each
        return eps, v

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Parameters of ``p(x_{t-1} | x_t)`` from a model output.

        Args:
            model_output: (B, 2C, H, W) ``[eps, v]`` (learn_sigma) or (B, C, H, W) eps; cast to
                ``x_t``'s dtype (so a bf16 autocast output is handled in the sampler's precision).
            x_t: (B, C, H, W) current sample.
            t: (B,) int64 indices into this diffusion (not original timesteps).
            clip_denoised: clamp the predicted x_0 to [-1, 1] (pixels; leave False for latents).

        Returns:
            dict with ``mean`` (B, C, H, W), ``variance`` and ``log_variance`` (B, C, H, W) for
            learned variance or (B, 1, 1, 1) for fixed, ``pred_xstart`` (B, C, H, W) and ``eps``
            (B, C, H, W) (the model's eps; not re-derived after clipping).
        """
        eps, v = self._split_output(model_output.to(x_t.dtype), x_t)
        if v is not None:
            # Interpolate in log space between the two variance bounds of DDPM (posterior
            # variance below, beta_t above): the model only has to predict a fraction.
            frac = (v + 1.0) / 2.0
            min_log = self._extract("posterior_log_variance_clipped", t, x_t)
            max_log = self._extract("log_betas", t, x_t)
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            log_variance = self._extract("fixed_large_log_variance", t, x_t)
        variance = torch.exp(log_variance)

        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    # ---- training -------------------------------------------------------------------------

    def training_losses(
        self,
        model_output: Tensor,
        x_start: Tensor,
        x_t: Tensor,
        t: Tensor,
        noise: Tensor,
        mse_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample diffusion loss terms (IDDPM's hybrid loss when ``learn_sigma``).

        Args:
            model_output: model(x_t, timestep_map[t]) output, (B, 2C, H, W) or (B, C, H, W).
            x_start: (B, C, H, W) clean data.
            x_t: (B, C, H, W) ``q_sample(x_start, t, noise)``.
            t: (B,) int64 indices.
            noise: (B, C, H, W) the noise used for ``x_t`` (the eps target).
            mse_weight: optional (B,) per-sample weights for the MSE term only (e.g.
                :meth:`min_snr_weight`, which MDT applies); the VB term is never weighted.

        Returns:
            dict of (B,) tensors: ``mse`` (weighted mean squared eps error), and with
            ``learn_sigma`` also ``vb`` (variational bound term in bits/dim, scaled by
            ``num_timesteps / 1000``, training only the variance); ``loss`` = sum of the terms.

        The ``num_timesteps / 1000`` factor is the one of improved DDPM / ADM's rescaled hybrid
        loss (``LossType.RESCALED_MSE``; DiT's default ``LossType.MSE`` omits it). Training uses
        the 1000-step process, where the factor is exactly 1, so the loss equals upstream DiT's and
        MDT's either way; it only matters when training losses use a respaced diffusion.
        """
        model_output = model_output.to(x_t.dtype)
        eps, v = self._split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)  # (B,)
        if mse_weight is not None:
            if mse_weight.shape != mse.shape:
                raise ValueError(
                    f"mse_weight must have shape {tuple(mse.shape)} (one weight per sample), "
                    f"got {tuple(mse_weight.shape)}"
                )
            mse = mse * mse_weight.to(mse.dtype)
        terms = {"mse": mse}
        if v is not None:
            # Stop-gradient on eps: the VB term trains only the variance, the mean is left to the
            # (much better behaved) MSE term, as in improved DDPM.
            frozen = torch.cat([eps.detach(), v], dim=1)  # (B, 2C, H, W)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t) * (self.num_timesteps / 1000.0)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _vb_terms_bpd(self, model_output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """One term of the variational bound in bits per dimension, (B,).

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t == 0: the decoder NLL
        -log p(x_0 | x_1) with the discretized Gaussian (assumes 8-bit data in [-1, 1]; upstream
        applies it unchanged to VAE latents, so we do too).
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])  # (B, C, H, W)
        log_likelihood = discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )  # (B, C, H, W)
        kl = mean_flat(kl) / math.log(2.0)  # nats -> bits per dim
        decoder_nll = -mean_flat(log_likelihood) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)  # (B,)

    # ---- sampling -------------------------------------------------------------------------

    def _full_t(self, t: int | Tensor, x: Tensor) -> Tensor:
        if isinstance(t, Tensor):
            if t.shape != (x.shape[0],):
                raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
            return t.to(device=x.device, dtype=torch.long)
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"t={t} outside this diffusion's 0..{self.num_timesteps - 1}")
        return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)

    def p_sample_step(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: int | Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        clip_denoised: bool = False,
        noise: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral step ``x_t -> x_{t-1}``.

        Args:
            model_fn: ``model_fn(x, t_model, **model_kwargs)`` with ``t_model`` the original
                timesteps; for classifier-free guidance pass the model's ``forward_with_cfg``.
            x: (B, C, H, W) x_t.
            t: index into this diffusion (int, or (B,) int64 tensor).
            model_kwargs: extra model inputs (class labels, cfg scale, ...).
            generators: one ``torch.Generator`` per sample, on ``x``'s device; the global RNG
                when None.
            clip_denoised: clamp predicted x_0 to [-1, 1].
            noise: (B, C, H, W) standard normal noise to use instead of drawing it (then
                ``generators`` is ignored); :meth:`p_sample_loop` passes per-sample blocks.

        Returns:
            dict with ``sample`` (B, C, H, W) x_{t-1} and ``pred_xstart`` (B, C, H, W).
        """
        t = self._full_t(t, x)
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x's {tuple(x.shape)}")
        model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        sample = out["mean"]
        # The last step (t == 0) returns the mean: noise there would only blur the output.
        nonzero = t != 0
        if bool(nonzero.any()):
            if noise is None:
                noise = _make_noise(x, generators)
            mask = nonzero.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
            sample = sample + mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
        noise_block: int = NOISE_BLOCK_STEPS,
    ) -> Tensor:
        """Ancestral sampling from ``x_T`` through all steps of this (respaced) diffusion.

        Classifier-free guidance is just the ``model_fn``: pass the model's
        ``forward_with_cfg`` with ``x_T = cat([z, z])`` and labels ``cat([y, null])``; then pass
        ``generators + generators`` (or separate ones for the null half) so every row has one.

        Args:
            model_fn: ``model_fn(x, t_model, **model_kwargs) -> model_output`` with ``t_model``
                (B,) original timesteps (999 first for 1000-step schedules).
            x_T: (B, C, H, W) starting noise.
            model_kwargs: extra model inputs.
            generators: one ``torch.Generator`` per sample on ``x_T``'s device; sample i's noise
                comes from ``generators[i]`` only, so results do not depend on the batch. The
                ``T - 1`` noisy steps (the last step adds none) are cut into blocks of
                ``noise_block`` steps; at the start of each block sample i draws
                ``randn((k, C, H, W), generator=generators[i])`` (k = steps left in the block)
                and step j of the block uses entry j.
            progress: show a tqdm bar.
            clip_denoised: clamp predicted x_0 to [-1, 1] at each step.
            noise_block: steps per noise draw (with ``generators``); it defines the noise
                stream, so the same value gives the same samples.

        Returns:
            (B, C, H, W) x_0 samples.
        """
        if noise_block < 1:
            raise ValueError(f"noise_block must be >= 1, got {noise_block}")
        x = x_T
        block: Tensor | None = None  # (k, B, C, H, W) noise of the current block
        for n, i in enumerate(tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="sampling")):
            step_noise = None
            if generators is not None and i > 0:  # steps T-1 .. 1 add noise: n done, i to go
                if n % noise_block == 0:
                    block = _make_noise_block(x, generators, min(noise_block, i))
                step_noise = block[n % noise_block]  # type: ignore[index]  # (B, C, H, W)
            with torch.no_grad():
                x = self.p_sample_step(model_fn, x, i, model_kwargs, generators, clip_denoised, step_noise)["sample"]
        return x

    def ddim_sample_step(
        self,
        model_fn: ModelFn,
        x: Tensor,
        t: int | Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """One DDIM step ``x_t -> x_{t-1}`` (deterministic for ``eta = 0``).

        Args:
            model_fn, x, t, model_kwargs, generators, clip_denoised: as in :meth:`p_sample_step`.
            eta: DDIM stochasticity (0 = deterministic, 1 ~ ancestral).

        Returns:
            dict with ``sample`` (B, C, H, W) and ``pred_xstart`` (B, C, H, W).
        """
        t = self._full_t(t, x)
        model_output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {}))
        out = self.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised)
        # Re-derive eps from x_0 so clipping (when on) stays consistent with the direction term.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = self._extract("alphas_cumprod", t, x)
        abar_prev = self._extract("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar)) * torch.sqrt(1.0 - abar / abar_prev)
        sample = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1.0 - abar_prev - sigma**2) * eps
        nonzero = t != 0
        if eta > 0 and bool(nonzero.any()):
            mask = nonzero.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
            sample = sample + mask * sigma * _make_noise(x, generators)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        x_T: Tensor,
        model_kwargs: dict[str, Any] | None = None,
        generators: Sequence[torch.Generator] | None = None,
        eta: float = 0.0,
        progress: bool = False,
        clip_denoised: bool = False,
    ) -> Tensor:
        """DDIM sampling through all steps of this (respaced, e.g. ``"ddim50"``) diffusion.

        Args:
            model_fn, x_T, model_kwargs, generators, progress, clip_denoised: as in
                :meth:`p_sample_loop`.
            eta: DDIM stochasticity.

        Returns:
            (B, C, H, W) x_0 samples.
        """
        x = x_T
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddim"):
            with torch.no_grad():
                out = self.ddim_sample_step(model_fn, x, i, model_kwargs, generators, eta, clip_denoised)
                x = out["sample"]
        return x


def create_diffusion(
    timestep_respacing: str | None = None, num_timesteps: int = 1000, learn_sigma: bool = True
) -> GaussianDiffusion:
    """A linear-schedule diffusion, optionally respaced to fewer steps.

    Respacing keeps steps S of the ``num_timesteps`` process and re-derives betas so the kept
    marginals are unchanged: ``beta_i = 1 - abar[S_i] / abar[S_{i-1}]`` (``1 - abar[S_0]`` first).

    Args:
        timestep_respacing: None or "" for the full process; else a :func:`space_timesteps`
            spec ("250", "ddim50", "10,20,30").
        num_timesteps: steps of the base process.
        learn_sigma: see :class:`GaussianDiffusion`.

    Returns:
        The diffusion; ``timestep_map`` holds the kept original timesteps.
    """
    betas = linear_beta_schedule(num_timesteps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = sorted(space_timesteps(num_timesteps, timestep_respacing))
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept_abar = alphas_cumprod[kept]
    new_betas = 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
    return GaussianDiffusion(new_betas, learn_sigma=learn_sigma, timestep_map=kept)
