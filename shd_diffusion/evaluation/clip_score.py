"""CLIP score of text-to-image samples: how well each image matches its own prompt.

Definition (Hessel et al. 2021 without their w = 2.5; the one torchmetrics' ``CLIPScore`` and
the text-to-image distillation papers report):

    CLIP score = 100 * mean_i max(cos(E_img(x_i), E_txt(p_i)), 0)

with E the CLIP model's projected image / text embeddings. Images go through the model's own
``CLIPProcessor`` (resize the short side, center crop, normalise); prompts through its tokenizer,
truncated to the text encoder's context (77 tokens for OpenAI CLIP; the report counts truncated
prompts). Higher is better; ``openai/clip-vit-large-patch14`` is the usual model.

Library choice: transformers' ``CLIPModel`` / ``CLIPProcessor`` (already a dependency of this
package for the pipelines' text encoders) rather than torchmetrics: torchmetrics' ``CLIPScore``
is itself a thin wrapper around the same transformers classes and formula, so adding it would be
a new dependency (and its own pin) for no other number; open_clip would be another model
zoo with other weight files. Loading goes through ``from_pretrained`` (the Hugging Face cache;
``HF_HUB_OFFLINE=1`` works for a cached id or a local folder) with safetensors only.

The pairs come from the sample file itself: ``prompts`` (N,) str beside ``arr_0`` in the files
:func:`shd_diffusion.t2i_sampling.assemble_prompts` writes, or a prompt list given explicitly.
The report has the shape of :func:`shd_diffusion.evaluation.scoring.score`'s: the figure, counts,
the weights (id, revision, sha256 of the loaded state dict) and a ``provenance`` entry
``clip_score`` with protocol, reference, feature extractor, features and weights sha256, so it
merges into the FID report (``report["provenance"].update(clip["provenance"])``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..models.loading import weights_sha256
from .images import ARCHIVE_ERRORS, ScoreError, as_rgb_nhwc, open_npz_images

__all__ = [
    "CLIP_DEFINITION",
    "DEFAULT_CLIP",
    "ClipError",
    "check_clip_source",
    "load_clip",
    "clip_scores",
    "read_sample_prompts",
    "clip_score",
]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_DEFINITION = ("100 * mean over images of max(cos(image_embeds, text_embeds), 0): CLIPModel's projected "
                   "embeddings of each image and its own prompt (prompt truncated to the text context)")


class ClipError(ScoreError):
    """A CLIP source or a prompt set that cannot be used; the message names the fix."""


def _split_revision(source: str) -> tuple[str, str | None]:
    """``org/repo@revision`` -> (``org/repo``, revision); a local path is returned as is."""
    if Path(source).exists() or "@" not in source:
        return source, None
    repo, _, revision = source.partition("@")
    return repo, revision or None


def _revision_of(repo: str, requested: str | None) -> str | None:
    """The Hub commit a model was read from (its snapshot folder in the cache); None for a local folder."""
    if Path(repo).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=requested)
    return Path(cached).parent.name if isinstance(cached, str) else requested


def _not_clip(kind: str, where: str) -> ClipError:
    return ClipError(f"{where} is a {kind} model, not CLIP (config model_type {kind!r}); pass a CLIP model such as "
                     f"{DEFAULT_CLIP} or a folder saved with CLIPModel.save_pretrained")


def _refuse_local_non_clip(folder: Path, where: str) -> None:
    """A local folder's config.json is read first, so a diffusers folder (no ``model_type``) is named too."""
    path = folder / "config.json"
    if not folder.is_dir() or not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ClipError(f"{where}: {path} is not valid JSON ({err}); save the CLIP model again") from None
    kind = config.get("model_type") or config.get("_class_name") or "unknown" if isinstance(config, dict) else "unknown"
    if kind != "clip":
        raise _not_clip(str(kind), where)


