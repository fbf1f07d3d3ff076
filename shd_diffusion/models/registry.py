"""Named model configs: ``create_model("MDTv2-S/2")``; ``MODEL_NAMES`` feeds CLI choices.

Each family file ends with its own configs (:data:`~.dit.DIT_CONFIGS`,
:data:`~.mdt.MDTV2_CONFIGS`, the published sizes: DiT S/B/L/XL x patch 2/4/8, MDTv2 patch 2
only); this module joins them and builds models by name.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

from torch import nn

from shd_diffusion.models.dit import DIT_CONFIGS
from shd_diffusion.models.mdt import MDT_DECODE_LAYER, MDT_MASK_RATIO, MDTV2_CONFIGS

__all__ = ["MODEL_CONFIGS", "MODEL_NAMES", "MDT_DECODE_LAYER", "MDT_MASK_RATIO", "create_model", "model_family"]

MODEL_CONFIGS: dict[str, Callable[..., nn.Module]] = {**DIT_CONFIGS, **MDTV2_CONFIGS}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_CONFIGS)


def model_family(name: str) -> str:
    """``"DiT"`` or ``"MDTv2"`` for a registry name."""
    _check_name(name)
    return name.split("-", 1)[0]


def _check_name(name: str) -> None:
    """A ValueError naming the closest valid name for an unknown one."""
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
