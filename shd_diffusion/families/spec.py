"""What the package needs to know about one model family, in one frozen object.

A :class:`FamilySpec` answers, for the models of one family, every question the trainer, the
objective, the sampler and the export used to answer with ``isinstance`` / class-name checks: how
the model is conditioned, which attention modules are distilled, how many tokens it sees, which
extra training passes and loss weighting it trains with, its default guidance schedule and how it
is exported. :func:`shd_diffusion.families.family_of` is the one place that maps a model to its
spec. The defaults describe a class-conditional, image-only, Gaussian-diffusion family with no
extra pass (DiT); a family sets only what differs.

Text-to-image families (flow matching, conditioning dicts, image + text token segments) are not
built yet; ``objective``, ``conditioning`` and ``token_segments`` are where they will say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

from ..attention import attention_layers as _attention_layers
from ..diffusion import GaussianDiffusion
from ..objective import DiffusionBatch

__all__ = ["DiffusionBatch", "ExtraPass", "ExportSpec", "FamilySpec", "TransformerEntry"]

# trained (TrainedModules, maybe DDP-wrapped), diffusion, batch -> {term name: (B,) per-sample loss}
ExtraPass = Callable[[nn.Module, GaussianDiffusion, DiffusionBatch], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class TransformerEntry:
    """What a family's export writer wrote to ``transformer/``."""

    component: list[str]  # model_index.json entry: [library or module, class name]
    custom_code: bool  # the class ships its own source file (loads with trust_remote_code=True)


@dataclass(frozen=True)
class ExportSpec:
    """How :mod:`shd_diffusion.export` writes a family: the transformer folder and the card's notes."""

    write_transformer: Callable[[nn.Module, Path], TransformerEntry]  # writes folder/"transformer"
    scheduler_variance: str  # variance_type of the exported DDPMScheduler
    diffusers_pipeline: str | None = None  # diffusers pipeline a latent export is written for (else ClassConditionalPipeline)
    parity_note: str = ""  # appended to "these are the images of sampling.sample" on the card


def own_null_class(model: nn.Module) -> int:
    """The model's null (unconditional) class id: the class count, as in both upstreams."""
    return int(model.null_class)


def own_label_dropout(model: nn.Module) -> float:
    """The model's training label-dropout probability (for CFG)."""
    return float(model.config.class_dropout_prob)


def patch_tokens(model: nn.Module) -> int:
    """N for a patch-embedded image model: its patch count."""
    return int(model.x_embedder.num_patches)


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its classes and the family-specific parts of training, sampling and export.

    Every field but ``name`` and ``model_classes`` has the default of a plain class-conditional
    DiT-like family.
    """

    name: str  # family name, e.g. "DiT" (errors, model card title)
    model_classes: tuple[type, ...]  # classes family_of matches with isinstance (subclasses included)
    # How the model is called. "class": forward(x_t, t, y, force_drop_ids=...), a null class for CFG.
    conditioning: Literal["class"] = "class"  # text families: conditioning dicts (not built yet)
    null_class: Callable[[nn.Module], int] = own_null_class  # label of the unconditional CFG half
    label_dropout: Callable[[nn.Module], float] = own_label_dropout  # training label-dropout probability
    # What is distilled. Must list the modules, in the order, that attention.attention_layers gives
    # (the q/k captures use that); the default defers to the model's own attention_layers().
    attention_layers: Callable[[nn.Module], list[nn.Module]] = _attention_layers
    token_segments: tuple[str, ...] = ("image",)  # the token sequence's parts, in order (text families: image, text)
    num_tokens: Callable[[nn.Module], int] = patch_tokens  # N per image
    # Training objective: family-specific parts.
    objective: Literal["diffusion"] = "diffusion"  # Gaussian eps diffusion (flow matching: not built yet)
    default_loss_weighting: Literal["uniform", "min_snr5"] = "uniform"  # what train.loss_weighting=auto means
    extra_pass: ExtraPass | None = None  # more student passes per micro-batch (MDTv2: the masked pass)
    extra_terms: tuple[str, ...] = ()  # the names extra_pass returns; weighted 1, like "diffusion"
    # Sampling and export.
    guidance_schedule: Literal["constant", "power-cosine"] = "constant"  # what --guidance-schedule auto means
    export: ExportSpec | None = None  # None: shd_diffusion.export refuses the family

    def __post_init__(self) -> None:
        if not self.model_classes:
            raise ValueError(f"family {self.name!r} lists no model classes")
        if bool(self.extra_pass) != bool(self.extra_terms):
            raise ValueError(f"family {self.name!r}: extra_pass and extra_terms go together (the terms it returns)")