def check_clip_source(source: str) -> None:
    """Refuse, from its config alone (no weights read), a source that is not a CLIP model.

    Args:
        source: a Hub id ``org/repo[@revision]`` (the cache when ``HF_HUB_OFFLINE=1``) or a local folder.

    Raises:
        ClipError: no config found (offline and not cached, a wrong path) or a config of another model type.
    """
    from transformers import AutoConfig

    repo, revision = _split_revision(str(source))
    where = f"--clip {source}"
    _refuse_local_non_clip(Path(repo), where)
    try:
        config = AutoConfig.from_pretrained(repo, revision=revision)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        offline = " (HF_HUB_OFFLINE is set: download it once with network access)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ClipError(f"{where}: no model config found ({first}){offline}; pass a CLIP Hub id such as "
                        f"{DEFAULT_CLIP} or a folder saved with CLIPModel.save_pretrained") from None
    if getattr(config, "model_type", None) != "clip":
        raise _not_clip(getattr(config, "model_type", None) or "unknown", where)


def load_clip(source: str, device: str | torch.device = "cpu") -> tuple[Any, Any, dict[str, Any]]:
    """A CLIP model and its processor from a Hub id (``org/repo[@revision]``) or a local folder.

    Args:
        source: e.g. ``openai/clip-vit-large-patch14`` or a ``save_pretrained`` folder holding the
            model (``config.json`` with ``model_type: clip``, safetensors weights) and processor.
        device: where the model runs.

    Returns:
        (``CLIPModel`` in eval mode, ``CLIPProcessor``, info: ``model``, ``revision``,
        ``weights_sha256``, ``library``).

    Raises:
        ClipError: not found / not cached offline, not a CLIP model (names its type), or no processor.
    """
    import transformers
    from transformers import CLIPModel, CLIPProcessor

    check_clip_source(source)
    repo, revision = _split_revision(str(source))
    where = f"--clip {source}"
    try:
        model = CLIPModel.from_pretrained(repo, revision=revision, use_safetensors=True)
        processor = CLIPProcessor.from_pretrained(repo, revision=revision)
    except (OSError, ValueError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ClipError(f"{where}: cannot load the CLIP model and its processor ({first}); the folder needs "
                        "safetensors weights and the processor files (CLIPProcessor.save_pretrained)") from None
    model = model.float().eval().requires_grad_(False).to(device)
    info = {
        "model": str(source), "revision": _revision_of(repo, revision),
        "weights_sha256": weights_sha256(model.state_dict()),
        "library": f"transformers {transformers.__version__} CLIPModel + {type(processor.image_processor).__name__}",
    }
    return model, processor, info


def _context_length(model: Any) -> int:
    return int(model.config.text_config.max_position_embeddings)


@torch.no_grad()
def clip_scores(
    images: np.ndarray,
    prompts: Sequence[str],
    model: Any,
    processor: Any,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, int]:
    """Per-image ``100 * max(cos(image, prompt), 0)`` of one batch.

    Args:
        images: uint8 (n, H, W, 3).
        prompts: n prompts, ``prompts[j]`` for ``images[j]``.
        model, processor: from :func:`load_clip`.

    Returns:
        ((n,) float64 scores, number of prompts truncated to the text context).
    """
    if len(images) != len(prompts):
        raise ClipError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
    context = _context_length(model)
    full = processor.tokenizer(list(prompts), padding=False, truncation=False)["input_ids"]
    truncated = sum(len(ids) > context for ids in full)
    batch = processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True,
                      truncation=True, max_length=context)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(**batch)
    img = torch.nn.functional.normalize(out.image_embeds.double(), dim=-1)  # (n, D)
    txt = torch.nn.functional.normalize(out.text_embeds.double(), dim=-1)  # (n, D)
    cos = (img * txt).sum(-1)  # (n,) each image with its own prompt
    return (100.0 * cos.clamp(min=0)).cpu().numpy(), truncated


