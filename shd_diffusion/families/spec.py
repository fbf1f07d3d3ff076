"""What the package needs to know about one model family, in one frozen object.

A :class:`FamilySpec` answers, for the models of one family, every question the trainer, the
objective, the sampler and the export used to answer with ``isinstance`` / class-name checks: how
the model is conditioned, which attention modules are distilled, how many tokens it sees, which
extra training passes and loss weighting it trains with, its default guidance schedule and how it
is exported. :func:`shd_diffusion.families.family_of` is the one place that maps a model to its
spec. The defaults describe a class-conditional, image-only, Gaussian-diffusion family with no
extra pass (DiT); a family sets only what differs.

Text-to-image families (:mod:`.text`: PixArt, SD3, FLUX.1, Qwen-Image) set ``conditioning="text"``:
the batch's conditioning is a dict of text-encoder outputs, CFG dropout swaps in the empty prompt,
and ``forward`` maps latents to the model's input layout and its output back; flow-matching
families set ``objective="flow"`` and their :class:`~shd_diffusion.diffusion.flow.FlowConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import torch
from torch import nn

from ..attention import AttentionStore
from ..attention import attention_layers as _attention_layers
from ..diffusion import GaussianDiffusion
from ..diffusion.flow import FlowConfig
from ..objective import DiffusionBatch

__all__ = ["DiffusionBatch", "ExtraPass", "ExportSpec", "FamilySpec", "Footprint", "TextExportSpec", "TransformerEntry"]

# trained (TrainedModules, maybe DDP-wrapped), diffusion, batch -> {term name: (B,) per-sample loss}
ExtraPass = Callable[[nn.Module, GaussianDiffusion, DiffusionBatch], dict[str, torch.Tensor]]
# (y: labels (B,) or a conditioning dict of (B, ...), drop: (B,) 0/1 long, empty-prompt dict or None)
#   -> what ``forward`` takes as the conditioning of the batch (after CFG dropout)
Condition = Callable[[Any, torch.Tensor, Mapping[str, torch.Tensor] | None], Any]
# (model, x_t (B, C, H, W), the model's timestep (B,), conditioning) -> output (B, C_out, H, W)
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]
# (teacher store, teacher entry, student store, student entry, keys) -> keyword inputs of shd.shd_term
ShdInputs = Callable[[AttentionStore, int, AttentionStore, int, str], dict[str, Any]]


@dataclass(frozen=True)
class Footprint:
    """What the batch-memory lower bound needs of a model besides its token count
    (:attr:`FamilySpec.num_tokens`; :mod:`shd_diffusion.training.memory`)."""

    width: int  # residual width D
    blocks: int  # transformer blocks (each keeps >= 8 N D values for its backward)
    image_values: int  # values of one input sample (C H W; 0 where it follows the data)


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


@dataclass(frozen=True)
class TextExportSpec:
    """How :mod:`shd_diffusion.t2i_export` writes a text-to-image student: a diffusers model folder
    that drops into the teacher's own pipeline (``Pipeline.from_pretrained(teacher, transformer=...)``)."""

    write_model: Callable[[nn.Module, Path], None]  # the student's diffusers model folder, written into exactly this folder
    card_note: str = ""  # a family-specific sentence for the card's "Load" section


def save_pretrained_model(model: nn.Module, folder: Path) -> None:
    """A diffusers ``ModelMixin``'s own ``save_pretrained`` (config.json + safetensors weights)."""
    model.save_pretrained(folder, safe_serialization=True)


def own_null_class(model: nn.Module) -> int:
    """The model's null (unconditional) class id: the class count, as in both upstreams."""
    return int(model.null_class)


def own_label_dropout(model: nn.Module) -> float:
    """The model's training label-dropout probability (for CFG)."""
    return float(model.config.class_dropout_prob)


def patch_tokens(model: nn.Module) -> int:
    """N for a patch-embedded image model: its patch count."""
    return int(model.x_embedder.num_patches)


def class_condition(y: torch.Tensor, drop: torch.Tensor, empty: Mapping[str, torch.Tensor] | None) -> Any:
    """Class-conditional models drop labels themselves (``force_drop_ids``): pass both on."""
    return y, drop


