"""diffusers' text-to-image transformers as SHD teachers and students.

Teachers are read from diffusers model folders (local, a pipeline's ``transformer/``, or the
Hugging Face cache: :mod:`.sources` resolves the source and hands the folder here). Students are
the teacher's own class with fewer blocks / heads / a smaller width, built from the teacher's
config so that everything SHD and KD compare stays the same: the token grid (SHD maps are
(N, N) over the same tokens), the latent channels (KD compares outputs) and the text-embedding
widths (both read the same precomputed prompts).

Weights are read from safetensors only: pickle ``.bin`` files are refused, since this project
never unpickles user files. SANA is refused: its self-attention is linear, there is no softmax
map to distil.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import (
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.models.modeling_utils import ModelMixin

from shd_diffusion.models.loading import WeightsError

__all__ = [
    "T2I_CLASSES",
    "UNSUPPORTED_T2I",
    "config_class_name",
    "supported_classes",
    "check_t2i_class",
    "load_t2i_folder",
    "student_config",
    "student_from_teacher",
    "uniform_block_indices",
    "copy_teacher_blocks",
    "parameter_count",
]

# Supported transformer classes by their config.json ``_class_name``.
T2I_CLASSES: dict[str, type[ModelMixin]] = {
    cls.__name__: cls
    for cls in (PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel)
}
# diffusers transformer classes refused on purpose, and why.
UNSUPPORTED_T2I = {
    "SanaTransformer2DModel": "its self-attention is linear (ReLU kernel), so it has no softmax attention map and "
    "SHD needs softmax maps",
}
# Older folders name the generic class; diffusers maps it by norm_type (model_loading_utils'
# class remapping). PixArt-alpha / PixArt-Sigma Hub repos were published that way.
_LEGACY_CLASSES = {("Transformer2DModel", "ada_norm_zero"): "DiTTransformer2DModel",
                   ("Transformer2DModel", "ada_norm_single"): "PixArtTransformer2DModel"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Why a student field must keep the teacher's value (the end of the error line).
_SAME_TOKENS = "SHD needs the same token grid (the same N x N attention maps)"
_SAME_OUTPUT = "KD needs the same latent input and output"
_SAME_TEXT = "teacher and student read the same text embeddings"
_SAME_INPUTS = "the student takes the teacher's conditioning inputs"


@dataclass(frozen=True)
class _Family:
    """How one class is shrunk into a student."""

    blocks: tuple[tuple[str, str], ...]  # (module list attribute, config field with its length)
    fixed: Mapping[str, str]  # config field -> why the student keeps the teacher's value
    width_fields: tuple[str, ...] = ()  # config fields that must equal heads x head_dim
    rope_field: str | None = None  # config field whose entries sum to attention_head_dim


_FAMILIES: dict[str, _Family] = {
    "PixArtTransformer2DModel": _Family(
        blocks=(("transformer_blocks", "num_layers"),),
        fixed={"sample_size": _SAME_TOKENS, "patch_size": _SAME_TOKENS, "in_channels": _SAME_OUTPUT,
               "out_channels": _SAME_OUTPUT, "caption_channels": _SAME_TEXT, "use_additional_conditions": _SAME_INPUTS},
        width_fields=("cross_attention_dim",),  # attn2 reads the caption projected to the width
    ),
    "SD3Transformer2DModel": _Family(
        blocks=(("transformer_blocks", "num_layers"),),
        fixed={"sample_size": _SAME_TOKENS, "patch_size": _SAME_TOKENS, "pos_embed_max_size": _SAME_TOKENS,
               "in_channels": _SAME_OUTPUT, "out_channels": _SAME_OUTPUT, "joint_attention_dim": _SAME_TEXT,
               "pooled_projection_dim": _SAME_TEXT},
        width_fields=("caption_projection_dim",),  # the text stream's width
    ),
    "FluxTransformer2DModel": _Family(
        blocks=(("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
        fixed={"patch_size": _SAME_TOKENS, "in_channels": _SAME_OUTPUT, "out_channels": _SAME_OUTPUT,
               "joint_attention_dim": _SAME_TEXT, "pooled_projection_dim": _SAME_TEXT, "guidance_embeds": _SAME_INPUTS},
        rope_field="axes_dims_rope",
    ),
    "QwenImageTransformer2DModel": _Family(
        blocks=(("transformer_blocks", "num_layers"),),
        fixed={"patch_size": _SAME_TOKENS, "in_channels": _SAME_OUTPUT, "out_channels": _SAME_OUTPUT,
               "joint_attention_dim": _SAME_TEXT, "guidance_embeds": _SAME_INPUTS,
               "use_additional_t_cond": _SAME_INPUTS},
        rope_field="axes_dims_rope",
    ),
}
_WIDTH = "width"  # a check-only override: the student's heads x head_dim


def config_class_name(config: Mapping[str, Any]) -> str:
    """A model config's ``_class_name``, with legacy ``Transformer2DModel`` mapped as diffusers does."""
    name = str(config.get("_class_name"))
    return _LEGACY_CLASSES.get((name, str(config.get("norm_type"))), name)


