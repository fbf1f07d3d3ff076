"""Latent extraction: encode an image folder with a VAE into resumable safetensors shards.

Layout of an output folder (read back by :class:`shd_diffusion.data.LatentDataset`)::

    out/shard_00000.safetensors   images [0, S) of the sorted ImageFolderDataset
    out/shard_00001.safetensors   images [S, 2S) ...
    out/index.json                written last, once every shard exists

A shard holds ``latents`` (n, C, h, w), ``labels`` (n,) int64 and, with ``both_flips``,
``latents_flip`` (the latents of the mirrored images). Its safetensors metadata carries the full
extraction plan (VAE, sizes, scale factor, dataset fingerprint...), so a shard describes itself.

Encoding uses the posterior mean ``latent_dist.mean * scale_factor``, not a sample: the result
is deterministic (a re-extracted shard is identical), and the SD-VAE posterior std is small
enough that one frozen sample (what DiT's feature extraction stores) only adds fixed noise.

Text-conditioned folders (format ``shd_latents_text/1``, read by
:class:`shd_diffusion.data.TextLatentDataset`) come from :func:`write_text_latents`: each shard
holds ``latents`` (and ``latents_flip``) and ``cond.<key>`` (n, ...) per conditioning key, and
``empty_prompt.safetensors`` holds the empty prompt's conditioning once. They resume the same way.
:func:`stream_text_latents` writes the same format one shard at a time (the caller encodes a
shard's rows on demand, so nothing holds the whole dataset), rank ``i % world_size`` owning shard
``i``; :func:`finish_text_latents` writes its index on rank 0 after a barrier.

Resuming: shards are written through :func:`shd_diffusion.fileio.atomic_path` (temporary name,
fsync, rename), so a shard file exists only when complete. A rerun skips existing shards whose
plan matches and refuses ones whose plan differs (naming the differing fields). ``out`` is
created only when the first shard is written, so a refusal before that (bad image folder, an
unreadable image in the first shard, a VAE that does not load) leaves nothing behind. With several
processes, shard ``i`` belongs to rank ``i % world_size``; rank 0 writes the index after a
barrier (the command: ``scripts/extract_latents.py``, :mod:`shd_diffusion.commands.extract_latents`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .data import LATENT_FORMAT, LATENT_INDEX, DatasetError, ImageFolderDataset
from .data.conditioning import Conditioning, check_conditioning, stack_conditioning
from .data.items import content_digest
from .data.text_latent_folder import COND_PREFIX, EMPTY_PROMPT_FILE, LATENT_TEXT_FORMAT, cond_spec
from .seeding import derive_seed
from .fileio import atomic_path, atomic_write_text, os_errors_of_safetensors, remove_stale_temps
from .vae import SD_VAE_SCALE_FACTOR, load_vae, resolve_vae_spec

__all__ = [
    "ExtractReport",
    "extract_latents",
    "encode_latents",
    "shard_name",
    "missing_shards",
    "write_index",
    "write_text_latents",
    "write_synthetic_text_latents",
    "TextShard",
    "stream_text_latents",
    "finish_text_latents",
]

_PLAN_KEY = "shd_latents_plan"
_DTYPES = {"float16": torch.float16, "float32": torch.float32}
LATENT_CHANNELS = 4  # SD-VAE latents, the input of the latent DiT / MDTv2 models; other VAEs are refused


@dataclass
class ExtractReport:
    """What one :func:`extract_latents` call did on its rank (or one :func:`write_text_latents` call)."""

    num_shards: int  # shards of the whole extraction (all ranks)
    written: list[int] = field(default_factory=list)  # shard ids encoded in this call
    skipped: list[int] = field(default_factory=list)  # this rank's shards that were already complete
    pending: list[int] = field(default_factory=list)  # this rank's shards left for a later call (max_shards)
    index: dict[str, Any] | None = None  # the written index.json, when this call finalised the folder


def shard_name(shard: int) -> str:
    """File name of shard ``shard``."""
    return f"shard_{shard:05d}.safetensors"


@torch.no_grad()
def encode_latents(
    vae: nn.Module, x: torch.Tensor, scale_factor: float = SD_VAE_SCALE_FACTOR
) -> torch.Tensor:
    """Scaled posterior-mean latents of images.

    Args:
        vae: an ``AutoencoderKL``.
        x: (B, 3, H, W) images in [-1, 1].
        scale_factor: multiplier applied to the latents.

    Returns:
        (B, C, H/f, W/f) latents, f the VAE's downsampling factor.
    """
    return vae.encode(x).latent_dist.mean * scale_factor


def _fingerprint(dataset: ImageFolderDataset) -> str:
    """Hash of the (label, relative path) list: a different image folder cannot resume an extraction."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        h.update(f"{int(dataset.labels[i])}\t{dataset.relative_path(i)}\n".encode())
    return h.hexdigest()


