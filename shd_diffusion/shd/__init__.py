"""Squeezing-Heads Distillation: squeeze teacher heads into student heads, map layers, the loss.

Where alpha is computed: :mod:`.solve` (the derivation and the simplex rule). The package:

- :mod:`.groups` -- which teacher heads feed each student head (default / explicit / hard /
  progressive / head matching) and which teacher layer feeds each student layer;
- :mod:`.solve` -- alpha, the exact minimiser of paper eq. (6) in head-dim space;
- :mod:`.squeeze` -- squeezing whole (B, H, N, M) maps with alpha, per mode;
- :mod:`.loss` -- the loss on whole maps (paper eq. 11);
- :mod:`.chunked` -- :func:`shd_term`: alpha and the loss of one layer pair from q, k, v, over
  blocks of query rows, with memory linear in N (what training uses).
"""

from .chunked import DEFAULT_BLOCK_BYTES, auto_chunk_size, head_similarity_qk, shd_term
from .groups import (
    SqueezeMode,
    cluster_heads,
    default_groups,
    hard_selection,
    head_similarity,
    layer_mapping,
    progressive_groups,
    resolve_groups,
    validate_groups,
    validate_pair,
)
from .loss import LossKind, LossReduction, shd_loss
from .solve import project_simplex
from .squeeze import HeadSqueezer, apply_alphas, squeeze_heads, squeeze_layers, squeeze_objective

__all__ = [
    "SqueezeMode",
    "LossKind",
    "LossReduction",
    "default_groups",
    "validate_groups",
    "hard_selection",
    "progressive_groups",
    "resolve_groups",
    "head_similarity",
    "cluster_heads",
    "squeeze_heads",
    "apply_alphas",
    "project_simplex",
    "squeeze_objective",
    "HeadSqueezer",
    "squeeze_layers",
    "layer_mapping",
    "validate_pair",
    "shd_loss",
    "shd_term",
    "head_similarity_qk",
    "auto_chunk_size",
    "DEFAULT_BLOCK_BYTES",
]
