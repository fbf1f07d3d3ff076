"""Image-caption data (or a prompt list) -> text-conditioned latent shards, through the teacher pipeline.

Captions are encoded with the teacher pipeline's own ``encode_prompt`` (its tokenizers, text
encoders, padding and ``max_sequence_length`` default), so training sees exactly the conditioning
inference computes; images are center-cropped and encoded with the pipeline's VAE into the latent
space its transformer reads (:func:`shd_diffusion.vae.pipeline_latents`). The output is the
``shd_latents_text/1`` folder that :class:`~shd_diffusion.data.TextLatentDataset` reads, written
shard by shard (:func:`shd_diffusion.latents.stream_text_latents`): atomic, resumable, shard ``i``
on rank ``i % world_size``, the empty prompt ``""`` encoded once.

Input layout (diffusers' imagefolder, as its training scripts read it)::

    data/metadata.jsonl     one JSON object per line: {"file_name": "0001.png", "text": "a red car"}
    data/0001.png           ... ("caption" is accepted in place of "text")

Prompts-only mode (:func:`generate_text_latents`): the teacher renders one image per prompt (its own
scheduler; steps, guidance and a per-prompt seed given), saved as such a folder, then extracted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .cli import BadInput
from .data.conditioning import Conditioning
from .data.image_folder import IMAGE_EXTENSIONS, center_crop_adm
from .data.items import DatasetError
from .fileio import atomic_path, atomic_write_text
from .latents import ExtractReport, TextShard, stream_text_latents
from .seeding import derive_seed
from .t2i_attention import T2I_SPECS
from .vae import latent_normalization, pipeline_latents

__all__ = [
    "METADATA_FILE",
    "PROMPT_ENCODERS",
    "CaptionRecord",
    "read_caption_folder",
    "read_prompts",
    "load_teacher_pipeline",
    "encode_prompts",
    "load_image",
    "extract_text_latents",
    "generate_caption_folder",
    "generate_text_latents",
]

METADATA_FILE = "metadata.jsonl"
GENERATION_FILE = "generation.json"  # the settings a prompts-only folder was rendered with
_CAPTION_COLUMNS = ("text", "caption")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CaptionRecord(NamedTuple):
    """One line of ``metadata.jsonl``."""

    file_name: str  # relative to the folder
    text: str


# ---- reading the inputs -------------------------------------------------------------------------


def _images_under(root: Path) -> set[str]:
    """Relative POSIX paths of the image files under ``root`` (any depth, hidden files skipped)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")}


def _parse_line(path: Path, number: int, line: str) -> CaptionRecord:
    """One metadata line as a record; every refusal names the file, the line and the fix."""
    where = f"{path} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where} is not JSON ({err.msg}); write one object per line: "
                           '{"file_name": "0001.png", "text": "a caption"}') from None
    if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
        raise DatasetError(f"{where} has no \"file_name\"; give the image path relative to {path.parent}")
    column = next((c for c in _CAPTION_COLUMNS if c in row), None)
    if column is None or not isinstance(row[column], str):
        raise DatasetError(f"{where} ({row['file_name']}) has no caption: add a \"text\" string "
                           "(an empty string \"\" trains the image unconditionally)")
    return CaptionRecord(Path(row["file_name"]).as_posix(), row[column])