def _vae_identity(vae: str | Path) -> str:
    """Hub ids stay as given; local folders are resolved so ``./vae`` and its absolute path match."""
    path = Path(vae)
    return str(path.resolve()) if path.exists() else str(vae)


def _read_plan(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise DatasetError(f"cannot read latent shard {path}: {err}; delete it and resume") from err
    if _PLAN_KEY not in meta:
        raise DatasetError(
            f"{path} was not written by extract_latents or write_text_latents (no plan metadata); move it "
            "out of the folder"
        )
    return json.loads(meta[_PLAN_KEY])


def _check_plan(path: Path, found: dict[str, Any], plan: dict[str, Any]) -> None:
    """Raise naming the differing fields when an existing shard belongs to another extraction."""
    keys = sorted((set(found) | set(plan)) - {"shard", "count"})  # per-shard fields differ by design
    diff = [k for k in keys if found.get(k) != plan.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {found.get(k)!r} in the shard, {plan.get(k)!r} now" for k in diff[:4])
        raise DatasetError(
            f"{path} belongs to a different extraction ({shown}). Use a new --out folder, or delete "
            "the old shards to re-extract"
        )


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of an interrupted write of ``path`` (only its owning rank calls this)."""
    remove_stale_temps(path)  # fileio's temporary names
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # this module's older name


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so that ``path`` exists only when complete (temp + fsync + rename)."""
    from safetensors.torch import save_file

    with os_errors_of_safetensors(path), atomic_path(path) as tmp:  # 0644 like every output, a full disk as OSError
        save_file(tensors, str(tmp), metadata=metadata)


def _encode_shard(
    dataset: ImageFolderDataset,
    first: int,
    count: int,
    vae: nn.Module,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    dtype: torch.dtype,
    scale_factor: float,
    both_flips: bool,
    bar: Any,
) -> dict[str, torch.Tensor]:
    """Latents (and labels, and mirrored latents) of images ``[first, first + count)``, on the CPU."""
    loader = DataLoader(
        Subset(dataset, range(first, first + count)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    latents, flipped, labels = [], [], []
    for x, y in loader:  # x (B, 3, H, W) un-flipped (bare indices), y (B,)
        x = x.to(device, non_blocking=True)
        latents.append(encode_latents(vae, x, scale_factor).to("cpu", dtype))  # (B, C, h, w)
        if both_flips:
            # Mirroring the cropped tensor is exactly what the dataset does for a flipped item.
            flipped.append(encode_latents(vae, x.flip(-1), scale_factor).to("cpu", dtype))
        labels.append(y)
        bar.update(len(y))
    tensors = {"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels).to(torch.int64)}
    if both_flips:
        tensors["latents_flip"] = torch.cat(flipped).contiguous()
    return tensors


def _check_extract_args(dtype: str, shard_size: int, batch_size: int, rank: int, world_size: int) -> None:
    """Refuse arguments that are wrong on their own, before any image or VAE is touched."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size ({shard_size}) and batch_size ({batch_size}) must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _extraction_plan(dataset: ImageFolderDataset, vae_id: str, *, scale_factor: float, image_size: int,
                     both_flips: bool, dtype: str, shard_size: int) -> dict[str, Any]:
    """Everything that must agree between shards of one extraction (stored in each shard)."""
    n = len(dataset)
    return {
        "format": LATENT_FORMAT,
        "vae": vae_id,
        "encoding": "latent_dist.mean",
        "scale_factor": scale_factor,
        "image_size": image_size,
        "both_flips": both_flips,
        "dtype": dtype,
        "num_images": n,
        "shard_size": shard_size,
        "num_shards": math.ceil(n / shard_size),
        "classes": dataset.classes,
        "files_sha256": _fingerprint(dataset),
    }


def _shards_to_encode(out: Path, plan: dict[str, Any], rank: int, world_size: int,
                      max_shards: int | None, report: ExtractReport) -> list[int]:
    """This rank's missing shards (at most ``max_shards``); existing ones must match ``plan``.

    Records the skipped and the postponed shards in ``report``.
    """
    todo = []
    for shard in range(rank, plan["num_shards"], world_size):
        path = out / shard_name(shard)
        if path.exists():
            _check_plan(path, _read_plan(path), plan)
            report.skipped.append(shard)
        else:
            todo.append(shard)
    if max_shards is not None:
        todo, report.pending = todo[:max_shards], todo[max_shards:]
    return todo


def _write_shards(dataset: ImageFolderDataset, out: Path, plan: dict[str, Any], todo: list[int], vae: nn.Module, *,
                  batch_size: int, num_workers: int, device: torch.device, progress: bool, rank: int,
                  report: ExtractReport) -> None:
    """Encode and atomically write each shard of ``todo``, recording them in ``report.written``."""
    from tqdm.auto import tqdm

    n, shard_size = len(dataset), plan["shard_size"]
    total = sum(min(shard_size, n - s * shard_size) for s in todo)
    with tqdm(total=total, unit="img", desc=f"latents (rank {rank})", disable=not progress) as bar:
        for shard in todo:
            first = shard * shard_size
            count = min(shard_size, n - first)
            tensors = _encode_shard(
                dataset, first, count, vae, batch_size=batch_size, num_workers=num_workers, device=device,
                dtype=_DTYPES[plan["dtype"]], scale_factor=plan["scale_factor"], both_flips=plan["both_flips"], bar=bar,
            )
            meta = {_PLAN_KEY: json.dumps({**plan, "shard": shard, "count": count})}
            out.mkdir(parents=True, exist_ok=True)  # only now: a refusal before this leaves no trace
            _remove_stale_temps(out / shard_name(shard))
            _write_atomic(out / shard_name(shard), tensors, meta)
            report.written.append(shard)


def extract_latents(
    data: str | Path,
    out: str | Path,
    vae: str | Path | nn.Module,
    *,
    vae_id: str | None = None,
    image_size: int = 256,
    batch_size: int = 64,
    shard_size: int = 10_000,
    both_flips: bool = False,
    dtype: str = "float16",
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 4,
    max_shards: int | None = None,
    progress: bool = True,
) -> ExtractReport:
    """Encode this rank's missing shards of an image folder; resumable and idempotent.

    With ``world_size == 1`` the call also writes ``index.json`` once all shards exist. With
    several ranks, call :func:`write_index` on rank 0 after a barrier.

    Args:
        data: ImageNet-style folder (see :class:`~shd_diffusion.data.ImageFolderDataset`).
        out: output folder (created).
        vae: hub id, local ``save_pretrained`` folder, or a loaded ``AutoencoderKL``.
        vae_id: name recorded in the index; required when ``vae`` is a module.
        image_size: ADM center-crop size of the images.
        batch_size: images per VAE forward.
        shard_size: images per shard (the last shard may be smaller).
        both_flips: also store the latents of the mirrored images (for flip augmentation).
        dtype: stored dtype, ``"float16"`` (half the disk) or ``"float32"``.
        scale_factor: latent multiplier (:data:`~shd_diffusion.vae.SD_VAE_SCALE_FACTOR` for the SD VAEs).
        device: where the VAE runs.
        rank: this process's rank; it owns shards ``rank, rank + world_size, ...``.
        world_size: number of processes.
        num_workers: image-decoding DataLoader workers.
        max_shards: encode at most this many shards in this call (None = all).
        progress: show a tqdm bar.

    Returns:
        An :class:`ExtractReport`.

    Raises:
        DatasetError: bad image folder or unreadable image (named), or existing shards from a
            different extraction in ``out``. BadInput: a VAE that does not load, or whose
            latents do not have :data:`LATENT_CHANNELS` channels.
    """
    _check_extract_args(dtype, shard_size, batch_size, rank, world_size)
    if isinstance(vae, nn.Module):
        if vae_id is None:
            raise ValueError("vae_id is required when vae is a loaded module (it is recorded in the index)")
    else:
        vae = resolve_vae_spec(vae, LATENT_CHANNELS)  # "auto" -> the default VAE; "none" is refused here
        vae_id = vae_id or _vae_identity(vae)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder for latent shards: choose another output folder (--out)")
    dataset = ImageFolderDataset(data, image_size=image_size, hflip=False)
    plan = _extraction_plan(dataset, vae_id, scale_factor=scale_factor, image_size=image_size,
                            both_flips=both_flips, dtype=dtype, shard_size=shard_size)
    report = ExtractReport(num_shards=plan["num_shards"])
    todo = _shards_to_encode(out, plan, rank, world_size, max_shards, report)

    if todo:
        device = torch.device(device)
        model = vae.to(device).eval() if isinstance(vae, nn.Module) else load_vae(vae, LATENT_CHANNELS, device)
        _write_shards(dataset, out, plan, todo, model, batch_size=batch_size, num_workers=num_workers,
                      device=device, progress=progress, rank=rank, report=report)
    if world_size == 1 and not report.pending:
        report.index = write_index(out)
    return report


def missing_shards(out: str | Path, num_shards: int) -> list[int]:
    """Shard ids in ``range(num_shards)`` whose file does not exist yet in ``out``."""
    return [i for i in range(num_shards) if not (Path(out) / shard_name(i)).exists()]


def write_index(out: str | Path) -> dict[str, Any]:
    """Check that every shard of the extraction in ``out`` exists and agrees; write ``index.json``.

    Args:
        out: the extraction folder.

    Returns:
        The index that was written.

    Raises:
        DatasetError: no shards, missing shards (listed), or shards of different extractions.
    """
    from safetensors import safe_open

    out = Path(out)
    first = out / shard_name(0)
    existing = sorted(out.glob("shard_*.safetensors"))
    if not existing:
        raise DatasetError(f"no latent shards in {out}: run scripts/extract_latents.py first")
    plan = _read_plan(first if first.exists() else existing[0])
    missing = missing_shards(out, plan["num_shards"])
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DatasetError(
            f"{out}: {len(missing)} of {plan['num_shards']} shards missing ({shown}); rerun the same "
            "extract_latents command to finish them"
        )
    shards, latent_shape = [], None
    for i in range(plan["num_shards"]):
        path = out / shard_name(i)
        found = _read_plan(path)
        _check_plan(path, found, plan)
        if found["shard"] != i:
            raise DatasetError(f"{path} holds shard {found['shard']}, not {i}; delete it and resume")
        with safe_open(str(path), framework="pt") as f:
            shape = list(f.get_slice("latents").get_shape())  # (n, C, h, w)
        if shape[0] != found["count"] or (latent_shape is not None and shape[1:] != latent_shape):
            raise DatasetError(
                f"{path}: latents of shape {shape} do not match the other shards; delete it and resume"
            )
        latent_shape = shape[1:]
        shards.append({"name": shard_name(i), "count": found["count"]})
    index = {
        "format": LATENT_FORMAT,
        "vae": plan["vae"],
        "encoding": plan["encoding"],
        "scale_factor": plan["scale_factor"],
        "image_size": plan["image_size"],
        "both_flips": plan["both_flips"],
        "dtype": plan["dtype"],
        "num_images": plan["num_images"],
        "latent_shape": latent_shape,
        "num_classes": len(plan["classes"]),
        "classes": plan["classes"],
        "files_sha256": plan["files_sha256"],
        "shards": shards,
    }
    atomic_write_text(out / LATENT_INDEX, json.dumps(index, indent=1))
    return index


# ---- text-conditioned folders ----------------------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor of any dtype (bf16 and bool included), for content hashing."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # (numel * itemsize,)


def _as_batch(
    cond: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]], n: int, out: Path
) -> Conditioning:
    """Conditioning as a dict of (n, ...) tensors, from per-sample dicts or an already stacked dict."""
    where = f"conditioning for {out}"
    batch = dict(cond) if isinstance(cond, Mapping) else stack_conditioning(cond, where)
    for key, value in batch.items():
        if value.ndim == 0 or value.shape[0] != n:
            raise DatasetError(f"{where}: {key} holds {tuple(value.shape)}, expected {n} samples (one per latent)")
    return batch


def _text_plan(latents: torch.Tensor, flips: torch.Tensor | None, cond: Conditioning, empty: Conditioning, *,
               source: str, image_size: int, scale_factor: float, shard_size: int) -> dict[str, Any]:
    """Everything the shards of one text-conditioned folder must agree on, with a hash of the data."""
    parts = [_tensor_bytes(latents), b"" if flips is None else _tensor_bytes(flips)]
    for key in sorted(cond):
        parts += [key.encode(), _tensor_bytes(cond[key]), _tensor_bytes(empty[key])]
    n = latents.shape[0]
    return {
        "format": LATENT_TEXT_FORMAT,
        "source": source,
        "image_size": image_size,
        "scale_factor": scale_factor,
        "both_flips": flips is not None,
        "dtype": str(latents.dtype).removeprefix("torch."),
        "num_images": n,
        "latent_shape": list(latents.shape[1:]),
        "shard_size": shard_size,
        "num_shards": math.ceil(n / shard_size),
        "conditioning": cond_spec({k: v[0] for k, v in cond.items()}),
        "data_sha256": content_digest(parts),
    }


def _check_text_latents(out: Path, latents: torch.Tensor, flips: torch.Tensor | None, shard_size: int) -> None:
    """Refuse latents (and flips, shard size) that cannot make a folder, naming ``out`` and the fix."""
    if latents.ndim != 4 or latents.shape[0] == 0 or str(latents.dtype).removeprefix("torch.") not in _DTYPES:
        raise DatasetError(
            f"latents for {out}: {tuple(latents.shape)} {latents.dtype}; give (N, C, h, w) float16/float32, N >= 1"
        )
    if flips is not None and (flips.shape != latents.shape or flips.dtype != latents.dtype):
        raise DatasetError(f"latents_flip for {out}: {tuple(flips.shape)} {flips.dtype}; must match latents")
    if shard_size < 1:
        raise ValueError(f"shard_size ({shard_size}) must be >= 1")


def _check_text_conditioning(out: Path, cond: Conditioning, empty: Mapping[str, torch.Tensor]) -> None:
    """Refuse unknown keys, bad dims or masks, and an empty prompt unlike the samples, naming ``out``."""
    check_conditioning({k: v[0] for k, v in cond.items()}, f"conditioning for {out}")
    samples, empties = cond_spec({k: v[0] for k, v in cond.items()}), cond_spec(dict(empty))
    if samples != empties:
        raise DatasetError(
            f"empty-prompt conditioning for {out} is {empties}, the samples' is {samples}: pass empty= the "
            "empty prompt '' encoded with the same encoders, padding and dtype (every key, one sample's shape)"
        )


def _write_text_shard(out: Path, shard: int, plan: dict[str, Any], latents: torch.Tensor,
                      flips: torch.Tensor | None, cond: Conditioning) -> None:
    """Atomically write shard ``shard`` (its slice of every tensor) with the plan as metadata."""
    first = shard * plan["shard_size"]
    rows = slice(first, min(first + plan["shard_size"], plan["num_images"]))
    tensors = {"latents": latents[rows].contiguous()}
    if flips is not None:
        tensors["latents_flip"] = flips[rows].contiguous()
    tensors.update({COND_PREFIX + k: v[rows].contiguous() for k, v in cond.items()})  # each (n, ...)
    meta = {_PLAN_KEY: json.dumps({**plan, "shard": shard, "count": rows.stop - rows.start})}
    _remove_stale_temps(out / shard_name(shard))
    _write_atomic(out / shard_name(shard), tensors, meta)


def _write_text_index(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """Check every shard and the empty prompt belong to ``plan``; write ``index.json`` last."""
    shards = []
    for shard in range(plan["num_shards"]):
        found = _read_plan(out / shard_name(shard))
        _check_plan(out / shard_name(shard), found, plan)
        shards.append({"name": shard_name(shard), "count": found["count"]})
    _check_plan(out / EMPTY_PROMPT_FILE, _read_plan(out / EMPTY_PROMPT_FILE), plan)
    index = {**{k: v for k, v in plan.items() if k not in ("shard_size", "num_shards")}, "shards": shards}
    atomic_write_text(out / LATENT_INDEX, json.dumps(index, indent=1))
    return index


def write_text_latents(
    out: str | Path,
    latents: torch.Tensor,
    cond: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
    empty: Mapping[str, torch.Tensor],
    *,
    source: str,
    image_size: int,
    scale_factor: float = SD_VAE_SCALE_FACTOR,
    shard_size: int = 10_000,
    latents_flip: torch.Tensor | None = None,
    max_shards: int | None = None,
) -> ExtractReport:
    """Write a text-conditioned latent folder; resumable and idempotent like :func:`extract_latents`.

    Every file goes through :func:`~shd_diffusion.fileio.atomic_path`; existing shards whose plan
    (which includes a hash of all the data) matches are skipped, others are refused naming the
    differing fields. ``index.json`` is written last, once every shard exists.

    Args:
        out: the folder (created).
        latents: (N, C, h, w) float16/float32 scaled VAE latents.
        cond: per-sample dicts (``prompt_embeds`` (L, D), ``pooled_prompt_embeds`` (P,),
            ``prompt_mask`` (L,) bool) or one dict of (N, ...) tensors; stored in their dtypes.
        empty: the empty prompt's conditioning, same keys and per-sample shapes (CFG dropout).
        source: what produced the data (encoder ids, caption file), recorded in the index.
        image_size: pixel size the latents were encoded at.
        scale_factor: latent multiplier the VAE used.
        shard_size: samples per shard (the last may be smaller).
        latents_flip: (N, C, h, w) latents of the mirrored images, or None.
        max_shards: write at most this many missing shards in this call (None = all).

    Returns:
        An :class:`ExtractReport`; ``index`` is set once the folder is complete.

    Raises:
        DatasetError: unknown keys, samples of different shapes, an empty prompt that does not
            match the samples, or existing shards of other data in ``out``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder for latent shards: choose another output folder")
    _check_text_latents(out, latents, latents_flip, shard_size)
    batch = _as_batch(cond, latents.shape[0], out)
    _check_text_conditioning(out, batch, empty)
    empty = {k: empty[k] for k in sorted(batch)}
    plan = _text_plan(latents, latents_flip, batch, empty, source=source, image_size=image_size,
                      scale_factor=scale_factor, shard_size=shard_size)
    report = ExtractReport(num_shards=plan["num_shards"])
    todo = _shards_to_encode(out, plan, 0, 1, max_shards, report)
    out.mkdir(parents=True, exist_ok=True)
    empty_path = out / EMPTY_PROMPT_FILE
    if empty_path.exists():
        _check_plan(empty_path, _read_plan(empty_path), plan)
    else:
        _remove_stale_temps(empty_path)
        meta = {_PLAN_KEY: json.dumps({**plan, "shard": None, "count": 1})}
        _write_atomic(empty_path, {COND_PREFIX + k: v.contiguous() for k, v in empty.items()}, meta)
    for shard in todo:
        _write_text_shard(out, shard, plan, latents, latents_flip, batch)
        report.written.append(shard)
    if not report.pending:
        report.index = _write_text_index(out, plan)
    return report


def write_synthetic_text_latents(
    out: str | Path,
    *,
    num_images: int = 10,
    latent_shape: tuple[int, int, int] = (4, 8, 8),
    seq_len: int = 6,
    dim: int = 8,
    pooled_dim: int | None = 4,
    with_mask: bool = True,
    both_flips: bool = False,
    cond_dtype: torch.dtype = torch.float32,
    shard_size: int = 4,
    seed: int = 0,
    max_shards: int | None = None,
) -> ExtractReport:
    """A small random text-conditioned folder (tests, smoke runs): a pure function of its arguments.

    Latents and embeddings are standard normal; sample i's mask keeps its first ``1 + (i % seq_len)``
    tokens and its padded embedding rows are zero (as padded prompts are masked); the empty prompt
    keeps one token.

    Args:
        out: the folder.
        num_images, latent_shape: N and (C, h, w).
        seq_len, dim, pooled_dim: L, D and P (None: no ``pooled_prompt_embeds``).
        with_mask: store ``prompt_mask``.
        both_flips: also store (random) ``latents_flip``.
        cond_dtype: dtype of the embeddings.
        shard_size, max_shards: as in :func:`write_text_latents`.
        seed: the data's seed.

    Returns:
        :func:`write_text_latents`'s report.
    """
    g = torch.Generator().manual_seed(derive_seed("synthetic-text-latents", seed))
    latents = torch.randn(num_images, *latent_shape, generator=g)  # (N, C, h, w)
    flips = torch.randn(num_images, *latent_shape, generator=g) if both_flips else None
    lengths = 1 + torch.arange(num_images) % seq_len  # (N,) tokens kept per sample
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]  # (N, L)
    embeds = torch.randn(num_images, seq_len, dim, generator=g) * mask[..., None]  # (N, L, D), padding zeroed
    cond = {"prompt_embeds": embeds.to(cond_dtype)}
    empty = {"prompt_embeds": torch.randn(seq_len, dim, generator=g).to(cond_dtype)}
    if pooled_dim is not None:
        cond["pooled_prompt_embeds"] = torch.randn(num_images, pooled_dim, generator=g).to(cond_dtype)
        empty["pooled_prompt_embeds"] = torch.randn(pooled_dim, generator=g).to(cond_dtype)
    if with_mask:
        cond["prompt_mask"], empty["prompt_mask"] = mask, torch.arange(seq_len) < 1
    image_size = 8 * latent_shape[1]  # the pixel size an SD-VAE (8x downsampling) latent of that side comes from
    return write_text_latents(out, latents, cond, empty, source=f"synthetic seed={seed}", image_size=image_size,
                              scale_factor=SD_VAE_SCALE_FACTOR, shard_size=shard_size, latents_flip=flips,
                              max_shards=max_shards)


# ---- text-conditioned folders, streamed one shard at a time -------------------------------------

_DERIVED = ("latent_shape", "conditioning", "data_sha256")  # per-shard facts, known only after encoding


class TextShard(NamedTuple):
    """One shard's rows, as :func:`stream_text_latents`'s ``encode`` returns them (CPU tensors)."""

    latents: torch.Tensor  # (n, C, h, w) float16/float32
    cond: Conditioning  # key -> (n, ...)
    latents_flip: torch.Tensor | None = None  # (n, C, h, w), only when the plan says both_flips


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Content hash of named tensors (sorted by name)."""
    parts: list[bytes] = []
    for name in sorted(tensors):
        parts += [name.encode(), _tensor_bytes(tensors[name])]
    return content_digest(parts)


def _stream_plan(plan: Mapping[str, Any], num_images: int, shard_size: int) -> dict[str, Any]:
    """The caller's identity fields plus the format and the shard split; checked before any encoding."""
    if num_images < 1 or shard_size < 1:
        raise ValueError(f"num_images ({num_images}) and shard_size ({shard_size}) must be >= 1")
    for key in ("source", "image_size", "scale_factor", "both_flips", "dtype"):
        if key not in plan:
            raise ValueError(f"plan lacks {key!r} (the index records it)")
    if plan["dtype"] not in _DTYPES:
        raise ValueError(f"plan dtype {plan['dtype']!r} is not one of {', '.join(_DTYPES)}")
    reserved = sorted(set(plan) & {"format", "num_images", "shard_size", "num_shards", "shard", "count", *_DERIVED})
    if reserved:
        raise ValueError(f"plan keys {reserved} are set by stream_text_latents itself")
    return {**plan, "format": LATENT_TEXT_FORMAT, "num_images": num_images, "shard_size": shard_size,
            "num_shards": math.ceil(num_images / shard_size)}


def _identity(found: dict[str, Any]) -> dict[str, Any]:
    """A stored plan without the fields that are derived from the encoded tensors."""
    return {k: v for k, v in found.items() if k not in _DERIVED}


def _checked_shard(out: Path, shard: int, plan: dict[str, Any], rows: TextShard) -> dict[str, torch.Tensor]:
    """The tensors of shard ``shard`` after checking their count, dtype and conditioning."""
    first = shard * plan["shard_size"]
    count = min(plan["shard_size"], plan["num_images"] - first)
    where = out / shard_name(shard)
    _check_text_latents(where, rows.latents, rows.latents_flip, plan["shard_size"])
    if rows.latents.shape[0] != count or str(rows.latents.dtype).removeprefix("torch.") != plan["dtype"]:
        raise DatasetError(f"encode() gave {tuple(rows.latents.shape)} {rows.latents.dtype} latents for {where}; "
                           f"the plan wants {count} rows of {plan['dtype']}")
    if (rows.latents_flip is not None) != bool(plan["both_flips"]):
        raise DatasetError(f"encode() for {where}: latents_flip must be given exactly when both_flips is set")
    batch = _as_batch(rows.cond, count, where)
    check_conditioning({k: v[0] for k, v in batch.items()}, f"conditioning for {where}")
    tensors = {"latents": rows.latents.contiguous()}
    if rows.latents_flip is not None:
        tensors["latents_flip"] = rows.latents_flip.contiguous()
    tensors.update({COND_PREFIX + k: v.contiguous() for k, v in sorted(batch.items())})  # each (n, ...)
    return tensors


def stream_text_latents(
    out: str | Path,
    plan: Mapping[str, Any],
    encode: Callable[[range], TextShard],
    empty: Callable[[], Mapping[str, torch.Tensor]],
    *,
    num_images: int,
    shard_size: int = 10_000,
    rank: int = 0,
    world_size: int = 1,
    max_shards: int | None = None,
) -> ExtractReport:
    """Write a text-conditioned latent folder shard by shard; resumable, atomic, multi-process.

    Only one shard's rows are in memory at a time: ``encode(rows)`` is called for each missing shard
    of this rank (shard ``i`` belongs to rank ``i % world_size``). ``plan`` is the extraction's
    identity (source fingerprint, pipeline, settings); existing shards (and the empty prompt) whose
    stored plan differs are refused, naming the fields, before anything is encoded, so a changed
    source or pipeline cannot resume another's folder. Rank 0 writes ``empty_prompt.safetensors``
    once (calling ``empty()`` only then). With one process, ``index.json`` is written when every
    shard exists; with several, rank 0 calls :func:`finish_text_latents` after a barrier.

    Args:
        out: the folder (created with the first file written).
        plan: JSON-able identity; must hold ``source``, ``image_size``, ``scale_factor``, ``both_flips``
            and ``dtype`` (of the latents), which the index records.
        encode: rows (a range of sample indices) -> their :class:`TextShard`.
        empty: () -> the empty prompt's conditioning (one sample's shapes, the samples' keys and dtypes).
        num_images: N, the number of samples.
        shard_size: samples per shard (the last may be smaller).
        rank, world_size: this process and the process count.
        max_shards: write at most this many of this rank's missing shards in this call (None = all).

    Returns:
        An :class:`ExtractReport`; ``index`` is set when this call completed the folder.

    Raises:
        DatasetError: existing files of another extraction, or ``encode`` output that does not fit the plan.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file, not a folder for latent shards: choose another output folder")
    plan = _stream_plan(plan, num_images, shard_size)
    report = ExtractReport(num_shards=plan["num_shards"])
    todo = []
    for shard in range(rank, plan["num_shards"], world_size):
        path = out / shard_name(shard)
        if path.exists():
            _check_plan(path, _identity(_read_plan(path)), plan)
            report.skipped.append(shard)
        else:
            todo.append(shard)
    if max_shards is not None:
        todo, report.pending = todo[:max_shards], todo[max_shards:]
    empty_path = out / EMPTY_PROMPT_FILE
    if empty_path.exists():
        _check_plan(empty_path, _identity(_read_plan(empty_path)), plan)
    elif rank == 0:
        sample = {k: v.detach().cpu().contiguous() for k, v in sorted(empty().items())}
        check_conditioning(sample, f"empty-prompt conditioning for {out}")
        tensors = {COND_PREFIX + k: v for k, v in sample.items()}
        meta = {**plan, "shard": None, "count": 1, "conditioning": cond_spec(sample), "data_sha256": _digest(tensors)}
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(empty_path)
        _write_atomic(empty_path, tensors, {_PLAN_KEY: json.dumps(meta)})
    for shard in todo:
        first = shard * plan["shard_size"]
        rows = range(first, min(first + plan["shard_size"], plan["num_images"]))
        tensors = _checked_shard(out, shard, plan, encode(rows))
        meta = {**plan, "shard": shard, "count": len(rows), "latent_shape": list(tensors["latents"].shape[1:]),
                "conditioning": cond_spec({k.removeprefix(COND_PREFIX): v[0] for k, v in tensors.items()
                                           if k.startswith(COND_PREFIX)}),
                "data_sha256": _digest(tensors)}
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out / shard_name(shard))
        _write_atomic(out / shard_name(shard), tensors, {_PLAN_KEY: json.dumps(meta)})
        report.written.append(shard)
    if world_size == 1 and not report.pending:
        report.index = finish_text_latents(out)
    return report


def finish_text_latents(out: str | Path) -> dict[str, Any]:
    """Check a streamed text-latent folder is complete and consistent; write its ``index.json`` last.

    Every shard and the empty prompt must carry the same identity plan, one latent shape and one
    conditioning spec (keys, per-sample shapes, dtypes). Call on rank 0 after every rank finished.

    Args:
        out: the folder written by :func:`stream_text_latents`.

    Returns:
        The index that was written (what :class:`~shd_diffusion.data.TextLatentDataset` reads).

    Raises:
        DatasetError: no shards, missing shards (listed, with the fix), or shards that disagree.
    """
    out = Path(out)
    existing = sorted(out.glob("shard_*.safetensors"))
    if not existing:
        raise DatasetError(f"no latent shards in {out}: run the extraction first")
    empty_path = out / EMPTY_PROMPT_FILE
    if not empty_path.exists():
        raise DatasetError(f"{empty_path} is missing: rerun the extraction on rank 0 to write it")
    ref = _read_plan(empty_path)
    plan = _identity(ref)
    missing = missing_shards(out, plan["num_shards"])
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DatasetError(f"{out}: {len(missing)} of {plan['num_shards']} shards missing ({shown}); rerun the same "
                           "extraction to finish them")
    shards, digests, latent_shape = [], [ref["data_sha256"].encode()], None
    for shard in range(plan["num_shards"]):
        path = out / shard_name(shard)
        found = _read_plan(path)
        _check_plan(path, _identity(found), plan)
        if found["conditioning"] != ref["conditioning"] or latent_shape not in (None, found["latent_shape"]):
            raise DatasetError(f"{path}: latents {found['latent_shape']} / conditioning {found['conditioning']} differ "
                               f"from the other shards' ({latent_shape} / {ref['conditioning']}); delete it and resume")
        latent_shape = found["latent_shape"]
        shards.append({"name": shard_name(shard), "count": found["count"]})
        digests.append(found["data_sha256"].encode())
    drop = ("shard_size", "num_shards", "shard", "count")
    index = {**{k: v for k, v in plan.items() if k not in drop}, "latent_shape": latent_shape,
             "conditioning": ref["conditioning"], "data_sha256": content_digest(digests), "shards": shards}
    atomic_write_text(out / LATENT_INDEX, json.dumps(index, indent=1))
    return index
