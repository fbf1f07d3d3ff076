"""Squeezing-Heads Distillation: squeeze teacher heads into student heads, map layers, the loss.

Where alpha is computed: :mod:`.alpha` (:func:`~.alpha.mode_alphas`, every squeeze mode, for
both paths below); the per-group solve and its derivation are in :mod:`.solve`. By role:

- :mod:`.groups` -- which teacher heads feed each student head (default / explicit / hard /
  progressive / head matching) and which teacher layer feeds each student layer;
- :mod:`.alpha` -- the alpha engine: a layer's groups gathered, the normal equations of paper
  eq. (6) accumulated over blocks of query rows, one solve per group size;
- :mod:`.solve` -- the math of one group's alpha in head-dim space: the quadratic, the closed
  form, the simplex rule;
- :mod:`.chunked` -- what training runs: :func:`shd_term`, one layer pair's alpha and loss from
  q, k, v over blocks of query rows, memory linear in N (and :func:`head_similarity_qk`);
- :mod:`.reference` -- the whole-map reference on (B, H, N, M) maps (figures, analysis, tests):
  :func:`squeeze_heads`, :func:`apply_alphas`, :func:`squeeze_objective`, :class:`HeadSqueezer`
  (also the per-pair squeeze settings the trainer keeps), :func:`squeeze_layers` and the loss of
  paper eq. 11, :func:`shd_loss`.

Imports run one way: :mod:`.groups` and :mod:`.solve` import no SHD module, :mod:`.alpha` uses
both, :mod:`.chunked` uses :mod:`.alpha`, :mod:`.reference` uses them all (the loss settings
``LossKind``/``LossReduction`` come from :mod:`.chunked`); no module uses another's private names.
"""

from .chunked import DEFAULT_BLOCK_BYTES, LossKind, LossReduction, auto_chunk_size, head_similarity_qk, shd_term
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
from .reference import HeadSqueezer, apply_alphas, shd_loss, squeeze_heads, squeeze_layers, squeeze_objective
from .solve import project_simplex

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
