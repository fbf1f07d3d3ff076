"""Squeezing-Heads Distillation (SHD) for diffusion transformers.

Modules, one responsibility each:
  attention  -- attention processors (fast SDPA path, map capture) and ``capture_attention``
  shd        -- head squeezing (alpha = argmin of paper eq. 6), layer mapping, the SHD loss
  models     -- DiT and MDTv2, a registry of named configs, official checkpoint loading
  families   -- one spec per model family (what training, sampling and export do differently); family_of
  diffusion  -- Gaussian diffusion (learned variance, hybrid loss, respacing, sampling)
  config     -- typed dataclass configs from YAML + dotted overrides
"""

__version__ = "0.1.0"
