"""The DiT family: this package's :class:`~shd_diffusion.models.DiT` and diffusers' DiT.

A diffusers ``DiTTransformer2DModel`` source is converted to :class:`DiT` when it is loaded
(:mod:`shd_diffusion.models.sources`); the class is listed here too because an exported
``ClassConditionalPipeline`` samples the diffusers transformer unconverted. Everything else is
the :class:`~.spec.FamilySpec` default: class-conditional, one plain diffusion pass, uniform
eps-MSE weights, constant guidance scale (upstream DiT).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusers import DiTTransformer2DModel
from torch import nn

from ..models import DiT, to_diffusers
from ..models import dit_transformer_freq_shift as freq_shift_module
from .spec import ExportSpec, FamilySpec, TransformerEntry

__all__ = ["DIT"]

DIFFUSERS_CLASS = "DiTTransformer2DModel"


def write_transformer(model: nn.Module, folder: Path) -> TransformerEntry:
    """``folder/transformer`` as a diffusers DiT folder with the same function as ``model``.

    A student with the original DiT timestep features is stored as the freq-shift subclass, whose
    self-contained source file travels with the weights (custom code).
    """
    transformer = to_diffusers(model)
    transformer.save_pretrained(folder / "transformer")
    cls = type(transformer).__name__
    if cls == DIFFUSERS_CLASS:
        return TransformerEntry(["diffusers", cls], custom_code=False)
    module = Path(freq_shift_module.__file__)
    shutil.copy(module, folder / "transformer" / module.name)
    return TransformerEntry([module.stem, cls], custom_code=True)


DIT = FamilySpec(
    name="DiT",
    model_classes=(DiT, DiTTransformer2DModel),
    export=ExportSpec(
        write_transformer=write_transformer,
        scheduler_variance="fixed_large",  # DiTPipeline drops the variance channels; DiT's own non-learned choice
        diffusers_pipeline="DiTPipeline",
        parity_note=" (up to float rounding: diffusers' DiT kernels)",
    ),
)
