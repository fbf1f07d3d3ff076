"""Rectified flow (flow matching on straight paths), as SD3, FLUX and Qwen-Image train it.

The path between clean data ``x0`` and Gaussian noise is the straight line
``x_t = (1 - t) x0 + t * noise`` with ``t`` in [0, 1] (``t = 1`` is pure noise), and the network
predicts its constant velocity ``v = d x_t / dt = noise - x0``. Everything here is a pure function
of tensors (EDM ``loss.py`` style): the losses return per-sample ``(B,)`` terms and the training
loop weights and reduces them; the network is called by the caller (training) or through a
callable the caller gives (sampling).

Randomness is drawn per sample, one ``torch.Generator`` per sample as
:func:`shd_diffusion.objective.noised` does, so sample ``i``'s timestep and noise do not depend on
the batch it lands in.

Conventions:

* ``t`` here is always the continuous time in [0, 1]. What the network is conditioned on is
  :func:`model_timestep`: ``t * 1000`` for diffusers' SD3 transformer, ``t`` itself for FLUX
  (whose transformer scales by 1000 internally and takes the distilled guidance separately).
* The shift ``t' = s t / (1 + (s - 1) t)`` moves time towards noise for ``s > 1``; FLUX's
  resolution-dependent shift is the same map with ``s = exp(mu)`` (:func:`flux_mu`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from shd_diffusion.diffusion.likelihood import mean_flat

__all__ = [
    "TIMESTEP_SAMPLINGS",
    "FlowConfig",
    "VelocityFn",
    "interpolate",
    "velocity_target",
    "shift_timesteps",
    "flux_mu",
    "sample_timesteps",
    "noised",
    "training_losses",
    "velocity_kd",
    "model_timestep",
    "sampling_timesteps",
    "guided_velocity",
    "euler_sample",
]

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")  # the training-time distributions of t

# The network as the sampler sees it: (x_t (B, ...), t (B,) in [0, 1]) -> velocity (B, ...).
VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FlowConfig:
    """How training draws ``t`` and how the network is told ``t`` (validated on construction)."""

    sampling: str = "logit_normal"  # one of TIMESTEP_SAMPLINGS; SD3 trains with logit_normal
    logit_mean: float = 0.0  # mean of logit(t) for logit_normal (SD3 default 0)
    logit_std: float = 1.0  # std of logit(t) for logit_normal (SD3 default 1), > 0
    shift: float = 1.0  # s of t' = s t / (1 + (s - 1) t); 1 = no shift, SD3 uses 3.0
    mu: float | None = None  # FLUX's resolution shift: s = exp(mu) (see flux_mu); excludes shift
    timestep_scale: float = 1000.0  # model timestep = t * scale: SD3 1000, FLUX 1

    def __post_init__(self) -> None:
        if self.sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(
                f"flow sampling {self.sampling!r} is unknown: set sampling to one of {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        if not (math.isfinite(self.logit_mean) and math.isfinite(self.logit_std) and self.logit_std > 0):
            raise ValueError(
                f"flow logit_mean {self.logit_mean} / logit_std {self.logit_std}: both must be finite and "
                "logit_std > 0 (SD3: 0 / 1)"
            )
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"flow shift {self.shift} must be finite and > 0 (1 = no shift, SD3: 3.0)")
        if self.mu is not None and self.shift != 1.0:
            raise ValueError(
                f"flow shift {self.shift} and mu {self.mu} both set: give shift (SD3) or mu (FLUX, shift = exp(mu)), "
                "not both"
            )
        if self.mu is not None and not math.isfinite(self.mu):
            raise ValueError(f"flow mu {self.mu} must be finite (FLUX: flux_mu(image_seq_len))")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0):
            raise ValueError(f"flow timestep_scale {self.timestep_scale} must be > 0 (SD3: 1000, FLUX: 1)")

    @property
    def effective_shift(self) -> float:
        """The shift ``s`` actually applied: ``exp(mu)`` when ``mu`` is set, else ``shift``."""
        return math.exp(self.mu) if self.mu is not None else self.shift


def _per_sample_view(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (B,) as (B, 1, ..., 1) in ``like``'s dtype and device, to broadcast over a sample."""
    if t.shape != like.shape[:1]:
        raise ValueError(f"t has shape {tuple(t.shape)}; expected ({like.shape[0]},): one time per sample")
    return t.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The point at time ``t`` on the straight path: ``x_t = (1 - t) x0 + t * noise``.

    Args:
        x0: (B, ...) clean data.
        noise: (B, ...) standard normal noise, like ``x0``.
        t: (B,) times in [0, 1].

    Returns:
        (B, ...) x_t in ``x0``'s dtype; exactly ``x0`` at t = 0 and ``noise`` at t = 1.
    """
    tb = _per_sample_view(t, x0)
    return (1 - tb) * x0 + tb * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The regression target, the path's constant velocity ``d x_t / dt = noise - x0``, (B, ...)."""
    return noise - x0


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Shift times towards noise: ``t' = s t / (1 + (s - 1) t)``.

    A monotone map of [0, 1] onto itself that fixes 0 and 1 (0.5 goes to s / (1 + s)); s > 1
    spends more time at high noise, which large images need (SD3 uses s = 3). FLUX's
    ``exp(mu) / (exp(mu) + 1/t - 1)`` is the same map with ``s = exp(mu)``.

    Args:
        t: times in [0, 1], any shape.
        shift: s > 0.

    Returns:
        Shifted times, same shape and dtype.
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent ``mu``: linear in the image token count, ``shift = exp(mu)``.

    The defaults are FLUX.1's: mu = 0.5 at 256 tokens (256 px), 1.15 at 4096 tokens (1024 px).

    Args:
        image_seq_len: image tokens, (H / 16) * (W / 16) for FLUX's 8x VAE and 2x2 patches.
        base_seq_len, max_seq_len: the two token counts the line goes through.
        base_shift, max_shift: mu at those two counts.

    Returns:
        mu (extrapolated linearly outside the two counts).
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def sample_timesteps(cfg: FlowConfig, gens: Sequence[torch.Generator], device: torch.device | str = "cpu") -> Tensor:
    """One training time per sample, each the next draw of its own generator, shifted.

    logit_normal: ``t = sigmoid(mean + std * z)``, z ~ N(0, 1); uniform: t ~ U[0, 1).

    Args:
        cfg: the flow configuration.
        gens: one generator per sample (on ``device``).
        device: where to draw.

    Returns:
        (B,) float64 times in [0, 1].
    """
    if cfg.sampling == "logit_normal":
        z = torch.stack([torch.randn((), generator=g, device=device, dtype=torch.float64) for g in gens])  # (B,)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)
    else:
        t = torch.stack([torch.rand((), generator=g, device=device, dtype=torch.float64) for g in gens])  # (B,)
    return shift_timesteps(t, cfg.effective_shift)


