"""Model families: one :class:`FamilySpec` per family and the registry that maps a model to it.

``family_of(model)`` is the one place that decides which family a model belongs to; the trainer,
the objective, the sampler and the export ask its spec instead of checking classes. Built in:
:data:`~.dit.DIT` (this package's DiT, and diffusers' DiT), :data:`~.mdt.MDT` (MDTv2) and the
text-to-image families of diffusers (:mod:`.text`): :data:`~.pixart.PIXART`, :data:`~.sd3.SD3`,
:data:`~.flux.FLUX` (FLUX.1) and :data:`~.qwen_image.QWEN_IMAGE`.

Adding a family: write its model (``attention_layers()``, ``forward(x, t, y, force_drop_ids=...)``,
``null_class``), add its named configs to :data:`shd_diffusion.models.MODEL_CONFIGS`, and
``register(FamilySpec(name=..., model_classes=(MyModel,), ...))`` with the fields that differ from
the defaults (tests/test_families.py does all of it from a test file). Arrows: ``families`` sits
above ``models`` (it imports them; no model module imports it) and below the application.
"""

from __future__ import annotations

from torch import nn

from .spec import DiffusionBatch, ExportSpec, FamilySpec, TextExportSpec, TransformerEntry

__all__ = ["DiffusionBatch", "ExportSpec", "FamilySpec", "TextExportSpec", "TransformerEntry",
           "family_of", "register", "registered", "unregister"]

_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    """Add a family (its name must be new); returns it, so a module can write ``X = register(...)``."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a model family named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a registered family (tests that register toy families clean up with this)."""
    _REGISTRY.pop(name)


def registered() -> list[FamilySpec]:
    """The registered families, in registration order."""
    return list(_REGISTRY.values())


def family_of(model: nn.Module) -> FamilySpec:
    """The family whose ``model_classes`` ``model`` is an instance of.

    Raises:
        ValueError: no registered family covers the model's class (the message lists them).
    """
    for spec in _REGISTRY.values():
        if isinstance(model, spec.model_classes):
            return spec
    names = ", ".join(_REGISTRY) or "none"
    raise ValueError(
        f"no model family covers {type(model).__name__} (registered families: {names}): register a "
        "FamilySpec for it with shd_diffusion.families.register"
    )


from .dit import DIT  # noqa: E402  (the built-in families register after the registry exists)
from .flux import FLUX  # noqa: E402
from .mdt import MDT  # noqa: E402
from .pixart import PIXART  # noqa: E402
from .qwen_image import QWEN_IMAGE  # noqa: E402
from .sd3 import SD3  # noqa: E402

register(DIT)
register(MDT)
register(PIXART)
register(SD3)
register(FLUX)
register(QWEN_IMAGE)