def read_caption_folder(root: str | Path) -> list[CaptionRecord]:
    """The (image, caption) records of an imagefolder with ``metadata.jsonl``, in line order; checked.

    Args:
        root: the folder holding the images and ``metadata.jsonl``.

    Returns:
        One :class:`CaptionRecord` per line.

    Raises:
        DatasetError: naming the file / line and the fix, for a missing folder or metadata file, an
            empty folder, a bad line, a duplicate or missing image, or images without a caption line.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"caption folder {root} does not exist: pass the folder holding the images and {METADATA_FILE}")
    images = _images_under(root)
    meta = root / METADATA_FILE
    if not meta.is_file():
        what = f"{len(images)} images but no {METADATA_FILE}" if images else "no images and no " + METADATA_FILE
        raise DatasetError(f"{root} has {what}: write {meta} with one line per image, "
                           '{"file_name": "0001.png", "text": "a caption"}')
    records, seen = [], {}
    for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_line(meta, number, line)
        if record.file_name in seen:
            raise DatasetError(f"{meta} line {number} lists {record.file_name} again (first on line "
                               f"{seen[record.file_name]}): keep one caption line per image")
        if not (root / record.file_name).is_file():
            raise DatasetError(f"{meta} line {number} lists {record.file_name}, which is not in {root}: add the "
                               "image or remove the line")
        seen[record.file_name] = number
        records.append(record)
    if not records:
        raise DatasetError(f"{meta} lists no images: add one line per image, "
                           '{"file_name": "0001.png", "text": "a caption"}')
    uncaptioned = sorted(images - set(seen))
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        raise DatasetError(f"{len(uncaptioned)} images in {root} have no line in {METADATA_FILE} ({shown}): "
                           "add a caption line for each, or move them out of the folder")
    return records


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a text file, one per non-blank line (surrounding whitespace stripped).

    Raises:
        DatasetError: a missing file or one without prompts.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompts file {path} not found: give a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise DatasetError(f"prompts file {path} holds no prompts: write one prompt per line")
    return prompts


def load_image(path: str | Path, image_size: int) -> Tensor:
    """An image file as the VAE's input: RGB, ADM center crop to ``image_size``, (3, H, W) in [-1, 1].

    The same crop as the class-label extraction (:func:`~shd_diffusion.data.image_folder.center_crop_adm`).

    Raises:
        DatasetError: naming the file, when it cannot be decoded.
    """
    try:
        with Image.open(path) as img:
            image = img.convert("RGB")
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DatasetError(f"cannot read image {path}: {type(err).__name__}: {err}; replace or remove it") from err
    x = torch.from_numpy(np.array(center_crop_adm(image, image_size)))  # (H, W, 3) uint8
    return x.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]


# ---- the teacher pipeline's prompt encoding ------------------------------------------------------


@dataclass(frozen=True)
class PromptEncoder:
    """How one family's pipeline encodes prompts, mapped to :data:`~shd_diffusion.data.conditioning.COND_KEYS`."""

    family: str
    packed: bool  # the transformer reads 2 x 2 latent patches: the latent grid must be even
    encode: Callable[[Any, list[str], int], Conditioning]  # (pipe, prompts, max_sequence_length) -> (B, ...) dict


def _pixart(pipe: Any, prompts: list[str], length: int) -> Conditioning:
    from diffusers.utils import is_bs4_available, is_ftfy_available

    # clean_caption as PixArt's __call__ defaults (True), which the pipeline turns off itself (warning each
    # call) without bs4 and ftfy: decided here once, to the same effect.
    clean = is_bs4_available() and is_ftfy_available()
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=pipe._execution_device,
                                            clean_caption=clean, max_sequence_length=length)
    return {"prompt_embeds": embeds, "prompt_mask": mask.bool()}  # (B, L, D), (B, L)


def _sd3(pipe: Any, prompts: list[str], length: int) -> Conditioning:
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=pipe._execution_device,
                                              do_classifier_free_guidance=False, max_sequence_length=length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, 77 + L, D), (B, P)


def _flux(pipe: Any, prompts: list[str], length: int) -> Conditioning:
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=pipe._execution_device, max_sequence_length=length)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}  # (B, L, D), (B, P); FLUX takes no mask


def _qwen(pipe: Any, prompts: list[str], length: int) -> Conditioning:
    # Qwen-Image pads a batch to its longest prompt only: pad every prompt to ``length`` (mask False) so they stack.
    embeds, mask = pipe.encode_prompt(prompts, device=pipe._execution_device, max_sequence_length=length)
    b, l, d = embeds.shape  # (B, l, D), l <= length
    mask = torch.ones(b, l, dtype=torch.bool, device=embeds.device) if mask is None else mask.bool()  # None: all real
    padded = embeds.new_zeros(b, length, d)
    padded[:, :l] = embeds
    full = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
    full[:, :l] = mask
    return {"prompt_embeds": padded, "prompt_mask": full}  # (B, length, D), (B, length)


def _encoder(transformer_class: str, packed: bool, encode: Callable[[Any, list[str], int], Conditioning]) -> PromptEncoder:
    return PromptEncoder(T2I_SPECS[transformer_class].family, packed, encode)  # the family's name from the one table


