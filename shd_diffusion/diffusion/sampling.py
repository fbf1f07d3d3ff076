"""Reverse-process samplers: ancestral DDPM and DDIM, with per-sample noise streams.

:class:`SamplerMixin` is mixed into :class:`~shd_diffusion.diffusion.GaussianDiffusion`; it uses
that class's tables and ``p_mean_variance``. Both samplers end a step with the same tail,
:func:`add_step_noise`: noise on every row except those at ``t == 0``.

Sample i's noise comes from ``generators[i]`` alone, so a sample never depends on its batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["ModelFn", "NOISE_BLOCK_STEPS", "add_step_noise", "SamplerMixin"]

#: ``model_fn(x, t_model, **model_kwargs) -> model_output``; ``t_model`` holds original timesteps.
ModelFn = Callable[..., Tensor]


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


def add_step_noise(
    sample: Tensor,
    t: Tensor,
    std: Tensor,
    generators: Sequence[torch.Generator] | None,
    noise: Tensor | None = None,
) -> Tensor:
    """``sample + std * noise`` on the rows with ``t != 0``; the last step (t == 0) adds none.

    Args:
        sample: (B, C, H, W) the step's noiseless update.
        t: (B,) int64 indices.
        std: noise scale, broadcastable to ``sample`` ((B, 1, 1, 1) or (B, C, H, W)).
        generators: per-sample generators for the draw (the global RNG when None).
        noise: (B, C, H, W) noise to use instead of drawing it.

    Returns:
        (B, C, H, W) noised sample (``sample`` itself when every row is at t == 0, no draw made).
    """
    nonzero = t != 0
    if not bool(nonzero.any()):
        return sample
    if noise is None:
        noise = _make_noise(sample, generators)
    mask = nonzero.to(sample.dtype).view(-1, *([1] * (sample.ndim - 1)))  # (B, 1, 1, 1)
    return sample + mask * std * noise


class SamplerMixin:
    """DDPM / DDIM steps and loops over all steps of a (respaced) diffusion."""

    # Provided by GaussianDiffusion: num_timesteps, model_timesteps, p_mean_variance,
    # predict_eps_from_xstart, _extract.
    num_timesteps: int

    def _full_t(self, t: int | Tensor, x: Tensor) -> Tensor:
        """A step index as a (B,) int64 tensor on ``x``'s device, range-checked."""
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
        # The last step (t == 0) returns the mean: noise there would only blur the output.
        std = torch.exp(0.5 * out["log_variance"])  # (B, 1, 1, 1) fixed or (B, C, H, W) learned
        sample = add_step_noise(out["mean"], t, std, generators, noise)
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
        if eta > 0:
            sample = add_step_noise(sample, t, sigma, generators)
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

