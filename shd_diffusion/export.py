"""Export a trained student to the formats people deploy: diffusers folders and the Hub.

The library behind ``python scripts/export.py CHECKPOINT --out DIR [--weights ema|raw] [--push-to-hub REPO]``
(its command line: :mod:`shd_diffusion.commands.export`).

- **DiT** -> ``DIR`` is a ``DiTPipeline`` folder (``model_index.json``, ``transformer/``,
  ``scheduler/``, ``vae/``); ``DIR/transformer`` is a ``DiTTransformer2DModel`` folder with the
  same function as the student (:func:`shd_diffusion.models.to_diffusers`). A student with the
  original DiT timestep features (``freq_shift=0``, the default) is stored as
  ``DiTTransformer2DModelFreqShift`` with its source file beside the weights, so it loads with
  ``trust_remote_code=True`` and without this package. ``DiTPipeline`` itself discards the
  learned variance (its scheduler here is DDPM with ADM's fixed-large variance), guides all 4
  latent channels with a constant scale and assumes 1000 classes; the folder also loads as
  :class:`~shd_diffusion.pipelines.ClassConditionalPipeline`, which samples like this package.
- **MDTv2** -> ``DIR`` is a :class:`~shd_diffusion.pipelines.ClassConditionalPipeline` folder
  (power-cosine guidance, learned-range DDPM); ``DIR/transformer`` is the model's own
  ``save_pretrained`` folder. Loading needs this package installed.

Both get a model card (``README.md``, whose code runs as written) and ``export.json`` (source,
weights, step, VAE, pixel or latent space, the sampler settings the pipeline uses). The folder is
written under a temporary name and renamed at the end (files 0644 under umask 022); a non-empty
target is refused, a full disk is one ``error:`` line and leaves no folder, and the hidden
temporary folder of a killed export to the same target is removed by the next run.

A pixel-space DiT gets a ``ClassConditionalPipeline`` folder too (``DiTPipeline`` needs a VAE).

- **Text-to-image students** (PixArt, SD3, FLUX.1, Qwen-Image training checkpoints) -> ``DIR`` is
  the student's diffusers model folder for the teacher's own pipeline, or with ``full_pipeline`` a
  whole pipeline folder: :mod:`shd_diffusion.t2i_export`.

What is family-specific (the ``transformer/`` writer, the scheduler's variance, the diffusers
pipeline, the card's notes) is the family's :class:`~shd_diffusion.families.ExportSpec`
(``shd_diffusion/families/dit.py``, ``mdt.py``); this module writes the rest the same way for all.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from shd_diffusion.cli import BadInput
from shd_diffusion.console import say
from shd_diffusion.families import ExportSpec, FamilySpec, TextExportSpec, family_of, registered
from shd_diffusion.fileio import atomic_dir, atomic_write_text, os_errors_of_safetensors, remove_stale_temps
from shd_diffusion.models import parse_hub_id
from shd_diffusion.models.sources import load_model_with_info
from shd_diffusion.pipelines import ddpm_scheduler
from shd_diffusion.sampler import resolve_clip_denoised, resolve_guidance_schedule
from shd_diffusion.t2i_export import export_text, text_checkpoint
from shd_diffusion.vae import load_vae, resolve_vae_spec

__all__ = ["export"]

# How the card describes each guidance schedule (resolve_guidance_schedule's values).
SCHEDULE_TEXT = {
    "power-cosine": "MDTv2's power-cosine schedule scale_t = (s - 1) (1 - cos(pi (1 - t/1000)^4)) / 2 + 1",
    "constant": "a constant scale",
}


def _check_target(out: Path) -> None:
    """Refuse a target that is a file or a non-empty folder (before any work)."""
    if out.is_file():
        raise BadInput(f"--out {out} is a file: give a folder path")
    if out.is_dir() and any(out.iterdir()):
        raise BadInput(f"--out {out} is not empty: choose a new folder (export never overwrites)")
    if not out.parent.exists():
        raise BadInput(f"the folder above --out, {out.parent}, does not exist: create it first")


def _model_index(pipeline: str, transformer: list[str], vae: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A diffusers ``model_index.json`` naming each component's library and class."""
    import diffusers

    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
                             "transformer": transformer, "scheduler": ["diffusers", "DDPMScheduler"],
                             "vae": ["diffusers", "AutoencoderKL"] if vae else [None, None]}
    index.update(extra or {})
    return index