PROMPT_ENCODERS: dict[str, PromptEncoder] = {  # transformer class (model_index.json) -> its pipeline's encoding
    name: _encoder(name, packed, encode) for name, packed, encode in (
        ("PixArtTransformer2DModel", False, _pixart),
        ("SD3Transformer2DModel", False, _sd3),
        ("FluxTransformer2DModel", True, _flux),
        ("QwenImageTransformer2DModel", True, _qwen),
    )
}


def _pipeline_identity(spec: str | Path) -> str:
    """Hub ids as given; local folders resolved (``./teacher`` and its absolute path are one pipeline)."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else str(spec)


def _prompt_encoder(pipe: Any) -> PromptEncoder:
    name = getattr(pipe, "_shd_transformer_class", None) or type(getattr(pipe, "transformer", None)).__name__
    if name not in PROMPT_ENCODERS:
        raise BadInput(f"pipeline {type(pipe).__name__} has transformer class {name}, which has no text-to-image "
                       f"family here; use a pipeline of {', '.join(PROMPT_ENCODERS)}")
    return PROMPT_ENCODERS[name]


def load_teacher_pipeline(spec: str | Path, *, transformer: bool = False, device: str | torch.device = "cpu",
                          dtype: str = "float32") -> Any:
    """The teacher's diffusers pipeline; without its transformer unless asked (encoding does not need it).

    Args:
        spec: Hub id or local pipeline folder (``model_index.json`` inside).
        transformer: also load the transformer (the prompts-only mode renders with it).
        device: where the pipeline runs.
        dtype: ``float32``, ``float16`` or ``bfloat16`` weights.

    Returns:
        The pipeline, eval mode, on ``device``; ``pipe._shd_spec`` records ``spec`` as given.

    Raises:
        BadInput: a pipeline that does not load, or whose transformer class has no family here.
    """
    from diffusers import DiffusionPipeline

    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    try:
        index = DiffusionPipeline.load_config(str(spec))
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"could not read the pipeline {str(spec)!r} ({reason}): pass a local diffusers pipeline folder "
                       "(with model_index.json) or a Hub id available offline") from None
    name = (index.get("transformer") or [None, None])[1]
    if name not in PROMPT_ENCODERS:
        raise BadInput(f"pipeline {str(spec)!r} has transformer class {name}, which has no text-to-image family here; "
                       f"use a pipeline of {', '.join(PROMPT_ENCODERS)}")
    kwargs = {} if transformer else {"transformer": None}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(spec), dtype=_DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInput(f"could not load the pipeline {str(spec)!r} ({reason}): check the folder or Hub id") from None
    pipe._shd_transformer_class, pipe._shd_spec = name, str(spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _default_length(pipe: Any) -> int:
    """The ``max_sequence_length`` default of the pipeline's own ``encode_prompt`` (PixArt-Sigma 300, FLUX 512...)."""
    return int(inspect.signature(type(pipe).encode_prompt).parameters["max_sequence_length"].default)


@torch.no_grad()
def encode_prompts(pipe: Any, prompts: Sequence[str], max_sequence_length: int | None = None) -> Conditioning:
    """Prompts -> conditioning with the pipeline's own ``encode_prompt``, on the CPU, in the encoder's dtype.

    Args:
        pipe: a pipeline from :func:`load_teacher_pipeline` (or any pipeline of a supported family).
        prompts: B prompts.
        max_sequence_length: the token length (None: the pipeline's ``encode_prompt`` default).

    Returns:
        ``prompt_embeds`` (B, L, D) and, by family, ``pooled_prompt_embeds`` (B, P) / ``prompt_mask`` (B, L) bool.
    """
    length = _default_length(pipe) if max_sequence_length is None else int(max_sequence_length)
    cond = _prompt_encoder(pipe).encode(pipe, list(prompts), length)
    return {k: v.detach().cpu().contiguous() for k, v in cond.items()}


# ---- caption folder -> shards --------------------------------------------------------------------


def _source_fingerprint(root: Path, records: Sequence[CaptionRecord]) -> str:
    """Hash of (file name, caption, file size) per record: another folder or edited captions cannot resume."""
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.file_name, r.text, (root / r.file_name).stat().st_size]).encode() + b"\n")
    return h.hexdigest()


