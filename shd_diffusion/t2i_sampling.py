"""Text-to-image sampling: prompts through the teacher's diffusers pipeline with the student inside.

The library behind ``python -m sampling.sample --pipeline TEACHER --checkpoint STUDENT --prompts
FILE`` (the flags are wired in ``sampling/``). The teacher's pipeline is loaded with the student as
its transformer (``Pipeline.from_pretrained(teacher, transformer=student)``: the teacher's own
transformer weights are never read), so the pipeline's own text encoders, scheduler, guidance and
VAE turn prompts into images exactly as they would for the teacher.

Reproducibility follows :mod:`shd_diffusion.sampler`:

* Image ``i`` renders prompt ``i % P`` (P prompts; N = P gives one image per prompt, N = k P gives
  k per prompt) with *all* of its noise from its own CPU ``torch.Generator`` seeded with
  :func:`shd_diffusion.sampler.image_seeds` (``derive_seed(NOISE_KEY, seed, i)``). A batch passes
  the pipeline one generator per image (every supported pipeline draws its latents, and any
  scheduler noise, per generator), so an image does not depend on which process or batch it
  lands in. As with the class-conditional sampler, the batch size can still move the last float
  bits (matrix kernels block by rows; measured here on CPU: 3.6e-7, PixArt, batch 1 vs 2), so it is
  recorded in the manifest and a resume with another one is refused. CPU generators keep the noise
  the same on every device.
* The run folder is :mod:`shd_diffusion.shards`' (atomic shards, a manifest, resume with any
  process count). Its manifest records what defines the pixels: the teacher id, the pipeline and
  scheduler class and config, the student's weights by content (``weights_sha256``) and path,
  steps, guidance, size, extra pipeline arguments, dtype, seed and the prompts by content
  (``prompts_sha256``); a rerun that differs in any of them is refused, naming the field.
* Pixels: the pipeline's ``output_type="np"`` images (floats in [0, 1]) rounded as diffusers' own
  PIL conversion does (``round(255 x)``), so every image equals ``pipe(...).images[j]`` as a PIL image.

Output: ``DIR/samples_{N}xHxWx3.npz`` in ADM's layout (``arr_0`` uint8 NHWC, ``arr_1`` the prompt
index of each image) plus a member ``prompts``: (N,) fixed-width unicode, the prompt of each
image. The prompts live *inside* the sample file, not in a side file, so the image-text pairs
that CLIP score reads cannot be separated or paired with the wrong list; it is a plain
(non-pickled) array that ADM's evaluator and :mod:`shd_diffusion.evaluation` ignore when they
read ``arr_0``. The prompt list itself is kept in ``DIR/shards/prompts.json`` for assembly.

Students load from (:func:`load_student`): a diffusers transformer folder or Hub id (a
``save_pretrained`` folder, an export), or this package's training checkpoint of a text-to-image
student (``checkpoints/step_*.pt`` or its run folder: the newest checkpoint), whose
``config.student.teacher_overrides`` reshape the pipeline's transformer config, EMA weights by
default.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin

from .checkpoint import CHECKPOINT_DIR, latest_checkpoint
from .cli import BadInput
from .fileio import atomic_write_text
from .models.diffusers_t2i import T2I_CLASSES, check_t2i_class, config_class_name, student_config, student_from_teacher
from .models.loading import WeightsError, check_finite_weights, extract_state_dict, load_checkpoint_file, weights_sha256
from .models.sources import load_model_with_info, parse_hub_id
from .sampler import SEED_SCHEME, image_seeds
from .shards import ShardError, assemble, check_manifest, read_manifest, run_shards, shard_manifest
from .train_config import FROM_TEACHER

__all__ = [
    "PROMPTS_FILE",
    "PROMPT_RULE",
    "T2ISampleError",
    "read_prompts",
    "prompts_sha256",
    "prompt_indices",
    "teacher_transformer_config",
    "check_student_fits",
    "load_student",
    "load_pipeline",
    "to_uint8",
    "PromptSampler",
    "sample_prompts",
    "assemble_prompts",
]

PROMPTS_FILE = "prompts.json"  # DIR/shards/prompts.json: the prompt list, for assembly
PROMPT_RULE = "i % num_prompts"  # which prompt image i renders (recorded in the manifest)
_GENERATOR = "cpu, one per image"  # where the per-image generators live (recorded in the manifest)
# Pipeline arguments this module sets itself; pipeline_kwargs may not carry them.
_RESERVED = ("prompt", "generator", "num_inference_steps", "guidance_scale", "height", "width", "output_type",
             "return_dict", "latents", "num_images_per_prompt", "prompt_embeds", "pooled_prompt_embeds")
_PROMPT_KEYS = ("text", "prompt", "caption")  # accepted fields of a .jsonl line (diffusers' metadata.jsonl: text)


class T2ISampleError(BadInput, ValueError):
    """Bad input to text-to-image sampling; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def _prompt_of(line: str, where: str) -> str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise T2ISampleError(f"{where} is not JSON ({err.msg}): write one JSON object per line") from None
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in _PROMPT_KEYS:
            if isinstance(item.get(key), str):
                return item[key]
    raise T2ISampleError(f"{where} has no string field {', '.join(_PROMPT_KEYS)}: give each line a \"text\" field")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of a file, in order.

    Args:
        path: ``.txt`` (one prompt per line, blank lines skipped), ``.jsonl`` (one object per line
            with a ``text``, ``prompt`` or ``caption`` field, or a JSON string; diffusers'
            ``metadata.jsonl`` works as is) or ``.json`` (a list of strings).

    Returns:
        The prompts (at least one).

    Raises:
        T2ISampleError: missing, unreadable or empty file, or a malformed line (named).
    """
    path = Path(path)
    if not path.is_file():
        raise T2ISampleError(f"--prompts {path} not found: give a .txt (one prompt per line), .jsonl or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise T2ISampleError(f"--prompts {path} cannot be read as UTF-8 text ({err}): save it as UTF-8") from None
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as err:
            raise T2ISampleError(f"--prompts {path} is not JSON ({err.msg}): give a list of strings") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise T2ISampleError(f"--prompts {path} must hold a JSON list of strings")
    elif path.suffix == ".jsonl":
        prompts = [_prompt_of(line, f"--prompts {path} line {n}")
                   for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise T2ISampleError(f"--prompts {path} holds no prompts: write one prompt per line")
    return prompts


def prompts_sha256(prompts: Sequence[str]) -> str:
    """Hex sha256 of the prompt list (order and exact text), for the manifest."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def prompt_indices(indices: Sequence[int] | np.ndarray, num_prompts: int) -> np.ndarray:
    """Prompt index of each image index: ``i % num_prompts`` (:data:`PROMPT_RULE`).

    Returns:
        (n,) int64.
    """
    if num_prompts <= 0:
        raise ValueError(f"num_prompts must be > 0, got {num_prompts}")
    return np.asarray(indices, dtype=np.int64).reshape(-1) % num_prompts