def supported_classes() -> str:
    """The supported class names, for error messages."""
    return ", ".join(T2I_CLASSES)


def check_t2i_class(name: str, where: Any) -> type[ModelMixin]:
    """The diffusers class for ``name``; a one-line refusal for any other (SANA: why)."""
    if name in T2I_CLASSES:
        return T2I_CLASSES[name]
    why = f": {UNSUPPORTED_T2I[name]}" if name in UNSUPPORTED_T2I else ", not a supported text-to-image transformer"
    raise WeightsError(f"{where} holds a {name}{why}; supported: {supported_classes()}")


def _check_safetensors_only(folder: Path) -> None:
    """Refuse a folder whose weights exist only as pickles (``torch.load`` can run code)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise WeightsError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which this project never unpickles: "
            "convert them to safetensors where you trust the file (from_pretrained(...).save_pretrained(out))"
        )
    raise WeightsError(f"{folder} has a config.json but no *.safetensors weights: fetch or save the folder again")


def load_t2i_folder(folder: Path, class_name: str, dtype: torch.dtype = torch.float32) -> ModelMixin:
    """A supported transformer from a local diffusers model folder, safetensors only.

    Args:
        folder: the folder with ``config.json`` and ``diffusion_pytorch_model*.safetensors``
            (Hub sources arrive as their snapshot folder in the huggingface_hub cache).
        class_name: the folder's (legacy-mapped) ``_class_name``.
        dtype: parameter dtype; loaded directly in it (a bf16 FLUX never exists in float32).

    Returns:
        The model on the CPU (its mode and gradients are the caller's to set).

    Raises:
        WeightsError: unsupported class, pickle-only weights, or weights that do not fit the config.
    """
    cls = check_t2i_class(class_name, folder)
    _check_safetensors_only(folder)
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise WeightsError(f"cannot load the {class_name} in {folder} ({first}): fetch or save it again") from None


# ----------------------------------------------------------------------------------------- students


def _init_defaults(cls: type[ModelMixin]) -> dict[str, Any]:
    """The constructor's config fields and defaults (a legacy config may carry other fields, dropped;
    a config.json written by an older diffusers may lack newer ones, which take these defaults)."""
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


def uniform_block_indices(teacher_blocks: int, student_blocks: int) -> list[int]:
    """Evenly spaced teacher blocks for a shallower student: first and last always kept.

    ``(28, 12) -> [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]``; one student block takes the
    teacher's last (SD3's last block is structurally different: ``context_pre_only``).
    """
    if not 1 <= student_blocks <= teacher_blocks:
        raise WeightsError(f"cannot pick {student_blocks} of the teacher's {teacher_blocks} blocks: use 1 to {teacher_blocks}")
    if student_blocks == 1:
        return [teacher_blocks - 1]
    span = teacher_blocks - 1
    # round(j * span / (student_blocks - 1)), halves rounded up, in integers
    return [(2 * j * span + student_blocks - 1) // (2 * (student_blocks - 1)) for j in range(student_blocks)]


def _check_fixed(family: _Family, teacher: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """Refuse a change to a field SHD or KD needs equal (``teacher``: the full constructor config)."""
    for field, why in family.fixed.items():
        if field in overrides and overrides[field] != teacher.get(field):
            raise WeightsError(f"student {field} {overrides[field]} != teacher {field} {teacher.get(field)}: {why}")


def _apply_width(family: _Family, config: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """heads x head_dim is the width: set the width fields in ``config`` to it (a given one must
    agree) and check that the RoPE axes split head_dim."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    width = heads * head_dim
    for field in (_WIDTH, *family.width_fields):
        if field in overrides and overrides[field] != width:
            raise WeightsError(f"student {field} {overrides[field]} != num_attention_heads {heads} x attention_head_dim "
                               f"{head_dim} = {width}: the width is heads x head_dim")
        if field != _WIDTH:
            config[field] = width
    rope = family.rope_field
    if rope and sum(config[rope]) != head_dim:
        scaled = [a * head_dim // sum(config[rope]) for a in config[rope]]
        hint = f" (e.g. {scaled})" if sum(scaled) == head_dim and all(a % 2 == 0 for a in scaled) else ""
        raise WeightsError(f"student {rope} {list(config[rope])} sums to {sum(config[rope])}, not attention_head_dim "
                           f"{head_dim}: give {rope} summing to {head_dim}{hint}")


def _sd3_dual_layers(teacher: Mapping[str, Any], num_layers: int) -> list[int]:
    """SD3.5's dual-attention blocks, subsampled with the blocks (student j is dual iff its
    uniformly picked teacher block is), so :func:`copy_teacher_blocks` finds matching shapes."""
    dual, depth = set(teacher["dual_attention_layers"] or ()), int(teacher["num_layers"])
    picks = uniform_block_indices(depth, num_layers) if num_layers <= depth else list(range(num_layers))
    return [j for j, i in enumerate(picks) if i in dual]


def student_config(teacher_config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The student's constructor config: the teacher's, changed by ``overrides``, validated.

    Args:
        teacher_config: the teacher's config.json (or ``model.config``).
        **overrides: config fields to change (``num_layers``, ``num_single_layers`` for FLUX,
            ``num_attention_heads``, ``attention_head_dim``, ...), and optionally ``width``
            (checked against heads x head_dim, not stored). The width fields (PixArt
            ``cross_attention_dim``, SD3 ``caption_projection_dim``) follow heads x head_dim; SD3's
            ``dual_attention_layers`` follow the uniform block subsampling unless given.

    Returns:
        Keywords for the teacher's class (``_class_name`` not included).

    Raises:
        WeightsError: unsupported class, unknown field, a field that must stay the teacher's
            (token grid, latent channels, text widths) or an inconsistent width; one line naming it.
    """
    if "_class_name" not in teacher_config:
        raise WeightsError("the teacher config has no _class_name: pass its config.json or the teacher model")
    name = config_class_name(teacher_config)
    cls, family = check_t2i_class(name, "the teacher config"), _FAMILIES[name]
    defaults = _init_defaults(cls)
    unknown = sorted(k for k in overrides if k not in defaults and k != _WIDTH)
    if unknown:
        raise WeightsError(f"unknown {name} student field(s) {', '.join(unknown)}: known fields are {', '.join(defaults)}")
    teacher = {k: teacher_config.get(k, default) for k, default in defaults.items()}
    _check_fixed(family, teacher, overrides)
    config = {**teacher, **{k: v for k, v in overrides.items() if k != _WIDTH}}
    for _, depth_field in family.blocks:
        if int(config[depth_field]) < 1:
            raise WeightsError(f"student {depth_field} {config[depth_field]} must be at least 1")
    _apply_width(family, config, overrides)
    if name == "SD3Transformer2DModel":
        _set_sd3_dual_layers(teacher, config, overrides)
    return config


def _set_sd3_dual_layers(teacher: Mapping[str, Any], config: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Derive SD3.5's ``dual_attention_layers`` unless given; given ones must name student blocks."""
    depth, given = int(config["num_layers"]), "dual_attention_layers" in overrides
    if not given:
        config["dual_attention_layers"] = _sd3_dual_layers(teacher, depth)
    elif any(not 0 <= int(i) < depth for i in config["dual_attention_layers"]):
        raise WeightsError(f"student dual_attention_layers {list(config['dual_attention_layers'])} must be block "
                           f"indices below num_layers {depth}")


def student_from_teacher(
    teacher: Mapping[str, Any] | ModelMixin,
    init_from_teacher: str | None = None,
    seed: int | None = None,
    **overrides: Any,
) -> ModelMixin:
    """A student of the teacher's class with the shape of :func:`student_config`.

    Args:
        teacher: the teacher's config dict, or the teacher model (needed for ``init_from_teacher``).
        init_from_teacher: None (diffusers' random init) or ``"uniform"``: copy evenly spaced
            teacher blocks and all embedders / final layers (needs the teacher's width and QK-norm shapes).
        seed: seeds the random init without touching the global RNG (None: the global RNG).
        **overrides: student config fields (see :func:`student_config`).

    Returns:
        The student, on the current default device (``with torch.device("meta")`` counts
        parameters without memory).
    """
    is_model = isinstance(teacher, ModelMixin)
    teacher_config = {"_class_name": type(teacher).__name__, **teacher.config} if is_model else dict(teacher)
    config = student_config(teacher_config, **overrides)
    if init_from_teacher not in (None, "uniform"):
        raise WeightsError(f"init_from_teacher {init_from_teacher!r} is not known: use None or 'uniform'")
    if init_from_teacher and not is_model:
        raise WeightsError("init_from_teacher='uniform' copies weights: pass the teacher model, not its config")
    cls = T2I_CLASSES[config_class_name(teacher_config)]
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        student = cls(**config)
    if init_from_teacher:
        copy_teacher_blocks(student, teacher)  # type: ignore[arg-type]
    return student


def _width(config: Mapping[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def copy_teacher_blocks(student: ModelMixin, teacher: ModelMixin) -> dict[str, list[int]]:
    """Initialise ``student`` from ``teacher``: evenly spaced blocks, every other weight as is.

    Args:
        student: a shallower model of the teacher's class and width.
        teacher: the teacher.

    Returns:
        For each block list (``transformer_blocks``, FLUX's ``single_transformer_blocks``), the
        teacher block each student block was copied from (:func:`uniform_block_indices`).

    Raises:
        WeightsError: another class, another width, or tensors whose shapes differ (named).
    """
    name = type(teacher).__name__
    if type(student) is not type(teacher):
        raise WeightsError(f"cannot initialise a {type(student).__name__} from a {type(teacher).__name__}")
    if _width(student.config) != _width(teacher.config):
        raise WeightsError(f"init_from_teacher needs the teacher's width: student {_width(student.config)} vs teacher "
                           f"{_width(teacher.config)} (num_attention_heads x attention_head_dim)")
    picks = {attr: uniform_block_indices(len(getattr(teacher, attr)), len(getattr(student, attr)))
             for attr, _ in _FAMILIES[name].blocks}
    source = teacher.state_dict()
    state, bad = {}, []
    for key, value in student.state_dict().items():
        attr, _, rest = key.partition(".")
        src = key
        if attr in picks:
            index, _, tail = rest.partition(".")
            src = f"{attr}.{picks[attr][int(index)]}.{tail}"
        if src not in source or source[src].shape != value.shape:
            bad.append(f"{key} <- {src} ({tuple(source[src].shape) if src in source else 'missing'} vs {tuple(value.shape)})")
        else:
            state[key] = source[src]
    if bad:
        raise WeightsError(f"init_from_teacher: {len(bad)} student tensor(s) have no teacher tensor of their shape, "
                           f"e.g. {bad[0]}: keep the teacher's head_dim (QK-norm) and block types")
    student.load_state_dict(state, strict=True)
    return picks


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())

