"""Shard bookkeeping for resumable, multi-process sampling, and assembly of the ADM ``.npz``.

Layout of a sampling run directory ``DIR``::

    DIR/shards/manifest.json      what is being sampled (N, shard size, the weights' sha256, seed, ...)
    DIR/shards/shard_000000.npz   images [0, S), written atomically
    DIR/shards/shard_000001.npz   images [S, 2S)
    ...
    DIR/samples_{N}x{H}x{W}x3.npz the assembled result (ADM evaluator format)

Image indices ``0..N-1`` are cut into fixed shards of ``S`` consecutive indices; shard ``k`` holds
``[k*S, min((k+1)*S, N))``. The split depends only on (N, S), never on the number of processes, so
a job restarted with another GPU count resumes the same shards. Rank ``r`` of ``world`` owns shards
``r, r + world, r + 2*world, ...``.

A shard file is ``np.savez`` (uncompressed) with

* ``images``  uint8 (n, H, W, 3), NHWC,
* ``labels``  int64 (n,),
* ``indices`` int64 (n,), exactly the shard's index range in increasing order.

It is written through :func:`shd_diffusion.fileio.atomic_path` (a temporary name in the same
folder, fsync, rename), so a shard file either exists complete or not at all; a killed job leaves
at most a hidden ``.shard_*.npz.*.tmp`` file, which is ignored and later removed.
:func:`run_shards` fills a folder from any :class:`ImageSampler` (:class:`shd_diffusion.sampler.Sampler`);
everything here is file/array logic: no torch.
"""

from __future__ import annotations

import glob
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from .cli import BadInput
from .console import say
from .fileio import atomic_path, atomic_write_text
from .fileio import remove_stale_temps as fileio_remove_stale_temps

__all__ = [
    "SHARD_DIR",
    "MANIFEST",
    "ShardError",
    "num_shards",
    "shard_range",
    "shards_for_rank",
    "shard_path",
    "write_shard",
    "read_shard",
    "shard_is_complete",
    "remove_stale_temps",
    "check_manifest",
    "write_manifest",
    "read_manifest",
    "samples_filename",
    "assemble",
    "ImageSampler",
    "shard_manifest",
    "run_shards",
]

SHARD_DIR = "shards"
MANIFEST = "manifest.json"


class ShardError(BadInput, RuntimeError):
    """A run directory is inconsistent (missing shard, duplicate index, changed settings)."""


# --------------------------------------------------------------------------------------------
# Index bookkeeping
# --------------------------------------------------------------------------------------------