def _components_fingerprint(pipe: Any) -> str:
    """Hash of the configs of the components that shape the conditioning and latents (not the weights)."""
    parts = {}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
        comp = getattr(pipe, name, None)
        if comp is None:
            continue
        cfg = getattr(comp, "config", None)
        if cfg is not None:
            parts[name] = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        else:  # a tokenizer: its vocabulary size and length limit
            parts[name] = [type(comp).__name__, len(comp), int(getattr(comp, "model_max_length", 0) or 0)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _check_size(pipe: Any, image_size: int) -> int:
    """The latent side of ``image_size`` pixels; refuse sizes the VAE or 2 x 2 packing cannot split."""
    factor = int(pipe.vae_scale_factor)
    packed = _prompt_encoder(pipe).packed
    step = factor * (2 if packed else 1)
    if image_size < step or image_size % step:
        raise BadInput(f"image_size {image_size} is not a multiple of {step} (the VAE downsamples by {factor}"
                       f"{' and the transformer packs 2 x 2 latents' if packed else ''}): use e.g. "
                       f"{max(step, image_size // step * step)}")
    return image_size // factor


def extract_text_latents(
    data: str | Path,
    out: str | Path,
    pipeline: str | Path | Any,
    *,
    image_size: int = 512,
    batch_size: int = 8,
    text_batch_size: int = 1,
    shard_size: int = 10_000,
    dtype: str = "float16",
    pipeline_dtype: str = "float32",
    max_sequence_length: int | None = None,
    both_flips: bool = False,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    max_shards: int | None = None,
    progress: bool = True,
) -> ExtractReport:
    """Encode an image-caption folder into text-conditioned latent shards with the teacher's pipeline.

    Resumable (finished shards are skipped; a changed folder, captions, pipeline or setting is refused
    before anything is encoded) and multi-process (shard ``i`` on rank ``i % world_size``; with several
    ranks, rank 0 calls :func:`~shd_diffusion.latents.finish_text_latents` after a barrier). The captions
    are checked before the pipeline loads; the pipeline (without its transformer) loads before the
    resume check, since the plan records its component configs and latent normalisation.

    Args:
        data: imagefolder with ``metadata.jsonl`` (:func:`read_caption_folder`).
        out: the output folder.
        pipeline: Hub id or local pipeline folder, or a pipeline from :func:`load_teacher_pipeline`.
        image_size: square ADM center-crop size in pixels.
        batch_size: images per VAE forward.
        text_batch_size: captions per ``encode_prompt`` call; 1 (default) makes each caption's embedding
            bitwise what the pipeline computes for that prompt alone, as at inference.
        shard_size: samples per shard.
        dtype: stored latent dtype (``float16`` or ``float32``); embeddings keep the encoder's dtype.
        pipeline_dtype: weight dtype when ``pipeline`` is loaded here.
        max_sequence_length: caption tokens (None: the pipeline's ``encode_prompt`` default).
        both_flips: also store the latents of the mirrored images.
        device: where the pipeline runs.
        rank, world_size: this process and the process count.
        max_shards: write at most this many of this rank's shards in this call.
        progress: show a progress bar.

    Returns:
        The :class:`~shd_diffusion.latents.ExtractReport`.

    Raises:
        DatasetError / BadInput: bad folder or captions, unloadable pipeline, an image size the
            latent grid cannot take, or ``out`` holding another extraction.
    """
    if min(image_size, batch_size, text_batch_size, shard_size) < 1:
        raise ValueError("image_size, batch_size, text_batch_size and shard_size must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype {dtype!r} is not float16 or float32")
    root = Path(data)
    records = read_caption_folder(root)
    pipe = pipeline if not isinstance(pipeline, (str, Path)) else None
    spec = getattr(pipe, "_shd_spec", None) if pipe is not None else str(pipeline)
    if spec is None:
        raise ValueError("a pipeline object passed in must come from load_teacher_pipeline (it records its id)")
    if pipe is None:  # the plan names the pipeline's settings, so load it (without the transformer) first
        pipe = load_teacher_pipeline(spec, device=device, dtype=pipeline_dtype)
    length = _default_length(pipe) if max_sequence_length is None else int(max_sequence_length)
    _check_size(pipe, image_size)
    plan = {
        "source": f"{_pipeline_identity(spec)} on {root.resolve()}",
        "source_sha256": _source_fingerprint(root, records),
        "pipeline": _pipeline_identity(spec),
        "pipeline_class": type(pipe).__name__,
        "family": _prompt_encoder(pipe).family,
        "components_sha256": _components_fingerprint(pipe),
        "encoder_dtype": str(pipe.text_encoder.dtype if getattr(pipe, "text_encoder", None) is not None
                             else pipeline_dtype).removeprefix("torch."),
        "max_sequence_length": length,
        "latent_normalization": latent_normalization(pipe.vae),
        "encoding": "latent_dist.mean",
        "image_size": image_size,
        "scale_factor": latent_normalization(pipe.vae).get("scale_factor", 1.0),
        "both_flips": both_flips,
        "dtype": dtype,
    }
    bar = _progress(len(records), progress, rank)

    def encode(rows: range) -> TextShard:
        chunk = [records[i] for i in rows]
        latents, flips = [], []
        for start in range(0, len(chunk), batch_size):
            x = torch.stack([load_image(root / r.file_name, image_size) for r in chunk[start:start + batch_size]])
            latents.append(pipeline_latents(pipe.vae, x).cpu().to(_DTYPES[dtype]))  # (b, C, h, w)
            if both_flips:
                flips.append(pipeline_latents(pipe.vae, x.flip(-1)).cpu().to(_DTYPES[dtype]))
            bar.update(len(x))
        conds = [encode_prompts(pipe, [r.text for r in chunk[s:s + text_batch_size]], length)
                 for s in range(0, len(chunk), text_batch_size)]
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}  # each (n, ...)
        return TextShard(torch.cat(latents), cond, torch.cat(flips) if both_flips else None)

    def empty() -> Conditioning:
        return {k: v[0] for k, v in encode_prompts(pipe, [""], length).items()}  # one sample's shapes

    try:
        return stream_text_latents(out, plan, encode, empty, num_images=len(records), shard_size=shard_size,
                                   rank=rank, world_size=world_size, max_shards=max_shards)
    finally:
        bar.close()


