"""Export a text-to-image student: a diffusers model folder that drops into its teacher's pipeline.

The text-to-image half of :func:`shd_diffusion.export.export` (``python scripts/export.py
CHECKPOINT --out DIR [--pipeline TEACHER] [--full-pipeline] [--metrics scores.json]
[--push-to-hub org/name]``), used when CHECKPOINT is a training checkpoint (or run folder) of a
text-to-image student (``student.name: from_teacher``).

- **Default** -> ``DIR`` is the student transformer's own diffusers model folder
  (``config.json`` + safetensors, written by the family's
  :class:`~shd_diffusion.families.TextExportSpec`), so
  ``Pipeline.from_pretrained(teacher, transformer=Transformer.from_pretrained(DIR))`` runs the
  teacher's text encoders, tokenizers, VAE and scheduler around the student. Nothing of the
  teacher is copied: the card's line *references* the teacher's pipeline (a FLUX.1 T5 alone is
  ~9 GB), and that reference is the only way a pipeline can share components without copying them
  (a diffusers ``model_index.json`` names classes, not other repositories).
- **``--full-pipeline``** -> ``DIR`` is a whole pipeline folder that loads on its own
  (``Pipeline.from_pretrained(DIR)``): ``DIR/transformer`` is the student, every other component
  is *copied* from the teacher's pipeline folder (a Hub id: its files in the Hugging Face cache)
  with the teacher's ``model_index.json``. Copied because a pipeline folder (and a Hub repo made
  from it) must hold every component; symlinks would not survive an upload or a moved teacher.
  Pickled weight files (``*.bin``, ``*.pt``, ...) are not copied: this package loads safetensors
  only.

The teacher pipeline is the one recorded at training (``train.validation_pipeline``, else the
pipeline holding ``teacher.checkpoint``), or ``--pipeline``. Both layouts get a model card
(``README.md``, its code runs as written), ``export.json`` (provenance: teacher, weights sha256,
step, distill settings, layout, what was copied) and are written atomically like every export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml
from .checkpoint import CHECKPOINT_DIR, latest_checkpoint
from .cli import BadInput
from .console import say
from .families import FamilySpec, TextExportSpec, family_of
from .fileio import atomic_dir, atomic_write_text, os_errors_of_safetensors
from .models.loading import load_checkpoint_file, weights_sha256
from .sampler import image_seeds
from .models.sources import parse_hub_id
from .t2i_sampling import T2ISampleError, load_student, teacher_transformer_config
from .train_config import FROM_TEACHER

__all__ = ["CARD_PROMPT", "text_checkpoint", "export_text"]

CARD_PROMPT = "a photo of a cat"  # the card's example prompt
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.msgpack", "*.h5")  # weights never copied (safetensors only)


def text_checkpoint(source: Any) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
    """(checkpoint path, its training config, its identity entry) when ``source`` is a text-to-image training checkpoint
    or run folder; None for anything else (class-conditional checkpoints, folders, Hub ids)."""
    path = Path(str(source))
    if path.is_dir() and (path / CHECKPOINT_DIR).is_dir():
        path = latest_checkpoint(path) or path
    if not (path.is_file() and path.suffix in (".pt", ".pth")):
        return None
    raw = load_checkpoint_file(path)  # weights-only; load_student reads it again (tensors mmapped by torch)
    config = raw.get("config") if isinstance(raw.get("config"), Mapping) else {}
    student = config.get("student") if isinstance(config.get("student"), Mapping) else {}
    identity = raw.get("identity") if isinstance(raw.get("identity"), Mapping) else {}
    return (path, dict(config), dict(identity)) if student.get("name") == FROM_TEACHER else None


def _teacher_pipeline(config: Mapping[str, Any], pipeline: str | None, path: Path) -> str:
    """The teacher's pipeline: ``--pipeline``, else the one recorded at training."""
    if pipeline is not None:
        return pipeline
    from .training.t2i_previews import PreviewError, pipeline_source

    teacher = config.get("teacher") if isinstance(config.get("teacher"), Mapping) else {}
    train = config.get("train") if isinstance(config.get("train"), Mapping) else {}
    recorded = train.get("validation_pipeline")
    if recorded is None and not teacher.get("checkpoint"):
        raise BadInput(f"{path} records no teacher (teacher.checkpoint): pass the teacher's pipeline with --pipeline "
                       "(folder or Hub id)")
    try:
        return pipeline_source(recorded, teacher.get("checkpoint"))
    except PreviewError:
        raise BadInput(f"{path}: its teacher.checkpoint {teacher.get('checkpoint')} is not inside a diffusers pipeline "
                       "(no model_index.json): pass the teacher's pipeline with --pipeline (folder or Hub id)") from None


