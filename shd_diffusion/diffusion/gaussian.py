"""Gaussian diffusion with learned variance (improved DDPM / ADM), as DiT and MDTv2 use it.

One :class:`GaussianDiffusion` holds a beta schedule and its derived float64 tables: the forward
process ``q``, the model's reverse step ``p`` and the per-sample training terms (the hybrid MSE +
VB loss). It does not own the network: :meth:`GaussianDiffusion.training_losses` and
:meth:`GaussianDiffusion.p_mean_variance` take the model's *output*, so the training loop calls
the model itself (it captures attention and runs the teacher on the same inputs). The sampling
loops come from :class:`~shd_diffusion.diffusion.sampling.SamplerMixin`.

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
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from shd_diffusion.diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from shd_diffusion.diffusion.sampling import SamplerMixin
from shd_diffusion.diffusion.schedules import linear_beta_schedule, respaced_betas, space_timesteps

__all__ = ["GaussianDiffusion", "create_diffusion"]


class GaussianDiffusion(SamplerMixin):
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



def create_diffusion(
    timestep_respacing: str | None = None, num_timesteps: int = 1000, learn_sigma: bool = True
) -> GaussianDiffusion:
    """A linear-schedule diffusion, optionally respaced to fewer steps (:func:`respaced_betas`).

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
    return GaussianDiffusion(respaced_betas(betas, kept), learn_sigma=learn_sigma, timestep_map=kept)
