"""The training stream's randomness, keyed by stream position and step (never by rank or batch).

Step ``s`` consumes stream positions ``[s G, (s + 1) G)`` (G = global batch). Every draw of a
sample (timestep, noise, label drop, MDT keep set, VAE posterior noise) comes from a generator
keyed by ``(seed, position)``, and MDT's per-step mask ratio from one keyed by ``(seed, s)``, so
a run depends on neither the process count nor the micro-batch split.
"""

from __future__ import annotations

import torch

from ..seeding import seeded_generator

__all__ = ["sample_generators", "step_mask_ratio_draw"]


def sample_generators(seed: int, positions: list[int], device: torch.device) -> list[torch.Generator]:
    """One generator per sample, keyed by the sample's position in the global data stream.

    A 2-process run then sees exactly the samples and noise of the 1-process run with the same
    global batch. Negative positions (head-matching calibration, figure panels) lie outside it.
    """
    return [seeded_generator("train-sample", seed, p, device=device) for p in positions]


def step_mask_ratio_draw(seed: int, step: int) -> float:
    """U(0, 1) draw of step ``step``'s extra MDT mask ratio, shared by every rank and micro-batch.

    Upstream draws one ratio per GPU batch; keying it to the step gives the whole global batch
    one ratio, so the masked pass does not depend on the process count or accumulation. Drawn on
    the CPU (no device sync).
    """
    return float(torch.rand((), generator=seeded_generator("train-mask-ratio", seed, step)))