def _sampler_config(model: nn.Module, family: FamilySpec, vae: Any) -> dict[str, Any]:
    """What ``ClassConditionalPipeline`` needs to sample as ``sampling.sample`` does by default
    (its ``auto`` choices resolved): the guidance schedule, the null class, x_0 clipping."""
    return {"guidance_schedule": resolve_guidance_schedule("auto", model), "scale_pow": 4.0, "guidance_channels": 3,
            "null_class": family.null_class(model),
            "clip_denoised": resolve_clip_denoised("auto", pixel_space=vae is None)}


def _write(model: nn.Module, family: FamilySpec, vae: Any, folder: Path) -> dict[str, Any]:
    """The whole folder: the family's ``transformer/``, then scheduler, VAE and ``model_index.json``
    (a folder for the family's diffusers pipeline when it has one and the model is latent, e.g.
    ``DiTPipeline``, which needs a VAE; a ``ClassConditionalPipeline`` folder otherwise). Returns notes."""
    spec: ExportSpec = family.export
    entry = spec.write_transformer(model, folder)
    ddpm_scheduler(spec.scheduler_variance).save_pretrained(folder / "scheduler")
    if vae is not None:
        vae.save_pretrained(folder / "vae")
    sampler = _sampler_config(model, family, vae)
    if spec.diffusers_pipeline and vae is not None:  # diffusers' pipeline warns about unknown keys: none added
        index = _model_index(spec.diffusers_pipeline, entry.component, True)
    else:
        index = _model_index("ClassConditionalPipeline", entry.component, vae is not None, sampler)
    atomic_write_text(folder / "model_index.json", json.dumps(index, indent=2) + "\n")
    return {"transformer_class": entry.component[1], "custom_code": entry.custom_code, "pipeline": index["_class_name"],
            "space": "latent" if vae is not None else "pixel", "sampler": sampler}


def _load_section(model: nn.Module, family: FamilySpec, notes: dict[str, Any], where: str, vae: str | None
                  ) -> list[str]:
    """The card's "Load" section: code that runs as written on this export (a test runs it)."""
    classes = int(model.config.num_classes)
    labels = list(range(min(4, classes)))  # image i of sampling.sample has label i % classes
    remote = ", trust_remote_code=True" if notes["custom_code"] else ""
    clip = "clips the predicted x_0 to [-1, 1] (pixel-space model)" if notes["sampler"]["clip_denoised"] else "does not clip x_0 (latent model)"
    lines = ["## Load", "", "```python",
             "from shd_diffusion.pipelines import ClassConditionalPipeline  # pip install shd_diffusion",
             f'pipe = ClassConditionalPipeline.from_pretrained("{where}"{remote})',
             f"images = pipe(class_labels={labels}, guidance_scale=3.8, num_inference_steps=250, seed=0).images", "```", "",
             "`ClassConditionalPipeline` runs this package's sampler: these are the images 0.."
             f"{len(labels) - 1} (labels i % {classes}) of `python -m sampling.sample --seed 0 --steps 250 --cfg-scale 3.8 "
             f"--precision fp32{f' --vae {vae}' if vae else ''}` on the exported checkpoint"
             + family.export.parity_note
             + f". It {clip}, guides the first 3 eps channels (all of a pixel model's) with "
             + SCHEDULE_TEXT[notes["sampler"]["guidance_schedule"]]
             + f" and samples with {'the learned-range' if model.config.learn_sigma else 'a fixed'} variance.", ""]
    if notes["pipeline"] != "DiTPipeline":
        if family.export.diffusers_pipeline:
            lines += [f"diffusers' `{family.export.diffusers_pipeline}` does not load this export: it needs a VAE "
                      "(latent models only).", ""]
        return lines
    scale = 4.0 if classes == 1000 else 1.0  # DiTPipeline's null class is 1000
    lines += ["It also loads in diffusers' `DiTPipeline`:", "", "```python", "from diffusers import DiTPipeline",
              f'pipe = DiTPipeline.from_pretrained("{where}"{remote})',
              f"images = pipe(class_labels={labels}, guidance_scale={scale}, num_inference_steps=250).images", "```", "",
              "`DiTPipeline` guides all latent channels with a constant scale, uses class 1000 as the null class, and "
              "drops the learned variance (its scheduler here uses the fixed-large variance), so its images differ from "
              "this package's sampler. Scores below come from this package's sampler.", ""]
    if classes != 1000:
        lines += [f"This model has {classes} classes: `DiTPipeline` guidance (null class 1000) fails for it, hence "
                  "`guidance_scale=1.0` there; `ClassConditionalPipeline` guides with the model's own null class.", ""]
    if notes["custom_code"]:
        lines += ["The student uses the original DiT timestep features, which `DiTTransformer2DModel` cannot express; "
                  "`transformer/dit_transformer_freq_shift.py` (a small subclass) adds them, hence `trust_remote_code`.", ""]
    return lines


