"""Named model configs: ``create_model("MDTv2-S/2")``; ``MODEL_NAMES`` feeds CLI choices.

Sizes are the published ones (DiT: S/B/L/XL x patch 2/4/8; MDTv2: patch 2 only).

MDTv2 ``decode_layer`` is configuration, not a constant: it sets the encoder/decoder split, so it
is part of a checkpoint's architecture. Override it with ``create_model(name, decode_layer=k)`` to
match the checkpoint or recipe at hand. The defaults here are only starting points:
  - S/2 and B/2: 6, the value in upstream's S/2 training script (``run.sh``: ``--decode_layer 6``).
    The maintainers have said the MDT paper's values (not the README's) are the right ones for
    the small models, so check the paper / checkpoint for the run you reproduce;
  - L/2 and XL/2: 4, the value the released MDTv2-XL/2 checkpoint is sampled with
    (``run_sample.sh``; also the upstream constructor default). No L/2 recipe is published.
MDTv2 entries also set ``mask_ratio=0.3`` (upstream training), so the masked pass is available.
"""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any, Callable

from torch import nn

from shd_diffusion.models.dit import DiT
from shd_diffusion.models.mdt import MDTv2

__all__ = ["MODEL_CONFIGS", "MODEL_NAMES", "MDT_DECODE_LAYER", "MDT_MASK_RATIO", "create_model", "model_family"]

# (depth, hidden_size, num_heads) per published size.
_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

MDT_DECODE_LAYER: dict[str, int] = {"S": 6, "B": 6, "L": 4, "XL": 4}  # see the module docstring
MDT_MASK_RATIO = 0.3  # upstream training: --mask_ratio 0.30


def _build_configs() -> dict[str, Callable[..., nn.Module]]:
    configs: dict[str, Callable[..., nn.Module]] = {}
    for size, (depth, hidden, heads) in _SIZES.items():
        for patch in (2, 4, 8):
            configs[f"DiT-{size}/{patch}"] = partial(
                DiT, depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads
            )
    for size, (depth, hidden, heads) in _SIZES.items():
        configs[f"MDTv2-{size}/2"] = partial(
            MDTv2,
            depth=depth,
            hidden_size=hidden,
            patch_size=2,
            num_heads=heads,
            decode_layer=MDT_DECODE_LAYER[size],
            mask_ratio=MDT_MASK_RATIO,
        )
    return configs


MODEL_CONFIGS: dict[str, Callable[..., nn.Module]] = _build_configs()
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_CONFIGS)


def model_family(name: str) -> str:
    """``"DiT"`` or ``"MDTv2"`` for a registry name."""
    _check_name(name)
    return name.split("-", 1)[0]


def _check_name(name: str) -> None:
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid names: {', '.join(MODEL_NAMES)}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registry model.

    Args:
        name: a key of :data:`MODEL_CONFIGS`, e.g. ``"DiT-XL/2"`` or ``"MDTv2-S/2"``.
        **overrides: constructor keywords that replace the config's or the class defaults
            (``input_size``, ``num_classes``, ``decode_layer``, ...).

    Returns:
        The freshly initialised model (build it under ``torch.device("meta")`` to skip memory).
    """
    _check_name(name)
    return MODEL_CONFIGS[name](**overrides)