def _pipeline_files(teacher: str, full: bool) -> tuple[dict[str, Any], Path | None]:
    """The teacher's ``model_index.json`` and, for ``full``, the folder holding its components
    (a local folder, or its Hub snapshot in the cache without the teacher's transformer)."""
    folder: Path | None = Path(teacher) if Path(teacher).is_dir() else None
    if folder is None:  # a Hub id (teacher_transformer_config has checked its form)
        ref = parse_hub_id(teacher)
        where, revision = ref.repo_id, ref.revision
        import huggingface_hub
        from huggingface_hub import errors

        try:
            if full:
                folder = Path(huggingface_hub.snapshot_download(where, revision=revision,
                                                                ignore_patterns=["transformer/*", *PICKLED]))
                index_path = folder / "model_index.json"
            else:
                index_path = Path(huggingface_hub.hf_hub_download(where, "model_index.json", revision=revision))
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError) as err:
            raise BadInput(f"--pipeline {teacher}: cannot read its files ({str(err).splitlines()[0][:200]}): download "
                           f"the pipeline once (hf download {where}) or pass a local pipeline folder") from None
    else:
        index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"--pipeline {teacher} has no readable model_index.json ({err}): pass a diffusers pipeline "
                       "folder or Hub id") from None
    return index, folder if full else None


def _copy_components(index: Mapping[str, Any], source: Path, target: Path) -> dict[str, str]:
    """Copy every component but the transformer (file contents, links followed); returns what was done."""
    done: dict[str, str] = {}
    for name, entry in index.items():
        if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or entry[0] is None:
            continue
        if not (source / name).is_dir():
            raise BadInput(f"the teacher pipeline {source} lists {name} but has no {name}/ folder: fetch it completely")
        shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns(*PICKLED))
        done[name] = "copied from the teacher"
    done["transformer"] = "the student"
    return done


def _code(pipeline_class: str, model_class: str, teacher: str, where: str, full: bool, seed: int) -> list[str]:
    """The card's code (a test runs it with local paths)."""
    sub = ', subfolder="transformer"' if full else ""
    call = f'image = pipe("{CARD_PROMPT}", generator=torch.Generator().manual_seed({seed})).images[0]'
    lines = ["```python", "import torch", f"from diffusers import {pipeline_class}, {model_class}", "",
             f'pipe = {pipeline_class}.from_pretrained("{teacher}", transformer={model_class}.from_pretrained("{where}"{sub}))',
             call, "```", ""]
    if full:
        lines += ["The folder is also a whole pipeline (the teacher's other components copied in):", "", "```python",
                  "import torch", f"from diffusers import {pipeline_class}", "",
                  f'pipe = {pipeline_class}.from_pretrained("{where}")', call, "```", ""]
    return lines