def noised(cfg: FlowConfig, x0: Tensor, gens: Sequence[torch.Generator]) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's time and noise (its generator's first draws, in that order) and ``x_t``.

    Args:
        cfg: the flow configuration.
        x0: (B, ...) clean data.
        gens: one generator per sample, on ``x0``'s device.

    Returns:
        t (B,) float64, noise (B, ...) and x_t (B, ...) in ``x0``'s dtype.
    """
    if len(gens) != x0.shape[0]:
        raise ValueError(f"{len(gens)} generators for a batch of {x0.shape[0]}: give one generator per sample")
    t = sample_timesteps(cfg, gens, x0.device)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=x0.device) for g in gens]).to(x0.dtype)
    return t, noise, interpolate(x0, noise, t)


def _check_same_shape(a: Tensor, b: Tensor, what: str, fix: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: {tuple(a.shape)} != {tuple(b.shape)}; {fix}")


def training_losses(
    v_pred: Tensor, x0: Tensor, noise: Tensor, weight: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-sample flow-matching loss: mean over non-batch dims of ``(v_pred - (noise - x0))^2``.

    Args:
        v_pred: (B, ...) the network's velocity at ``interpolate(x0, noise, t)``.
        x0: (B, ...) clean data.
        noise: (B, ...) the noise used for x_t.
        weight: optional (B,) per-sample weights (a function of t the caller picks, e.g. SD3's
            cosmap); None weighs every sample 1.

    Returns:
        dict of (B,) float32-or-wider tensors: ``mse`` (weighted) and ``loss`` (= ``mse``, the term
        the loop reduces; named like :meth:`GaussianDiffusion.training_losses`).
    """
    _check_same_shape(v_pred, x0, "velocity prediction vs x0", "the model must output one velocity per latent channel")
    err = v_pred.float() - velocity_target(x0, noise).float()
    mse = mean_flat(err**2)  # (B,)
    if weight is not None:
        if weight.shape != mse.shape:
            raise ValueError(f"weight must have shape {tuple(mse.shape)} (one per sample), got {tuple(weight.shape)}")
        mse = mse * weight.to(mse.dtype)
    return {"mse": mse, "loss": mse}


