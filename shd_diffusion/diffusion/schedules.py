"""Beta schedules and ADM respacing: which timesteps a shorter sampling process keeps.

Everything here is float64 numpy on the host: the tables are built once per diffusion.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["linear_beta_schedule", "space_timesteps", "respaced_betas"]


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



def respaced_betas(betas: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of the process that visits only the ``kept`` steps, with the same marginals there.

    ``beta_i = 1 - abar[S_i] / abar[S_{i-1}]`` (``1 - abar[S_0]`` first), so
    ``q(x_{S_i} | x_0)`` is the original process's.

    Args:
        betas: (T,) float64 betas of the original process.
        kept: sorted original timesteps S (from :func:`space_timesteps`).

    Returns:
        (len(S),) float64 betas.
    """
    alphas_cumprod = np.cumprod(1.0 - betas)
    kept_abar = alphas_cumprod[list(kept)]  # (len(S),)
    return 1.0 - kept_abar / np.append(1.0, kept_abar[:-1])