# --------------------------------------------------------------------------------------------
# Teacher pipeline and student
# --------------------------------------------------------------------------------------------


def _pipeline_location(teacher: str | os.PathLike) -> tuple[str, str | None]:
    """(local folder or Hub repo id, revision) of a teacher pipeline source."""
    if Path(teacher).is_dir():
        return str(teacher), None
    ref = parse_hub_id(teacher)
    if ref is None or ref.path:
        raise T2ISampleError(f"--pipeline {teacher} is neither a pipeline folder nor a Hub id org/repo[@revision] "
                             "(e.g. PixArt-alpha/PixArt-Sigma-XL-2-512-MS)")
    return ref.repo_id, ref.revision


def teacher_transformer_config(teacher: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a pipeline's ``transformer/`` (no weights are read).

    Args:
        teacher: a pipeline folder or Hub id ``org/repo[@revision]`` (through the Hugging Face
            cache, so ``HF_HUB_OFFLINE=1`` works for a cached repo).

    Returns:
        The config dict, ``_class_name`` included (a supported text-to-image class).

    Raises:
        T2ISampleError / WeightsError: no transformer config, or an unsupported class (named).
    """
    where, revision = _pipeline_location(teacher)
    if Path(where).is_dir():
        path = Path(where) / "transformer" / "config.json"
    else:
        import huggingface_hub
        from huggingface_hub import errors

        try:
            path = Path(huggingface_hub.hf_hub_download(where, "transformer/config.json", revision=revision))
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.EntryNotFoundError, OSError) as err:
            raise T2ISampleError(f"--pipeline {teacher}: cannot read transformer/config.json "
                                 f"({str(err).splitlines()[0][:200]}): download the pipeline once with network "
                                 f"access (hf download {where}) or pass a local pipeline folder") from None
    if not path.is_file():
        raise T2ISampleError(f"--pipeline {teacher} has no transformer/config.json: pass a diffusers pipeline folder "
                             "of a transformer model (PixArt, SD3, FLUX.1, Qwen-Image)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise T2ISampleError(f"{path} is not valid JSON ({err}): fetch the pipeline again") from None
    check_t2i_class(config_class_name(config), f"--pipeline {teacher}")
    return {**config, "_class_name": config_class_name(config)}


def _plain(value: Any) -> Any:
    """A config value as strict JSON holds it (tuples as lists, inf / nan as strings), for comparisons
    and the manifest (DPM-Solver's ``lambda_min_clipped`` is -inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


def check_student_fits(student: ModelMixin, teacher_config: Mapping[str, Any]) -> None:
    """Refuse a student that cannot stand in for the pipeline's transformer.

    It must be the teacher's class, and every config field where it differs must be one
    :func:`~shd_diffusion.models.diffusers_t2i.student_config` lets a student change (blocks,
    heads, width), never the token grid, latent channels or text widths the pipeline feeds it.

    Raises:
        WeightsError: one line naming the class or the field.
    """
    name = config_class_name(teacher_config)
    if type(student).__name__ != name:
        raise WeightsError(f"the student is a {type(student).__name__} but the pipeline's transformer is a {name}: "
                           "sample a student distilled from this pipeline's teacher")
    known = inspect.signature(type(student).__init__).parameters
    theirs = {k: v for k, v in dict(student.config).items() if k in known and k != "self"}
    changed = {k: v for k, v in theirs.items() if _plain(v) != _plain(teacher_config.get(k, known[k].default))}
    try:
        student_config(teacher_config, **changed)
    except WeightsError as err:
        raise WeightsError(f"the student does not fit the pipeline: {err}") from None


def _student_from_training_checkpoint(path: Path, teacher_config: Mapping[str, Any], use_ema: bool,
                                      dtype: torch.dtype) -> tuple[ModelMixin, dict[str, Any]]:
    """A text-to-image student from this package's training checkpoint (see :func:`load_student`)."""
    from accelerate import init_empty_weights

    raw = load_checkpoint_file(path)  # weights-only: no code runs
    config = raw.get("config") if isinstance(raw.get("config"), Mapping) else {}
    student_cfg = config.get("student") if isinstance(config.get("student"), Mapping) else {}
    if student_cfg.get("name") != FROM_TEACHER:
        what = f"a {student_cfg['name']} student" if student_cfg.get("name") else "no text-to-image student"
        raise WeightsError(f"{path} holds {what}, not a text-to-image student (student.name: {FROM_TEACHER}): "
                           "give a text-to-image training checkpoint, or sample class-conditional models without --pipeline")
    key = "ema" if use_ema and isinstance(raw.get("ema"), Mapping) else "model"
    if not isinstance(raw.get(key), Mapping):
        raise WeightsError(f"{path} has no '{key}' weights: give a checkpoint written by the trainer")
    state = extract_state_dict({key: raw[key]})  # DDP / compile prefixes removed
    # Parameters on meta, buffers real (PixArt's positional table is a non-persistent buffer).
    with init_empty_weights(include_buffers=False):
        model = student_from_teacher(teacher_config, **(student_cfg.get("teacher_overrides") or {}))
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:300]
        raise WeightsError(f"{path}: its weights do not fit the student that its teacher_overrides make from this "
                           f"pipeline's transformer ({first}): sample with the pipeline it was distilled from") from None
    model = model.to(dtype).eval().requires_grad_(False)
    check_finite_weights(model.state_dict(), path)
    teacher_cfg = config.get("teacher") if isinstance(config.get("teacher"), Mapping) else {}
    identity = raw.get("identity") if isinstance(raw.get("identity"), Mapping) else {}
    return model, {
        "source": str(path), "step": raw.get("step"),
        "weights": "its 'ema' weights" if key == "ema" else "its 'model' (raw training) weights",
        "trained_with_teacher": teacher_cfg.get("checkpoint"), "teacher_sha256": identity.get("teacher_sha256"),
    }


def load_student(
    source: str | os.PathLike,
    teacher_config: Mapping[str, Any],
    use_ema: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[ModelMixin, dict[str, Any]]:
    """The student transformer a source holds, checked against the pipeline's transformer config.

    Args:
        source: a training checkpoint ``step_*.pt`` of a text-to-image student, or its run folder
            (newest checkpoint); or a diffusers transformer folder / pipeline folder / Hub id
            (:func:`shd_diffusion.models.sources.load_model`).
        teacher_config: the pipeline's transformer config (:func:`teacher_transformer_config`); a
            training checkpoint's ``teacher_overrides`` reshape it into the student.
        use_ema: a training checkpoint's EMA weights (else its raw ``model`` weights).
        dtype: parameter dtype (the pipeline's).

    Returns:
        (the student in eval mode, without gradients, on the CPU; info with ``source``,
        ``weights``, ``step`` and, for training checkpoints, ``trained_with_teacher``).

    Raises:
        WeightsError: unreadable source, a class-conditional checkpoint, or a student that does
            not fit the pipeline (:func:`check_student_fits`); one line naming the fix.
    """
    path = Path(source)
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():  # a training run folder
        newest = latest_checkpoint(path)
        if newest is None:
            raise WeightsError(f"{path} is a run folder without a complete checkpoint: train longer or pass a checkpoint")
        path = newest
    if path.is_file() and path.suffix in (".pt", ".pth"):
        model, info = _student_from_training_checkpoint(path, teacher_config, use_ema, dtype)
    else:
        model, info = load_model_with_info(source, use_ema=use_ema, dtype=dtype)
        if type(model).__name__ not in T2I_CLASSES:
            raise WeightsError(f"{source} holds a {type(model).__name__}, not a text-to-image transformer: give a "
                               "text-to-image student (training checkpoint or transformer folder)")
        info = {"source": str(source), "weights": info.get("weights"), "step": info.get("step")}
    check_student_fits(model, teacher_config)
    return model, info


def load_pipeline(
    teacher: str | os.PathLike,
    transformer: ModelMixin | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """The teacher's diffusers pipeline, optionally with another transformer in it.

    ``DiffusionPipeline.from_pretrained(teacher, transformer=student)``: a given transformer is
    used as is and the teacher's transformer weights are never read. Weights are read from
    safetensors only (this project never unpickles files).

    Args:
        teacher: pipeline folder or Hub id ``org/repo[@revision]`` (offline: the cache).
        transformer: the student (cast to ``dtype`` here), or None for the teacher itself.
        dtype: dtype of the pipeline's models.

    Returns:
        The pipeline on the CPU (move it with ``.to(device)``), its progress bar off.

    Raises:
        T2ISampleError: the pipeline cannot be loaded (first line of the cause and the fix).
    """
    where, revision = _pipeline_location(teacher)
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
    if revision is not None:
        kwargs["revision"] = revision
    if transformer is not None:
        kwargs["transformer"] = transformer.to(dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise T2ISampleError(f"--pipeline {teacher}: cannot load the pipeline ({first}): pass a diffusers pipeline "
                             "folder with safetensors weights, or a cached Hub id") from None
    if not hasattr(pipe, "transformer"):
        raise T2ISampleError(f"--pipeline {teacher} is a {type(pipe).__name__} without a transformer: pass a "
                             "PixArt, SD3, FLUX.1 or Qwen-Image pipeline")
    pipe.set_progress_bar_config(disable=True)  # run_shards shows one bar for the whole run
    return pipe


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline ``output_type="np"`` images (floats in [0, 1], (n, H, W, 3)) to uint8, rounded as
    diffusers' ``numpy_to_pil`` does, so they equal the pipeline's PIL images."""
    return (np.asarray(images) * 255).round().astype(np.uint8)  # (n, H, W, 3)


def _default(signature: inspect.Signature, name: str) -> Any:
    param = signature.parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


@dataclass
class PromptSampler:
    """Prompts to images through a pipeline (an :class:`shd_diffusion.shards.ImageSampler`).

    Attributes:
        pipeline: the teacher's pipeline with the student as its transformer (:func:`load_pipeline`).
        prompts: the prompt list; image ``i`` renders ``prompts[i % len(prompts)]``.
        num_inference_steps: scheduler steps (None: the pipeline's default, recorded).
        guidance_scale: the pipeline's ``guidance_scale`` (CFG scale for PixArt / SD3, the embedded
            guidance of FLUX.1-dev; None: the pipeline's default, recorded). Qwen-Image's CFG is
            ``true_cfg_scale`` with a ``negative_prompt``: pass them in ``pipeline_kwargs``.
        seed: base seed of :func:`shd_diffusion.sampler.image_seeds`.
        height, width: image size (None: the pipeline's default).
        pipeline_kwargs: further ``pipeline(...)`` arguments (``negative_prompt``,
            ``max_sequence_length``, ``use_resolution_binning``, ...), recorded in the manifest.
    """

    pipeline: DiffusionPipeline
    prompts: Sequence[str]
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.prompts = list(self.prompts)
        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            raise T2ISampleError("prompts must be a non-empty list of strings: check --prompts")
        signature = inspect.signature(type(self.pipeline).__call__)
        name = type(self.pipeline).__name__
        if self.num_inference_steps is None:
            self.num_inference_steps = _default(signature, "num_inference_steps")
        if self.guidance_scale is None:
            self.guidance_scale = _default(signature, "guidance_scale")
        steps, scale = self.num_inference_steps, self.guidance_scale
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise T2ISampleError(f"--steps {steps}: must be an integer >= 1")
        if scale is not None and not math.isfinite(float(scale)):
            raise T2ISampleError(f"--guidance-scale {scale}: must be a finite number")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise T2ISampleError(f"--seed {self.seed}: must be an integer >= 0")
        for key in self.pipeline_kwargs:
            if key in _RESERVED:
                raise T2ISampleError(f"pipeline argument {key!r} is set by the sampler: use its own setting "
                                     "(--steps, --guidance-scale, --height, --width, --seed)")
            if key not in signature.parameters:
                raise T2ISampleError(f"{name} takes no argument {key!r}: drop it (it takes "
                                     f"{', '.join(p for p in signature.parameters if p != 'self')})")
        if "guidance_scale" not in signature.parameters:
            if scale is not None:
                raise T2ISampleError(f"{name} takes no guidance_scale: drop --guidance-scale")
            self.guidance_scale = None
        try:
            json.dumps(dict(self.pipeline_kwargs))
        except TypeError as err:
            raise T2ISampleError(f"pipeline arguments must be JSON values (they are recorded in the manifest): {err}") from None

    def generators(self, indices: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per image, seeded by (seed, index) alone."""
        return [torch.Generator("cpu").manual_seed(int(s)) for s in image_seeds(indices, self.seed)]

    def call_kwargs(self, indices: Sequence[int]) -> dict[str, Any]:
        """Exactly the ``pipeline(...)`` arguments of a batch of image indices (no ``output_type``)."""
        idx = prompt_indices(indices, len(self.prompts))
        kwargs: dict[str, Any] = {**self.pipeline_kwargs, "prompt": [self.prompts[i] for i in idx],
                                  "generator": self.generators(indices), "num_inference_steps": self.num_inference_steps}
        if self.guidance_scale is not None:
            kwargs["guidance_scale"] = self.guidance_scale
        for key in ("height", "width"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs

    def sample(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Render the given image indices (one pipeline call).

        Returns:
            uint8 (n, H, W, 3) images and int64 (n,) prompt indices (the shards' labels).
        """
        out = self.pipeline(**self.call_kwargs(indices), output_type="np")
        return to_uint8(out.images), prompt_indices(indices, len(self.prompts))  # (n, H, W, 3), (n,)

    def stream_fields(self) -> dict[str, Any]:
        """How each image's randomness and prompt are chosen (for the manifest)."""
        return {"seed_scheme": SEED_SCHEME, "generator": _GENERATOR, "prompt_rule": PROMPT_RULE}

    def settings(self) -> dict[str, Any]:
        """The pipeline and call settings that define the pixels (for the manifest)."""
        pipe = self.pipeline
        scheduler = {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")}
        return _plain({
            "pipeline_class": type(pipe).__name__,
            "scheduler": {"class": type(pipe.scheduler).__name__, **scheduler},
            "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
            "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
            "height": self.height, "width": self.width, "pipeline_kwargs": dict(self.pipeline_kwargs),
            "seed": self.seed, "num_prompts": len(self.prompts), "prompts_sha256": prompts_sha256(self.prompts),
        })


def _write_prompts(out_dir: Path, prompts: Sequence[str]) -> None:
    path = out_dir / "shards" / PROMPTS_FILE
    if path.is_file():
        try:
            if prompts_sha256(json.loads(path.read_text(encoding="utf-8"))) == prompts_sha256(prompts):
                return
        except (OSError, ValueError, TypeError):
            pass  # a damaged copy is rewritten (the manifest's hash already matched)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(list(prompts), ensure_ascii=False, indent=0) + "\n")


def sample_prompts(
    sampler: PromptSampler,
    out_dir: str | os.PathLike,
    num_samples: int | None = None,
    teacher: str | None = None,
    checkpoint: str | None = None,
    shard_size: int = 1000,
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    on_shard_done: Callable[[int], None] | None = None,
    show_progress: bool = False,
) -> list[int]:
    """Render this rank's unfinished shards of ``out_dir`` (resumable, any process count).

    Everything is checked against an existing manifest before any image is rendered; a changed
    setting (teacher, student weights, steps, guidance, seed, prompts, batch size, ...) is a
    :class:`~shd_diffusion.shards.ShardError` naming the field. Assemble with
    :func:`assemble_prompts` once every rank is done.

    Args:
        sampler: the :class:`PromptSampler`.
        out_dir: the run folder.
        num_samples: N images (None: one per prompt).
        teacher: the teacher pipeline id as given (recorded; None: the pipeline's own name).
        checkpoint: where the student was read from (recorded; a moved checkpoint with the same
            ``weights_sha256`` resumes).
        shard_size, batch_size, rank, world_size, on_shard_done, show_progress: as
            :func:`shd_diffusion.shards.run_shards`.

    Returns:
        The shard ids this call rendered.
    """
    out_dir = Path(out_dir)
    n = len(sampler.prompts) if num_samples is None else num_samples
    if not isinstance(n, int) or n < 1:
        raise T2ISampleError(f"--num-samples {n}: must be an integer >= 1")
    if shard_size < 1 or batch_size < 1:
        raise T2ISampleError(f"--shard-size {shard_size} / --batch-size {batch_size}: must be >= 1")
    pipe = sampler.pipeline
    settings = {
        **sampler.settings(),
        "teacher": str(teacher if teacher is not None else pipe.config.get("_name_or_path")),
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "weights_sha256": weights_sha256(pipe.transformer.state_dict()),  # what is sampled, by content
    }
    check_manifest(out_dir, shard_manifest(sampler, settings, n, shard_size, batch_size))  # refuse before writing
    _write_prompts(out_dir, sampler.prompts)
    return run_shards(sampler, out_dir, n, shard_size, batch_size, rank, world_size, manifest=settings,
                      on_shard_done=on_shard_done, show_progress=show_progress)


def assemble_prompts(out_dir: str | os.PathLike, png_dir: str | os.PathLike | None = None) -> Path:
    """Check every shard and write ``samples_{N}xHxWx3.npz`` with ``arr_0``, ``arr_1`` (prompt
    index per image) and ``prompts`` ((N,) str, the prompt per image).

    Raises:
        ShardError: not a text-to-image run folder, a prompt list that does not match the
            manifest, or any shard problem :func:`shd_diffusion.shards.assemble` finds.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    path = out_dir / "shards" / PROMPTS_FILE
    if "prompts_sha256" not in manifest or not path.is_file():
        raise ShardError(f"{out_dir} is not a text-to-image sample folder (no {path.name} / prompts_sha256): assemble "
                         "it without the prompts, or rerun the text-to-image sampling command")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} is unreadable ({err}): rerun the sampling command to rewrite it") from None
    if prompts_sha256(prompts) != manifest["prompts_sha256"]:
        raise ShardError(f"{path} does not hold the prompts the manifest records (prompts_sha256): rerun the sampling "
                         "command to rewrite it")
    n = int(manifest["num_samples"])
    per_image = np.array([prompts[i] for i in prompt_indices(range(n), len(prompts))], dtype=str)  # (N,) unicode
    final = assemble(out_dir, png_dir=png_dir, extra={"prompts": per_image})
    with np.load(final, allow_pickle=False) as z:
        if not np.array_equal(z["arr_1"], prompt_indices(range(n), len(prompts))):
            raise ShardError(f"{final}: the shards' prompt indices are not {PROMPT_RULE}: sample into a new --out")
    return final