def _card(model: nn.Module, family: FamilySpec, info: dict[str, Any], notes: dict[str, Any],
          metrics: dict[str, Any] | None, vae: str | None, where: str) -> str:
    """The model card: what the model is, how it was trained, how to load it, its scores."""
    config = info.get("config") if isinstance(info.get("config"), dict) else None
    teacher = (config or {}).get("teacher") or {}
    lines = [
        "---", "library_name: diffusers", "tags: [class-conditional, image-generation, distillation, shd]", "---", "",
        f"# {family.name} student distilled with Squeezing-Heads Distillation (SHD)" if teacher
        else f"# {family.name} exported by shd_diffusion", "",
        f"- exported from `{info['source']}` ({info['weights']})",
        f"- training steps: {info.get('step') if info.get('step') is not None else 'unknown (not stored in the checkpoint)'}",
        f"- teacher: {teacher.get('model', {}).get('name', 'unknown')} from `{teacher.get('checkpoint', 'unknown')}`"
        if teacher else "- teacher: unknown (the checkpoint stores no training config)",
        f"- VAE: `{vae}`" if vae else "- pixel-space model (no VAE)",
        f"- architecture: `{json.dumps({k: v for k, v in model.config.items() if not k.startswith('_')})}`", "",
    ]
    lines += _load_section(model, family, notes, where, vae)
    if metrics:
        lines += ["## Scores", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None]
        lines += [""]
    if config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _read_metrics(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BadInput(f"--metrics {path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise BadInput(f"--metrics {path} holds a {type(data).__name__}, expected a JSON object (sampling.score --json)")
    return data


def export(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    weights: str = "ema",
    vae: str | None = None,
    metrics: str | None = None,
    push_to_hub: str | None = None,
    pipeline: str | None = None,
    full_pipeline: bool = False,
) -> Path:
    """Export a checkpoint to a diffusers folder (see the module docstring): DiT, MDTv2 and text-to-image students.

    Args:
        checkpoint: any source of :func:`shd_diffusion.models.sources.load_model`.
        out: the folder to create (absent or empty).
        weights: ``"ema"`` or ``"raw"`` (a training checkpoint's ``model`` entry).
        vae: VAE folder or Hub id shipped in ``vae/`` (latent models; default sd-vae-ft-ema).
        metrics: a ``sampling.score --json`` file whose scores go into the card.
        push_to_hub: upload the finished folder to this Hub repo (created if missing).
        pipeline: text-to-image students: the teacher's pipeline folder or Hub id (default: the one
            recorded at training).
        full_pipeline: text-to-image students: a whole pipeline folder, not only the transformer
            (:mod:`shd_diffusion.t2i_export`).

    Returns:
        The exported folder.
    """
    out = Path(out)
    if weights not in ("ema", "raw"):
        raise BadInput(f"--weights must be ema or raw, got {weights!r}")
    if push_to_hub is not None and (parse_hub_id(push_to_hub) is None or ":" in push_to_hub or "@" in push_to_hub):
        raise BadInput(f"--push-to-hub {push_to_hub!r} is not a Hub repo id: use org/name")
    _check_target(out)
    scores = _read_metrics(metrics)
    text = text_checkpoint(checkpoint)  # a text-to-image student: its teacher's pipeline, not a VAE
    if text is None and (pipeline is not None or full_pipeline):
        flags = " and ".join(f for f, on in (("--pipeline", pipeline is not None), ("--full-pipeline", full_pipeline)) if on)
        raise BadInput(f"{flags}: only for text-to-image students, and {checkpoint} is not a text-to-image training "
                       f"checkpoint: drop {flags}")
    if text is not None:
        if vae is not None:
            raise BadInput("--vae: a text-to-image student uses its teacher pipeline's own VAE: drop --vae")
        for stale in remove_stale_temps(out):
            say(f"removed {stale}, left by an interrupted export")
        export_text(*text, out, weights, scores, pipeline, full_pipeline, push_to_hub)
        if push_to_hub is not None:
            _upload(out, push_to_hub, f"Export {Path(str(checkpoint)).name}")
        return out
    model, info = load_model_with_info(checkpoint, use_ema=weights == "ema")
    if weights == "raw" and "raw training" not in info["weights"]:
        raise BadInput(f"--weights raw: {checkpoint} has no separate raw ('model') weights, only {info['weights']}; drop --weights raw")
    family = _exportable_family(model, checkpoint)
    in_channels = int(model.config.in_channels)
    vae_model = load_vae(vae, in_channels)
    vae_name = resolve_vae_spec(vae, in_channels)  # None for a pixel-space model
    for stale in remove_stale_temps(out):  # a killed export's hidden folder (nothing else writes `out`)
        say(f"removed {stale}, left by an interrupted export")
    with os_errors_of_safetensors(out), atomic_dir(out) as tmp:  # a full disk: one error line, no folder
        notes = _write(model, family, vae_model, tmp)
        atomic_write_text(tmp / "README.md", _card(model, family, info, notes, scores, vae_name, push_to_hub or str(out)))
        meta = {"source": info["source"], "weights": info["weights"], "step": info.get("step"), "vae": vae_name, **notes}
        atomic_write_text(tmp / "export.json", json.dumps(meta, indent=2, default=str) + "\n")
    if push_to_hub is not None:
        _upload(out, push_to_hub, f"Export {Path(str(checkpoint)).name}")
    return out


def _exportable_family(model: nn.Module, checkpoint: Any) -> FamilySpec:
    """The model's family, refused as bad input when no family covers it or it has no export."""
    names = " and ".join(spec.name for spec in registered() if isinstance(spec.export, ExportSpec))
    try:
        family = family_of(model)
    except ValueError:
        family = None
    if family is not None and isinstance(family.export, TextExportSpec):
        raise BadInput(f"{checkpoint} holds a {family.name} transformer, already a diffusers model: export a "
                       "text-to-image student from its training checkpoint or run folder")
    if family is None or not isinstance(family.export, ExportSpec):
        raise BadInput(f"{checkpoint} holds a {type(model).__name__}; export handles {names}")
    return family


def _upload(folder: Path, repo_id: str, message: str) -> None:
    """Create the Hub repo if needed and upload the finished folder (huggingface_hub's upload)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=message)
    except (HfHubHTTPError, LocalTokenNotFoundError, OSError) as err:
        raise BadInput(
            f"the export in {folder} is complete, but uploading it to {repo_id} failed ({str(err).splitlines()[0][:200]}): "
            f"once the Hub is reachable and you are logged in (hf auth login or HF_TOKEN), run `hf upload {repo_id} {folder}`"
        ) from None
