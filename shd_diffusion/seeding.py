"""The one seed derivation: every stream of randomness is keyed by a tuple of names and numbers.

A seed is a pure function of its key (``derive_seed("shd-sample", seed, epoch, position)``), the
same on every platform, Python and torch version, so a stream never depends on the process count,
the batch it lands in or the order things were built in. That is what makes resume exact and
a 2-process run equal to a 1-process run.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import torch

__all__ = ["SEED_MASK", "derive_seed", "derive_seeds", "seeded_generator"]

SEED_MASK = (1 << 63) - 1  # seeds are non-negative int64: they fit torch.manual_seed and tensors


def derive_seed(*key: object) -> int:
    """63-bit seed of ``key`` (its parts joined by ':' and hashed with BLAKE2b-64)."""
    text = ":".join(str(p) for p in key).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & SEED_MASK


def derive_seeds(indices: Iterable[int], *key: object) -> np.ndarray:
    """``derive_seed(*key, i)`` for each index, as an (n,) int64 array."""
    return np.asarray([derive_seed(*key, int(i)) for i in indices], dtype=np.int64).reshape(-1)


def seeded_generator(*key: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derive_seed(*key)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*key))