def num_shards(num_samples: int, shard_size: int) -> int:
    """Number of shards covering ``num_samples`` indices (the last one may be short).

    Args:
        num_samples: N > 0. shard_size: S > 0.

    Returns:
        ceil(N / S).
    """
    if num_samples <= 0 or shard_size <= 0:
        raise ValueError(f"num_samples and shard_size must be > 0, got {num_samples} and {shard_size}")
    return -(-num_samples // shard_size)


def shard_range(k: int, num_samples: int, shard_size: int) -> range:
    """Image indices held by shard ``k``: ``range(k*S, min((k+1)*S, N))``."""
    n = num_shards(num_samples, shard_size)
    if not 0 <= k < n:
        raise IndexError(f"shard {k} out of range: {num_samples} samples in shards of {shard_size} give {n} shards")
    return range(k * shard_size, min((k + 1) * shard_size, num_samples))


def shards_for_rank(total_shards: int, rank: int, world_size: int) -> list[int]:
    """Shards owned by ``rank``: ``rank, rank + world, ...`` (round robin, so ranks stay balanced).

    Args:
        total_shards: number of shards. rank: 0 <= rank < world_size. world_size: process count.

    Returns:
        Shard ids in increasing order.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return list(range(rank, total_shards, world_size))


def shard_path(out_dir: str | os.PathLike, k: int) -> Path:
    """``out_dir/shards/shard_{k:06d}.npz``."""
    return Path(out_dir) / SHARD_DIR / f"shard_{k:06d}.npz"


def samples_filename(num_samples: int, height: int, width: int) -> str:
    """ADM's file name for a sample set: ``samples_{N}x{H}x{W}x3.npz``."""
    return f"samples_{num_samples}x{height}x{width}x3.npz"


# --------------------------------------------------------------------------------------------
# Shard files
# --------------------------------------------------------------------------------------------


def write_shard(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Path:
    """Write one shard atomically (temporary file + rename).

    Args:
        path: final ``shard_{k:06d}.npz`` path (its folder is created).
        images: uint8 (n, H, W, 3).
        labels: (n,) integer class labels.
        indices: (n,) integer image indices.

    Returns:
        The final path.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"shard images must be uint8 (n, H, W, 3), got {images.dtype} {images.shape}")
    labels = np.asarray(labels, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if not len(images) == len(labels) == len(indices):
        raise ValueError(f"shard arrays disagree in length: {len(images)} images, {len(labels)} labels, {len(indices)} indices")
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(final) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, images=images, labels=labels, indices=indices)
    except OSError as err:
        if err.filename is None:  # a write through the file object names no path (e.g. a full disk)
            raise OSError(err.errno, err.strerror or str(err), str(final)) from err
        raise
    return final


def read_shard(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load a shard.

    Returns:
        images uint8 (n, H, W, 3), labels int64 (n,), indices int64 (n,).
    """
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["labels"], z["indices"]


def _shard_indices(path: Path) -> np.ndarray:
    # Only the small index array is read (npz members load lazily).
    with np.load(path, allow_pickle=False) as z:
        return z["indices"]


def shard_is_complete(path: str | os.PathLike, expected: range) -> bool:
    """Whether ``path`` is a finished shard holding exactly the indices ``expected``.

    A file that cannot be read (truncated by a crash outside our atomic write, e.g. a copy) counts
    as unfinished and will be recomputed. A readable file with other indices means the run folder
    was made with other settings: that is an error, not something to overwrite silently.

    Raises:
        ShardError: the shard holds indices other than ``expected``.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        got = _shard_indices(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return False
    if not np.array_equal(got, np.arange(expected.start, expected.stop)):
        raise ShardError(
            f"{path} holds indices {_describe(got)}, expected {expected.start}..{expected.stop - 1}: "
            "the folder was sampled with other --num-samples/--shard-size; use a new --out"
        )
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete leftover temporary files of the shard ``path`` (from a killed writer).

    Call it only from the process that owns the shard, right before recomputing it: another live
    process never writes this shard, so its temporary files are garbage.

    Returns:
        The removed paths.
    """
    final = Path(path)
    legacy = list(final.parent.glob(f"{glob.escape(final.name)}.tmp-*"))  # an earlier version of this module
    for tmp in legacy:
        tmp.unlink(missing_ok=True)
    return [*fileio_remove_stale_temps(final), *legacy]


# --------------------------------------------------------------------------------------------
# Manifest: what the folder is being sampled with
# --------------------------------------------------------------------------------------------


def check_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> bool:
    """Whether ``out_dir`` already records exactly these settings; reads only, writes nothing.

    Args:
        out_dir: the run directory.
        manifest: JSON-serialisable settings; must contain ``num_samples`` and ``shard_size``.

    Returns:
        True when the folder has a matching manifest, False when it has none yet. A changed
        ``checkpoint`` path matches when both manifests record the same ``weights_sha256``.

    Raises:
        ShardError: the folder holds a manifest with different settings (names the keys), or one
            that cannot be read, or ``shards`` is not a folder.
    """
    for key in ("num_samples", "shard_size"):
        if key not in manifest:
            raise ValueError(f"manifest needs `{key}`")
    shard_dir = Path(out_dir) / SHARD_DIR
    if shard_dir.exists() and not shard_dir.is_dir():
        raise ShardError(f"{shard_dir} is a file, not a shard folder: remove it or sample into a new --out")
    path = shard_dir / MANIFEST
    if not path.exists():
        return False
    old = read_manifest(out_dir)
    new = json.loads(json.dumps(dict(manifest)))  # normalise (tuples -> lists) for comparison
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if _checkpoint_moved(old, new):
        changed.remove("checkpoint")
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        why = "".join(_CHANGE_REASONS.get(k, "") for k in changed)
        raise ShardError(
            f"{path} was written with other settings ({diff}){why}; resume with the original "
            "settings or sample into a new --out"
        )
    return True


def _checkpoint_moved(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Only where the weights were read from changed, not what they are: the same weights by
    content (a requeued job whose checkpoint was copied elsewhere) sample the same pixels."""
    same_weights = old.get("weights_sha256") is not None and old.get("weights_sha256") == new.get("weights_sha256")
    return same_weights and old.get("checkpoint") != new.get("checkpoint")


# Why a change of these manifest keys is refused, when the key name alone does not say it.
_CHANGE_REASONS = {
    "weights_sha256": ": the model's weights differ by content (replaced at the same path, or a folder "
    "sampled before weights were recorded), so its shards would mix two models",
}


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Record the sampling settings in ``out_dir/shards/manifest.json``, or check them.

    The first run writes the file (atomically; every rank writes identical content, so concurrent
    writers are harmless). A later run must bring the same settings (:func:`check_manifest`),
    otherwise its shards would mix two different sample sets.

    Returns:
        The manifest path.

    Raises:
        ShardError: see :func:`check_manifest`.
    """
    path = Path(out_dir) / SHARD_DIR / MANIFEST
    new = json.loads(json.dumps(dict(manifest)))  # normalised as check_manifest compares it
    if not check_manifest(out_dir, new):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    elif _checkpoint_moved(old := read_manifest(out_dir), new):  # said here once, not by every check
        say(f"resume: the checkpoint moved ({old['checkpoint']} -> {new['checkpoint']}); its weights are the "
            "same by content (weights_sha256), so the folder resumes")
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings stored by :func:`write_manifest`.

    Raises:
        ShardError: no manifest (not a sampling run folder).
    """
    path = Path(out_dir) / SHARD_DIR / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: {out_dir} is not a folder written by `python -m sampling.sample`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ShardError(f"{path} is not valid JSON ({err}): restore it, or sample into a new --out") from None
    if not isinstance(manifest, dict) or not {"num_samples", "shard_size"} <= set(manifest):
        raise ShardError(f"{path} is not a sampling manifest (needs num_samples and shard_size): sample into a new --out")
    return manifest


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def _describe(indices: np.ndarray, limit: int = 5) -> str:
    items = [int(i) for i in np.asarray(indices).ravel()[:limit]]
    more = "" if len(indices) <= limit else f", ... ({len(indices)} in all)"
    return "[" + ", ".join(map(str, items)) + more + "]"


@dataclass(frozen=True)
class _ShardInfo:
    k: int
    path: Path
    indices: np.ndarray  # (n,) int64
    shape: tuple[int, ...]  # images shape (n, H, W, 3)


def _image_shape(path: Path) -> tuple[int, ...]:
    """Shape of ``images`` in a shard, read from the .npy header only (no pixel data)."""
    with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype != np.uint8:
        raise ShardError(f"{path}: images are {dtype}, expected uint8")
    return tuple(shape)


def _check_shards(out_dir: Path, num_samples: int, shard_size: int) -> list[_ShardInfo]:
    """Every shard present, indices exactly 0..N-1 once each, one image size; else ShardError."""
    n_shards = num_shards(num_samples, shard_size)
    missing = [k for k in range(n_shards) if not shard_path(out_dir, k).is_file()]
    if missing:
        names = ", ".join(shard_path(out_dir, k).name for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ShardError(
            f"{len(missing)} of {n_shards} shards missing in {out_dir / SHARD_DIR}: {names}{more}; "
            "rerun the same sampling command to finish them"
        )
    extra = sorted(
        p.name
        for p in (out_dir / SHARD_DIR).glob("shard_*.npz")
        if not p.stem[len("shard_"):].isdigit() or int(p.stem[len("shard_"):]) >= n_shards
    )
    if extra:
        raise ShardError(f"unexpected shard files for {num_samples} samples in shards of {shard_size}: {', '.join(extra)}")

    infos, seen = [], np.zeros(num_samples, dtype=np.int64)
    for k in range(n_shards):
        path = shard_path(out_dir, k)
        try:
            idx = _shard_indices(path).astype(np.int64)
            shape = _image_shape(path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise ShardError(f"{path} is unreadable ({e}); delete it and rerun the sampling command") from e
        if shape[0] != len(idx) or len(shape) != 4 or shape[-1] != 3:
            raise ShardError(f"{path}: images {shape} do not match {len(idx)} indices as (n, H, W, 3)")
        out_of_range = idx[(idx < 0) | (idx >= num_samples)]
        if len(out_of_range):
            raise ShardError(f"{path} holds indices outside 0..{num_samples - 1}: {_describe(out_of_range)}")
        np.add.at(seen, idx, 1)
        infos.append(_ShardInfo(k, path, idx, shape))

    dup = np.flatnonzero(seen > 1)
    if len(dup):
        owners = [i.path.name for i in infos if np.isin(i.indices, dup[:1]).any()]
        raise ShardError(f"duplicate image indices {_describe(dup)}; index {dup[0]} appears in {', '.join(owners)}")
    absent = np.flatnonzero(seen == 0)
    if len(absent):
        raise ShardError(f"image indices missing from the shards: {_describe(absent)}")
    for info in infos:
        expected = shard_range(info.k, num_samples, shard_size)
        if not np.array_equal(info.indices, np.arange(expected.start, expected.stop)):
            raise ShardError(
                f"{info.path} holds indices {_describe(info.indices)}, expected {expected.start}..{expected.stop - 1}"
            )
    sizes = {i.shape[1:] for i in infos}
    if len(sizes) != 1:
        raise ShardError(f"shards disagree in image size: {sorted(sizes)}")
    return infos


def _entry(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp makes the archive a pure function of its arrays (byte-identical reruns).
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def _iter_shard_images(infos: list[_ShardInfo]) -> Iterator[tuple[_ShardInfo, np.ndarray, np.ndarray]]:
    for info in infos:
        try:
            images, labels, _ = read_shard(info.path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:  # e.g. truncated pixel data
            raise ShardError(f"{info.path} is unreadable ({e}); delete it and rerun the sampling command") from e
        if images.shape != info.shape:
            raise ShardError(f"{info.path}: images {images.shape}, header said {info.shape}; delete it and rerun")
        yield info, images, labels


def assemble(
    out_dir: str | os.PathLike,
    png_dir: str | os.PathLike | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Check all shards of ``out_dir`` and write ``out_dir/samples_{N}x{H}x{W}x3.npz``.

    The result is ADM's evaluator format: ``arr_0`` uint8 (N, H, W, 3) in index order and
    ``arr_1`` int64 (N,) labels. ``arr_0`` is streamed into the (uncompressed, zip64) archive one
    shard at a time, so peak memory is one shard plus the labels, not all N images (50,000 x 256 x
    256 x 3 is 9.8 GB). The archive is written to a temporary name and renamed.

    Args:
        out_dir: a run folder with ``shards/manifest.json`` and all shard files.
        png_dir: if given, also write every image as ``{index:06d}.png`` there.
        extra: further members written after ``arr_1`` (e.g. ``{"prompts": (N,) str}`` for
            text-to-image samples), each a non-object array with N rows; readers of ``arr_0`` /
            ``arr_1`` (ADM's evaluator, :mod:`shd_diffusion.evaluation`) ignore them.

    Returns:
        Path of the assembled ``.npz``.

    Raises:
        ShardError: a shard is missing or unreadable, an index is duplicated or missing, or shards
            disagree in image size. The message names the shard / index.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    n, s = int(manifest["num_samples"]), int(manifest["shard_size"])
    extra = {name: np.asarray(value) for name, value in (extra or {}).items()}
    for name, value in extra.items():
        if name in ("arr_0", "arr_1") or value.dtype.hasobject or len(value) != n:
            raise ValueError(f"extra member {name!r} must be a non-object array of {n} rows named other than arr_0/arr_1, "
                             f"got {value.dtype} {value.shape}")
    infos = _check_shards(out_dir, n, s)
    _, height, width, _ = infos[0].shape
    final = out_dir / samples_filename(n, height, width)
    labels = np.empty(n, dtype=np.int64)
    if png_dir is not None:
        from PIL import Image  # optional dependency, only for PNG export

        Path(png_dir).mkdir(parents=True, exist_ok=True)
    # ZIP_STORED + zip64, the same container np.savez writes, so np.load and ADM's streaming
    # reader (which parses the .npy header itself) both read it.
    with atomic_path(final) as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(_entry("arr_0.npy"), mode="w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (n, height, width, 3)}
                np.lib.format.write_array_header_1_0(f, header)
                for info, images, shard_labels in _iter_shard_images(infos):
                    f.write(np.ascontiguousarray(images).tobytes())
                    labels[info.indices] = shard_labels
                    if png_dir is not None:
                        for i, img in zip(info.indices, images):
                            Image.fromarray(img).save(Path(png_dir) / f"{int(i):06d}.png")
            with zf.open(_entry("arr_1.npy"), mode="w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels, allow_pickle=False)
            for name, value in extra.items():
                with zf.open(_entry(f"{name}.npy"), mode="w", force_zip64=True) as f:
                    np.lib.format.write_array(f, value, allow_pickle=False)
    return final


# --------------------------------------------------------------------------------------------
# Filling a run folder
# --------------------------------------------------------------------------------------------


class ImageSampler(Protocol):
    """What :func:`run_shards` needs from a sampler (:class:`shd_diffusion.sampler.Sampler`)."""

    def sample(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) images and int64 (n,) labels of the given image indices."""
        ...

    def stream_fields(self) -> dict[str, Any]:
        """Manifest entries that define each image's randomness (seed scheme, loop, noise layout)."""
        ...


def _batches(indices: range, batch_size: int) -> Iterator[range]:
    """Consecutive ranges of at most ``batch_size`` indices (batches never cross a shard)."""
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


def shard_manifest(
    sampler: ImageSampler, settings: Mapping[str, Any], num_samples: int, shard_size: int, batch_size: int
) -> dict[str, Any]:
    """What a run folder must agree on: the pixel-defining settings, the sampler's
    ``stream_fields()`` (seed scheme, loop, noise layout), N, shard and batch size.

    The batch size is part of it because CPU and GPU matrix kernels pick their blocking by the
    number of rows, so one image's pixels can differ in the last bits between batch sizes (a
    uint8 level at a rounding boundary); the process count is not, as every image lands in the
    same batch for any number of processes. ``batch_size`` is the effective one (capped at the
    shard size).
    """
    return {**settings, **sampler.stream_fields(), "num_samples": num_samples, "shard_size": shard_size, "batch_size": min(batch_size, shard_size)}


def run_shards(
    sampler: ImageSampler,
    out_dir: str | Path,
    num_samples: int,
    shard_size: int = 1000,
    batch_size: int = 250,
    rank: int = 0,
    world_size: int = 1,
    manifest: dict[str, Any] | None = None,
    on_shard_done: Callable[[int], None] | None = None,
    show_progress: bool = False,
) -> list[int]:
    """Sample this rank's unfinished shards of ``out_dir``, each written atomically when done.

    Shards already on disk with the right indices are skipped, so rerunning the same command
    after a crash (with any number of processes) finishes the set without duplicating or
    dropping an index. A shard interrupted mid-way is recomputed from scratch.

    Args:
        sampler: produces images for a batch of indices.
        out_dir: run directory (``out_dir/shards/``).
        num_samples: N; indices 0..N-1.
        shard_size: indices per shard (fixes the split independently of ``world_size``).
        batch_size: images per sampling batch (capped at the shard size).
        rank: this process (0-based). world_size: number of processes.
        manifest: settings recorded in / checked against ``shards/manifest.json`` (the sampler's
            stream fields, N, the shard size and the batch size are added, see
            :func:`shard_manifest`); a mismatch raises ``ShardError`` before any work.
        on_shard_done: called with the shard id after each shard is written (tests inject
            failures here).
        show_progress: tqdm bar (images, img/s, ETA) for this rank.

    Returns:
        The shard ids this call computed.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    write_manifest(out_dir, shard_manifest(sampler, manifest or {}, num_samples, shard_size, batch_size))
    mine = shards_for_rank(num_shards(num_samples, shard_size), rank, world_size)
    todo = [k for k in mine if not shard_is_complete(shard_path(out_dir, k), shard_range(k, num_samples, shard_size))]
    if show_progress:
        say(f"rank {rank}/{world_size}: {len(mine) - len(todo)} of my {len(mine)} shards already done, "
            f"{len(todo)} to sample")
    total = sum(len(shard_range(k, num_samples, shard_size)) for k in todo)
    done = []
    with tqdm(total=total, unit="img", disable=not show_progress, desc=f"sampling (rank {rank} of {world_size})", dynamic_ncols=True) as bar:
        for k in todo:
            path = shard_path(out_dir, k)
            remove_stale_temps(path)  # this rank owns shard k: its old temp files are garbage
            indices = shard_range(k, num_samples, shard_size)
            images: np.ndarray | None = None
            labels = np.empty(len(indices), dtype=np.int64)
            offset = 0
            for batch in _batches(indices, batch_size):
                batch_images, batch_labels = sampler.sample(batch)  # (n, H, W, 3), (n,)
                if images is None:  # image size is known only after the first decode
                    images = np.empty((len(indices), *batch_images.shape[1:]), dtype=np.uint8)
                images[offset : offset + len(batch)] = batch_images
                labels[offset : offset + len(batch)] = batch_labels
                offset += len(batch)
                bar.update(len(batch))
            write_shard(path, images, labels, np.arange(indices.start, indices.stop))
            done.append(k)
            if on_shard_done is not None:
                on_shard_done(k)
    return done