def _card(family: FamilySpec, info: dict[str, Any], meta: dict[str, Any], config: Mapping[str, Any],
          metrics: Mapping[str, Any] | None, where: str) -> str:
    """The model card: what the student is, how to load it, its scores and provenance."""
    spec: TextExportSpec = family.export  # type: ignore[assignment]
    seed = int(image_seeds([0], 0)[0])
    lines = ["---", "library_name: diffusers", "tags: [text-to-image, distillation, shd]", "---", "",
             f"# {family.name} student distilled with Squeezing-Heads Distillation (SHD)", "",
             f"A `{meta['transformer_class']}` distilled from the transformer of `{meta['teacher_pipeline']}`; it replaces "
             f"that pipeline's transformer (`{meta['pipeline_class']}`), whose text encoders, tokenizers, VAE and "
             "scheduler it uses unchanged.", "", "## Load", ""]
    lines += _code(meta["pipeline_class"], meta["transformer_class"], meta["teacher_pipeline"], where,
                   meta["layout"] == "pipeline", seed)
    lines += [f"With the pipeline's default steps and guidance this is image 0 of "
              f"`shd_diffusion.t2i_sampling.PromptSampler(pipe, prompts=[\"{CARD_PROMPT}\"], seed=0)`, as "
              f"`python -m sampling.sample --pipeline {meta['teacher_pipeline']} --checkpoint {where} --prompts FILE --seed 0` "
              "renders it when the file's first prompt is this one (image i uses "
              "`torch.Generator().manual_seed(image_seeds([i], seed)[0])` in float32; another dtype moves the last bits)."
              + (f" {spec.card_note}" if spec.card_note else ""), ""]
    if metrics:
        lines += ["## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None]
        lines += [""]
    step = meta["step"] if meta["step"] is not None else "unknown (not stored in the checkpoint)"
    lines += ["## Provenance", "",
              f"- teacher pipeline: `{meta['teacher_pipeline']}` ({meta['pipeline_class']}); teacher transformer "
              f"`{meta['teacher_checkpoint']}`, weights sha256 `{meta['teacher_sha256']}`",
              f"- exported from `{info['source']}` ({info['weights']}), training steps: {step}",
              f"- student weights sha256 (shd_diffusion.models.loading.weights_sha256): `{meta['weights_sha256']}`",
              f"- student shape vs the teacher: `{json.dumps(meta['teacher_overrides'])}`", ""]
    if meta["distill"]:
        lines += ["Distillation settings:", "", "```yaml", yaml.safe_dump(meta["distill"], sort_keys=False).rstrip(),
                  "```", ""]
    if config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def export_text(
    path: Path,
    config: Mapping[str, Any],
    identity: Mapping[str, Any],
    out: Path,
    weights: str = "ema",
    metrics: Mapping[str, Any] | None = None,
    pipeline: str | None = None,
    full_pipeline: bool = False,
    card_location: str | None = None,
) -> Path:
    """Write a text-to-image student export (see the module docstring); ``out`` is already checked.

    Args:
        path: the training checkpoint (:func:`text_checkpoint`).
        config: its training config.
        identity: its ``identity`` entry (the teacher's weights sha256).
        out: the folder to create.
        weights: ``"ema"`` or ``"raw"``.
        metrics: a ``sampling.score --json`` report (FID, CLIP score) for the card.
        pipeline: the teacher's pipeline folder or Hub id (None: the one recorded at training).
        full_pipeline: write a whole pipeline folder (the teacher's other components copied).
        card_location: where the card says the export lives (the Hub repo; default ``out``).

    Returns:
        ``out``.

    Raises:
        BadInput: an unresolvable or unreadable teacher pipeline (naming ``--pipeline``), weights
            that do not fit it; nothing is written.
    """
    teacher = _teacher_pipeline(config, pipeline, path)
    try:
        teacher_config = teacher_transformer_config(teacher)
    except T2ISampleError as err:
        where = "--pipeline" if pipeline else "recorded at training; give another with --pipeline"
        raise BadInput(f"{err} (the teacher pipeline: {where})") from None
    index, source = _pipeline_files(teacher, full_pipeline)
    if card_location is not None and Path(teacher).is_dir() and not full_pipeline:
        say(f"warning: the card's line loads the teacher pipeline from the local folder {teacher}; pass --pipeline "
            "with its Hub id (org/repo) so the uploaded card works for others")
    model, info = load_student(path, teacher_config, use_ema=weights == "ema")
    if weights == "raw" and "raw" not in str(info["weights"]):
        raise BadInput(f"--weights raw: {path} has no raw ('model') weights; drop --weights raw")
    family = family_of(model)
    if family is None or not isinstance(family.export, TextExportSpec):
        raise BadInput(f"{path} holds a {type(model).__name__}, which has no text-to-image export")
    student_cfg = config.get("student") if isinstance(config.get("student"), Mapping) else {}
    meta: dict[str, Any] = {
        "kind": "text-to-image", "layout": "pipeline" if full_pipeline else "model",
        "family": family.name, "source": info["source"], "weights": info["weights"], "step": info.get("step"),
        "weights_sha256": weights_sha256(model.state_dict()),
        "teacher_pipeline": str(teacher), "pipeline_class": str(index.get("_class_name")),
        "transformer_class": type(model).__name__,
        "teacher_checkpoint": info.get("trained_with_teacher"), "teacher_sha256": identity.get("teacher_sha256"),
        "teacher_overrides": dict(student_cfg.get("teacher_overrides") or {}),
        "distill": dict(config.get("distill") or {}),
        "scores": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, str)) or v is None},
    }
    with os_errors_of_safetensors(out), atomic_dir(out) as tmp:  # a full disk: one error line, no folder
        family.export.write_model(model, tmp / "transformer" if full_pipeline else tmp)
        if full_pipeline:
            meta["components"] = _copy_components(index, source, tmp)
            atomic_write_text(tmp / "model_index.json", json.dumps(index, indent=2) + "\n")
        else:
            meta["components"] = {"transformer": "the student (other components: the teacher's pipeline, referenced)"}
        atomic_write_text(tmp / "README.md", _card(family, info, meta, config, metrics, card_location or str(out)))
        atomic_write_text(tmp / "export.json", json.dumps(meta, indent=2, default=str) + "\n")
    return out