def class_forward(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """``model(x_t, t, y, force_drop_ids=drop)``: the DiT / MDTv2 call."""
    y, drop = cond
    return model(x_t, t, y, force_drop_ids=drop)


def own_footprint(model: nn.Module) -> Footprint:
    """This package's DiT / MDTv2: hidden size, depth and input size from the config."""
    cfg = model.config
    return Footprint(int(cfg.hidden_size), int(cfg.depth), int(cfg.in_channels) * int(cfg.input_size) ** 2)


def whole_sequence_shd_inputs(teacher: AttentionStore, ti: int, student: AttentionStore, si: int,
                              keys: str = "all") -> dict[str, Any]:
    """Image-only models: every query row and key of the captured entries goes into ``shd_term``."""
    return dict(student_q=student.queries[si], student_k=student.keys[si], teacher_q=teacher.queries[ti],
                teacher_k=teacher.keys[ti], teacher_v=teacher.values[ti], out_weight=teacher.out_weights[ti],
                student_bias=student.biases[si], teacher_bias=teacher.biases[ti], teacher_out=teacher.outputs[ti])


def class_data_problems(model: nn.Module, dataset: Any, channels: int, side: int) -> list[str]:
    """What a class-labelled dataset gives a model that it cannot take: ``channels`` and grid ``side``
    (after any VAE), classes."""
    sc, problems = model.config, []
    if channels != sc.in_channels:
        problems.append(f"{channels} channels but student.in_channels={sc.in_channels}")
    if side != sc.input_size:
        problems.append(f"a {side} x {side} grid but student.input_size={sc.input_size}")
    if int(getattr(dataset, "num_classes", 0)) > sc.num_classes:
        problems.append(f"{dataset.num_classes} classes but student.num_classes={sc.num_classes}")
    return problems


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its classes and the family-specific parts of training, sampling and export.

    Every field but ``name`` and ``model_classes`` has the default of a plain class-conditional
    DiT-like family.
    """

    name: str  # family name, e.g. "DiT" (errors, model card title)
    model_classes: tuple[type, ...]  # classes family_of matches with isinstance (subclasses included)
    # How the model is called. "class": forward(x_t, t, y, force_drop_ids=...), a null class for CFG;
    # "text": a conditioning dict per batch, the dataset's empty prompt for CFG.
    conditioning: Literal["class", "text"] = "class"
    null_class: Callable[[nn.Module], int] = own_null_class  # label of the unconditional CFG half
    label_dropout: Callable[[nn.Module], float] = own_label_dropout  # training CFG-dropout probability
    condition: Condition = class_condition  # labels / conditioning after this batch's CFG dropout
    forward: Forward = class_forward  # one model call on latents (B, C, H, W), output in the same layout
    cond_keys: tuple[str, ...] = ()  # conditioning-dict keys the model needs (text families)
    data_problems: Callable[[nn.Module, Any, int, int], list[str]] = class_data_problems  # dataset vs model mismatches
    footprint: Callable[[nn.Module], Footprint] = own_footprint  # for the batch-memory lower bound
    # What is distilled. Must list the modules, in the order, that attention.attention_layers gives
    # (the q/k captures use that); the default defers to the model's own attention_layers().
    attention_layers: Callable[[nn.Module], list[nn.Module]] = _attention_layers
    token_segments: tuple[str, ...] = ("image",)  # the token sequence's parts, in order (text families: image, text)
    num_tokens: Callable[[nn.Module], int] = patch_tokens  # N per image (0: follows the data's size)
    shd_inputs: ShdInputs = whole_sequence_shd_inputs  # which rows / keys of a captured entry SHD distils
    # distill.cross_attention applies: the blocks have cross-attention maps (image queries over caption keys)
    # that capture_qk(..., cross_attention=True) numbers and records (PixArt's attn2)
    cross_attention: bool = False
    feature_distillation: bool = True  # kd_feat / kd_selfcorr apply (they hook the package's own blocks)
    # Training objective: family-specific parts.
    objective: Literal["diffusion", "flow"] = "diffusion"  # Gaussian eps diffusion, or rectified flow
    flow: Callable[[tuple[int, ...]], FlowConfig] | None = None  # flow families: latent (C, H, W) -> FlowConfig
    learn_sigma: Callable[[nn.Module], bool] | None = None  # DDPM output carries the variance; None: student.learn_sigma
    default_loss_weighting: Literal["uniform", "min_snr5"] = "uniform"  # what train.loss_weighting=auto means
    extra_pass: ExtraPass | None = None  # more student passes per micro-batch (MDTv2: the masked pass)
    extra_terms: tuple[str, ...] = ()  # the names extra_pass returns; weighted 1, like "diffusion"
    # Sampling and export.
    guidance_schedule: Literal["constant", "power-cosine"] = "constant"  # what --guidance-schedule auto means
    export: ExportSpec | TextExportSpec | None = None  # None: shd_diffusion.export refuses the family

    def __post_init__(self) -> None:
        if not self.model_classes:
            raise ValueError(f"family {self.name!r} lists no model classes")
        if bool(self.extra_pass) != bool(self.extra_terms):
            raise ValueError(f"family {self.name!r}: extra_pass and extra_terms go together (the terms it returns)")
        if (self.objective == "flow") != (self.flow is not None):
            raise ValueError(f"family {self.name!r}: objective 'flow' and a flow config go together")
        if self.objective == "flow" and self.extra_pass is not None:
            raise ValueError(f"family {self.name!r}: extra passes are Gaussian-diffusion passes; a flow family has none")