def read_sample_prompts(samples: str | os.PathLike) -> list[str]:
    """The ``prompts`` member of a sample file (one per image), as text-to-image sampling writes it.

    Raises:
        ClipError: no ``prompts`` member, or one that is not (N,) text.
    """
    try:
        with np.load(samples, allow_pickle=False) as z:
            if "prompts" not in z.files:
                raise ClipError(f"{samples} has no 'prompts' member (a class-conditional sample file, or written "
                                "by another tool): pass the prompts, one per image, with --clip-prompts")
            prompts = z["prompts"]
    except ClipError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise ClipError(f"{samples}: its prompts are pickled objects, which are refused: store them as a str array") from None
        raise ClipError(f"{samples} is not a readable .npz ({err}): sample or assemble it again") from None
    except ARCHIVE_ERRORS as err:
        raise ClipError(f"{samples} is not a readable .npz ({err}): sample or assemble it again") from None
    if prompts.dtype.kind != "U" or prompts.ndim != 1:
        raise ClipError(f"{samples}: 'prompts' is {prompts.dtype} {prompts.shape}, expected (N,) str")
    return [str(p) for p in prompts]


def clip_score(
    samples: str | os.PathLike,
    clip_model: str = DEFAULT_CLIP,
    prompts: Sequence[str] | None = None,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """CLIP score of a sample file (:data:`CLIP_DEFINITION`).

    Args:
        samples: ``.npz`` with ``arr_0`` uint8 (N, H, W, 3), streamed batch by batch.
        clip_model: Hub id ``org/repo[@revision]`` or local folder of a CLIP model + processor.
        prompts: one prompt per image (None: the file's ``prompts`` member).
        batch_size: images per CLIP forward.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        progress: show a progress bar (stderr).

    Returns:
        ``{clip_score, clip_score_std, num_samples, num_truncated_prompts, samples, clip {model,
        revision, weights_sha256, library}, provenance {clip_score {protocol, reference,
        feature_extractor, features, weights_sha256}}, settings {batch_size}}``; the std is over
        images (not a standard error).

    Raises:
        ClipError / ScoreError: bad samples, prompts or CLIP source, before any CLIP forward.
    """
    from .scoring import resolve_device  # scoring imports torch-fidelity; only for the device rule

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ClipError(f"--batch-size {batch_size}: must be an integer >= 1")
    device = resolve_device(device)
    images = open_npz_images(samples)  # header only
    n = images.num_images
    given = prompts is not None
    prompts = list(prompts) if given else read_sample_prompts(samples)
    if len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise ClipError(f"{samples} holds {n} images but {len(prompts)} prompts: give exactly one prompt (a string) "
                        "per image, in image order")
    model, processor, info = load_clip(clip_model, device)
    scores, truncated, start = [], 0, 0
    with tqdm(total=n, desc="CLIP score", unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in images.batches(batch_size):
            batch = as_rgb_nhwc(batch, "arr_0")  # (B, H, W, 3)
            s, t = clip_scores(batch, prompts[start:start + len(batch)], model, processor, device)
            scores.append(s)
            truncated += t
            start += len(batch)
            bar.update(len(batch))
    per_image = np.concatenate(scores)  # (N,)
    context = _context_length(model)
    source = "the samples' own prompts" + (" (given)" if given else " (the file's 'prompts' member)")
    extractor = f"{info['library']} {info['model']} @ {info['revision'] or 'local'}"
    return json.loads(json.dumps({
        "clip_score": float(per_image.mean()), "clip_score_std": float(per_image.std()),
        "num_samples": int(n), "num_truncated_prompts": int(truncated),
        "samples": str(Path(samples).resolve()), "clip": info,
        "provenance": {"clip_score": {
            "protocol": CLIP_DEFINITION, "reference": f"{source}, truncated to {context} tokens",
            "feature_extractor": extractor, "features": f"image_embeds / text_embeds ({model.config.projection_dim}-d)",
            "weights_sha256": info["weights_sha256"],
        }},
        "settings": {"batch_size": batch_size},
    }))
