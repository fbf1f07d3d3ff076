"""The diffusion process: schedules, the Gaussian q/p math and losses, and the samplers.

``create_diffusion("250")`` builds a (respaced) :class:`GaussianDiffusion`; its
``p_sample_loop`` (ancestral) and ``ddim_sample_loop`` methods sample with per-sample generators.

- :mod:`.schedules`: linear betas, ADM respacing (``space_timesteps``, ``respaced_betas``);
- :mod:`.likelihood`: KL and discretized-Gaussian likelihood of the variational bound;
- :mod:`.gaussian`: :class:`GaussianDiffusion` (tables, q, p, hybrid loss), ``create_diffusion``;
- :mod:`.sampling`: the DDPM / DDIM steps and loops and their noise streams;
- :mod:`.flow`: rectified flow (SD3 / FLUX): path, t sampling and shift, velocity losses, Euler
  sampler, all pure functions (:class:`FlowConfig` holds the choices).
"""

from shd_diffusion.diffusion.flow import FlowConfig
from shd_diffusion.diffusion.gaussian import GaussianDiffusion, create_diffusion
from shd_diffusion.diffusion.likelihood import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from shd_diffusion.diffusion.sampling import NOISE_BLOCK_STEPS, ModelFn
from shd_diffusion.diffusion.schedules import linear_beta_schedule, respaced_betas, space_timesteps

__all__ = [
    "linear_beta_schedule",
    "space_timesteps",
    "respaced_betas",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "GaussianDiffusion",
    "create_diffusion",
    "NOISE_BLOCK_STEPS",
    "ModelFn",
    "FlowConfig",
]