def velocity_kd(student_v: Tensor, teacher_v: Tensor) -> Tensor:
    """Output KD on the velocity: per-sample mean squared student - teacher difference.

    The teacher is detached (it is frozen; no gradient may reach it).

    Args:
        student_v: (B, ...) student velocity (with graph).
        teacher_v: (B, ...) teacher velocity at the same x_t and t.

    Returns:
        (B,) float32-or-wider.
    """
    _check_same_shape(student_v, teacher_v, "student velocity vs teacher velocity",
                      "KD needs the same latent channels and size")
    return mean_flat((student_v.float() - teacher_v.detach().float()) ** 2)


def model_timestep(t: Tensor, scale: float) -> Tensor:
    """The network's timestep input for times ``t``: ``t * scale``.

    diffusers' SD3 transformer takes ``scale = 1000``; FLUX's takes ``t`` itself (``scale = 1``)
    and multiplies by 1000 inside.

    Args:
        t: (B,) times in [0, 1].
        scale: the model family's factor (``FlowConfig.timestep_scale``).

    Returns:
        (B,) in ``t``'s dtype.
    """
    return t * scale


def sampling_timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """The Euler sampler's time grid: ``num_steps + 1`` uniform points from 1 to 0, shifted.

    Args:
        num_steps: Euler steps, >= 1.
        shift: s > 0 (see :func:`shift_timesteps`); the endpoints stay 1 and 0.

    Returns:
        (num_steps + 1,) float64, strictly decreasing, first 1, last 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps {num_steps} must be >= 1")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift {shift} must be finite and > 0 (1 = no shift)")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on velocities: ``v_uncond + scale * (v_cond - v_uncond)``.

    A helper for the caller's :data:`VelocityFn` (scale 1 gives ``v_cond``).
    """
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: Tensor, num_steps: int, shift: float = 1.0) -> Tensor:
    """Deterministic Euler integration of ``dx/dt = v(x, t)`` from t = 1 (noise) to t = 0.

    ``x <- x + (t_next - t) v(x, t)`` over :func:`sampling_timesteps`. Guidance, conditioning and
    the model's timestep convention live in ``velocity`` (see :func:`guided_velocity`,
    :func:`model_timestep`), so this stays a pure function of its inputs.

    Args:
        velocity: (x (B, ...), t (B,)) -> (B, ...) velocity; t is float64 when ``noise`` is
            float64, else float32.
        noise: (B, ...) the starting point at t = 1 (per-sample noise drawn by the caller).
        num_steps: Euler steps (network calls).
        shift: time shift of the grid (SD3: 3.0; FLUX: exp(flux_mu(...))).

    Returns:
        (B, ...) the sample at t = 0, in ``noise``'s dtype.
    """
    grid = sampling_timesteps(num_steps, shift).tolist()
    t_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    x = noise
    for t_now, t_next in zip(grid[:-1], grid[1:]):
        t = torch.full((x.shape[0],), t_now, dtype=t_dtype, device=x.device)  # (B,)
        v = velocity(x, t)
        _check_same_shape(v, x, "velocity vs x", "the velocity callable must return one value per element of x")
        x = x + (t_next - t_now) * v.to(x.dtype)
    return x
