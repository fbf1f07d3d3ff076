"""DiT and MDTv2 with official parameter names, a registry of named configs, checkpoint loading.

``create_model("MDTv2-S/2")`` builds a model; ``load_official_state_dict(model, ckpt)`` loads
upstream weights strictly; ``load_model(source)`` / ``load_weights(model, source)`` take any file,
folder or Hub id (:mod:`.sources`); ``from_diffusers`` / ``to_diffusers`` convert DiT exactly.
diffusers' text-to-image transformers (``T2I_CLASSES``) load as they are, and
``student_from_teacher`` builds a smaller one of the same class (:mod:`.diffusers_t2i`).
Every model exposes ``attention_layers()`` (execution order of the
unmasked forward) for :func:`shd_diffusion.attention.capture_attention`, ``null_class`` for CFG,
and diffusers' ``save_pretrained`` / ``from_pretrained``.
"""

from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see below)

from shd_diffusion.models.diffusers_dit import from_diffusers_model, to_diffusers
from shd_diffusion.models.diffusers_t2i import T2I_CLASSES, student_config, student_from_teacher
from shd_diffusion.models.dit import DiT
from shd_diffusion.models.loading import (
    WeightsError,
    describe_architecture,
    extract_state_dict,
    infer_architecture,
    load_checkpoint_file,
    load_official_state_dict,
    matching_model_names,
)
from shd_diffusion.models.mdt import MDTv2, RelPosAttention, RelativePositionBias, power_cosine_cfg_scale
from shd_diffusion.models.registry import MODEL_CONFIGS, MODEL_NAMES, create_model, model_family
from shd_diffusion.models.sources import from_diffusers, load_model, load_weights, parse_hub_id, resolve_source

__all__ = [
    "DiT",
    "MDTv2",
    "RelPosAttention",
    "RelativePositionBias",
    "power_cosine_cfg_scale",
    "MODEL_CONFIGS",
    "MODEL_NAMES",
    "create_model",
    "model_family",
    "load_checkpoint_file",
    "extract_state_dict",
    "infer_architecture",
    "matching_model_names",
    "describe_architecture",
    "load_official_state_dict",
    "WeightsError",
    "from_diffusers",
    "from_diffusers_model",
    "to_diffusers",
    "T2I_CLASSES",
    "student_config",
    "student_from_teacher",
    "load_model",
    "load_weights",
    "parse_hub_id",
    "resolve_source",
]

# diffusers' pipeline loader finds a component's load method by looking up ``ModelMixin`` in the
# component's library module: with it here, a model_index.json entry ["shd_diffusion.models",
# "MDTv2"] loads with DiffusionPipeline.from_pretrained (see shd_diffusion.export).