def _progress(total: int, enabled: bool, rank: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=f"text latents (rank {rank})", disable=not enabled)


# ---- prompts-only mode: the teacher renders the images ------------------------------------------


def _image_name(index: int) -> str:
    return f"{index:06d}.png"


def generate_caption_folder(
    prompts: str | Path | Sequence[str],
    folder: str | Path,
    pipeline: str | Path | Any,
    *,
    image_size: int = 512,
    num_inference_steps: int = 28,
    guidance_scale: float = 4.5,
    seed: int = 0,
    max_sequence_length: int | None = None,
    pipeline_dtype: str = "float32",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[int]:
    """Render one image per prompt with the teacher into an imagefolder with ``metadata.jsonl``; resumable.

    Image ``i`` (``{i:06d}.png``) is drawn from seed ``derive_seed("t2i-prompts", seed, i)`` on a CPU
    generator, so it does not depend on the device, batch or process count; rank ``r`` renders the
    images ``i % world_size == r`` that do not exist yet. Rank 0 writes ``metadata.jsonl`` and
    ``generation.json`` (the settings); a rerun with other prompts or settings is refused.

    Args:
        prompts: a prompts file (one per line) or the prompts.
        folder: the image folder (created).
        pipeline: Hub id or local folder, or a pipeline loaded with the transformer.
        image_size: square image side in pixels.
        num_inference_steps, guidance_scale: passed to the pipeline (its own scheduler).
        seed: the base seed of the per-prompt seeds.
        max_sequence_length: passed to the pipeline when given.
        pipeline_dtype, device: how the pipeline is loaded here.
        rank, world_size: this process and the process count.
        progress: show a progress bar.

    Returns:
        The indices of the images this call rendered.

    Raises:
        DatasetError: an empty prompts file, or a folder rendered with other prompts or settings.
    """
    prompts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
    if not prompts:
        raise DatasetError("no prompts given: pass a prompts file with one prompt per line")
    folder = Path(folder)
    spec = str(pipeline) if isinstance(pipeline, (str, Path)) else getattr(pipeline, "_shd_spec", type(pipeline).__name__)
    settings = {"pipeline": _pipeline_identity(spec), "image_size": image_size, "num_inference_steps": num_inference_steps,
                "guidance_scale": guidance_scale, "seed": seed, "max_sequence_length": max_sequence_length,
                "seeds": "derive_seed('t2i-prompts', seed, index), CPU generator"}
    lines = "".join(json.dumps({"file_name": _image_name(i), "text": p}) + "\n" for i, p in enumerate(prompts))
    meta, gen = folder / METADATA_FILE, folder / GENERATION_FILE
    if meta.exists() and meta.read_text(encoding="utf-8") != lines:
        raise DatasetError(f"{meta} lists other prompts than these: render into a new folder, or delete it to restart")
    if gen.exists() and json.loads(gen.read_text(encoding="utf-8")) != settings:
        raise DatasetError(f"{folder} was rendered with other settings ({gen}): render into a new folder, or delete it")
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        atomic_write_text(gen, json.dumps(settings, indent=1))
        atomic_write_text(meta, lines)
    todo = [i for i in range(rank, len(prompts), world_size) if not (folder / _image_name(i)).exists()]
    if not todo:
        return []
    pipe = pipeline if not isinstance(pipeline, (str, Path)) else load_teacher_pipeline(
        pipeline, transformer=True, device=device, dtype=pipeline_dtype)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    from tqdm.auto import tqdm

    for i in tqdm(todo, unit="img", desc=f"teacher images (rank {rank})", disable=not progress):
        generator = torch.Generator("cpu").manual_seed(derive_seed("t2i-prompts", seed, i))
        image = pipe(prompts[i], height=image_size, width=image_size, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, generator=generator, output_type="pil", **extra).images[0]
        with atomic_path(folder / _image_name(i)) as tmp:
            image.save(tmp, format="PNG")
    return todo


def generate_text_latents(
    prompts: str | Path | Sequence[str],
    out: str | Path,
    pipeline: str | Path | Any,
    *,
    images_dir: str | Path | None = None,
    image_size: int = 512,
    num_inference_steps: int = 28,
    guidance_scale: float = 4.5,
    seed: int = 0,
    max_sequence_length: int | None = None,
    shard_size: int = 10_000,
    batch_size: int = 8,
    dtype: str = "float16",
    pipeline_dtype: str = "float32",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> ExtractReport:
    """Prompts-only data: the teacher renders one image per prompt, then they are extracted with their prompts.

    :func:`generate_caption_folder` into ``images_dir`` (default: ``<out>_images`` beside ``out``), a barrier,
    then :func:`extract_text_latents` of that folder. Both halves resume. With several processes pass
    ``barrier`` (e.g. accelerate's ``wait_for_everyone``); rank 0 then finishes the index after another.

    Args:
        prompts: a prompts file (one per line) or the prompts.
        out: the latent folder.
        pipeline: Hub id or local pipeline folder (loaded with its transformer for rendering), or a
            pipeline from ``load_teacher_pipeline(..., transformer=True)``.
        images_dir: where the rendered images and their ``metadata.jsonl`` go.
        image_size, num_inference_steps, guidance_scale, seed, max_sequence_length: rendering (and encoding) settings.
        shard_size, batch_size, dtype, pipeline_dtype, device, rank, world_size, progress: as in
            :func:`extract_text_latents`.
        barrier: called between rendering and extraction when ``world_size > 1`` (required then).

    Returns:
        The extraction's report.
    """
    if world_size > 1 and barrier is None:
        raise ValueError("world_size > 1 needs a barrier between rendering and extraction (accelerate: wait_for_everyone)")
    out = Path(out)
    images = Path(images_dir) if images_dir is not None else out.with_name(out.name + "_images")
    pipe = pipeline  # loaded once, with its transformer, for both halves
    if isinstance(pipeline, (str, Path)):
        pipe = load_teacher_pipeline(pipeline, transformer=True, device=device, dtype=pipeline_dtype)
    generate_caption_folder(prompts, images, pipe, image_size=image_size, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, seed=seed, max_sequence_length=max_sequence_length,
                            rank=rank, world_size=world_size, progress=progress)
    if barrier is not None:
        barrier()
    return extract_text_latents(images, out, pipe, image_size=image_size, batch_size=batch_size, shard_size=shard_size,
                                dtype=dtype, max_sequence_length=max_sequence_length, device=device, rank=rank,
                                world_size=world_size, progress=progress)
