"""Score an ADM-format sample set: FID, IS, precision/recall (k=3), KID.

    python -m sampling.score samples.npz --ref VIRTUAL_imagenet256_labeled.npz --json scores.json
    python -m sampling.score samples.npz --ref data/val_images/ \
        --inception-weights weights/inception_fid_helper.pth

Inputs:
    samples  ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3) (ADM's sample format; ``arr_1`` labels
             are allowed and ignored). Grayscale (N, H, W) or (N, H, W, 1) is replicated to 3 channels.
             ``arr_0`` is streamed in batches straight from the archive (stored or deflated), so
             50,000 x 256 x 256 images need memory for one batch plus the features, not 9.8 GB.
    --ref    one of
             * an ADM reference batch ``.npz``: features are recomputed from its ``arr_0`` images;
               its ``mu`` / ``sigma`` come from TF Inception and are never mixed with torch features;
             * a folder of .png / .jpg / .jpeg images (searched recursively; converted to RGB:
               grayscale replicated to 3 channels, alpha dropped);
             * a statistics file written by this tool (see below).

Features come from torch-fidelity's FID Inception (uint8 NCHW in, TF-exact resize to 299 inside):
pool3 ('2048') for FID, KID and precision/recall, 'logits_unbiased' for IS. With converted
no-logits weights (scripts/convert_inception.py) IS is reported as null with the reason.

Reference statistics are computed once and cached in ``--cache-dir`` as
``<ref name>-<key16>.npz`` where key = sha256 of (format, resolved ref path, its size + mtime —
for a folder every image's relative path, size and mtime —, weights sha256). The file
(format ``shd_diffusion.ref_stats/v1``) holds ``format``, ``mu`` (D,) and ``sigma`` (D, D) float64,
``features`` (N, D) float32 (for precision/recall and KID), ``image_hw``, ``weights_sha256``,
``feature_extractor`` and ``source``; it can itself be passed as ``--ref``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from sampling import metrics
from sampling.inception import (
    FEATURE_EXTRACTOR_NAME,
    InceptionWeightsError,
    WeightsInfo,
    default_weights_path,
    inspect_weights,
    load_feature_extractor,
)
from sampling.shards import (  # the atomic-write helpers of the sample shards
    _commit,
    _temp_name,
)

STATS_FORMAT = "shd_diffusion.ref_stats/v1"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DEFAULT_CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shd_diffusion" / "ref_stats"
)
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity feature names
_PR_K = 3
_READ_CHUNK = 1 << 20  # bytes per read when streaming arr_0
_IS_SPLITS = 10


class ScoreError(ValueError):
    """Bad inputs to scoring; the message names the problem and the fix."""


def _log(msg: str) -> None:
    """All diagnostics go through here (stderr), keeping stdout for the summary line / JSON."""
    print(f"[score] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- inputs


def check_image_layout(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    """Raise ScoreError unless (shape, dtype) is uint8 (N, H, W, 3), (N, H, W, 1) or (N, H, W), N > 0.

    Args:
        shape, dtype: of the array (e.g. read from an ``.npy`` header, before any pixel data).
        name: what to call the array in errors.
    """
    if dtype != np.uint8:
        hint = ""
        if dtype.kind == "f":
            hint = " (floats in [-1, 1]: `((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)`)"
        raise ScoreError(f"{name}: dtype {dtype}, expected uint8 in [0, 255]{hint}")
    shape = tuple(shape)
    full = shape + (1,) if len(shape) == 3 else shape  # (N, H, W) -> (N, H, W, 1)
    if len(full) != 4:
        raise ScoreError(f"{name}: shape {shape}, expected (N, H, W, 3) uint8 (ADM sample format)")
    if full[-1] not in (1, 3):
        if full[1] in (1, 3):
            raise ScoreError(
                f"{name}: shape {shape} looks channels-first; save NHWC: `x.transpose(0, 2, 3, 1)`"
            )
        raise ScoreError(
            f"{name}: shape {shape} has {full[-1]} channels, expected 3 (RGB) or 1 (grayscale)"
        )
    if full[0] == 0:
        raise ScoreError(f"{name}: no images")


def as_rgb_nhwc(x: np.ndarray, name: str) -> np.ndarray:
    """Validate an image array and return uint8 (N, H, W, 3); grayscale is replicated to 3 channels.

    Args:
        x: uint8 (N, H, W, 3), (N, H, W, 1) or (N, H, W).
        name: what to call the array in errors.
    """
    check_image_layout(x.shape, x.dtype, name)
    if x.ndim == 3:
        x = x[..., None]  # (N, H, W, 1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)  # grayscale -> RGB by replication
    return x


@dataclass(frozen=True)
class NpzImages:
    """A uint8 image array stored as one ``.npy`` member of an ``.npz``, read in batches.

    Only the ``.npy`` header is read up front; :meth:`batches` then reads the pixels sequentially
    from the zip member (stored or deflated alike), so memory is one batch, never the whole array.
    Build it with :func:`open_npz_images`.
    """

    path: Path
    member: str  # zip member, e.g. "arr_0.npy"
    shape: tuple[int, ...]  # as stored: (N, H, W), (N, H, W, 1) or (N, H, W, 3)
    data_offset: int  # bytes of .npy header before the pixels (C order, uint8)

    @property
    def num_images(self) -> int:
        """N."""
        return int(self.shape[0])

    @property
    def image_hw(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.shape[1]), int(self.shape[2])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield uint8 (B, H, W, 3) batches in order (grayscale replicated to 3 channels)."""
        per_image = self.shape[1:]
        name = f"{self.path}:{self.member[:-4]}"
        with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
            f.read(self.data_offset)  # skip the header (zip members cannot seek cheaply when deflated)
            for start in range(0, self.num_images, batch_size):
                out = np.empty((min(batch_size, self.num_images - start), *per_image), dtype=np.uint8)
                view, got = memoryview(out).cast("B"), 0
                while got < len(view):
                    n = f.readinto(view[got : got + _READ_CHUNK])  # bounded: inflating builds temporaries
                    if not n:
                        raise ScoreError(f"{name}: data ends after {start * math.prod(per_image) + got} bytes "
                                         f"of {self.num_images * math.prod(per_image)}; the file is truncated")
                    got += n
                yield as_rgb_nhwc(out, name)  # (B, H, W, 3)


def _read_npy_header(f: zipfile.ZipExtFile) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """(shape, fortran_order, dtype, header bytes) of an ``.npy`` stream; None for a version it cannot stream."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    return tuple(shape), fortran, dtype, f.tell()


def open_npz_images(path: str | os.PathLike, key: str = "arr_0", what: str = "samples") -> NpzImages | np.ndarray:
    """Open ``key`` of an ``.npz`` for streaming after checking its layout from the header alone.

    Args:
        path: the ``.npz``.
        key: the array's name (``arr_0`` in ADM files).
        what: what to call the file in errors (``samples``, ``--ref``).

    Returns:
        An :class:`NpzImages`; or, for the rare layouts that cannot be streamed (Fortran order,
        ``.npy`` format 3.0), the whole array loaded as uint8 (N, H, W, 3), with a note on stderr.

    Raises:
        ScoreError: not a readable ``.npz``, no ``key``, or not uint8 (N, H, W, 3|1) / (N, H, W).
    """
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"{what} {path} not found")
    member, name = f"{key}.npy", f"{path}:{key}"
    header, members = None, []
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            if member in members:
                with zf.open(member) as f:
                    header = _read_npy_header(f)
    except (OSError, ValueError, zipfile.BadZipFile, NotImplementedError, EOFError) as e:
        # Not a zip, a corrupt header, or a zip compression method Python cannot read.
        raise ScoreError(
            f"{path}: not a readable .npz ({type(e).__name__}: {e}); expected np.savez or np.savez_compressed "
            f"output with {key} uint8 (N, H, W, 3)"
        ) from e
    if member not in members:
        keys = [m.removesuffix(".npy") for m in members]
        raise ScoreError(
            f"{path}: no '{key}' (keys: {keys}); save samples with `np.savez(path, images)` "
            "where images is uint8 (N, H, W, 3)"
        )
    if header is not None:
        shape, fortran, dtype, offset = header
        check_image_layout(shape, dtype, name)
        if not fortran:
            return NpzImages(path, member, shape, offset)
    _log(f"{name}: not a C-order .npy v1/v2 member, so it cannot be streamed: loading it whole")
    with np.load(path, allow_pickle=False) as z:
        return as_rgb_nhwc(z[key], name)


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """Load ADM-format samples whole: ``arr_0`` uint8 (N, H, W, 3) from an ``.npz`` (no pickle).

    Scoring streams instead (:func:`open_npz_images`); this is for small sets and tests.
    """
    images = open_npz_images(path)
    if isinstance(images, np.ndarray):
        return images
    return np.concatenate(list(images.batches(max(images.num_images, 1))))


def _folder_images(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ScoreError(f"reference folder {path} has no {'/'.join(IMAGE_EXTS)} images")
    return files


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)  # L -> RGB replicates; RGBA drops alpha


def _iter_folder(files: list[Path], batch_size: int, hw: tuple[int, int]) -> Iterator[np.ndarray]:
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i : i + batch_size]:
            im = _read_rgb(f)
            if im.shape[:2] != hw:
                raise ScoreError(
                    f"{f}: size {im.shape[1]}x{im.shape[0]} (WxH) differs from {hw[1]}x{hw[0]} of "
                    f"{files[0].name}; resize the folder to one size first"
                )
            batch.append(im)
        yield np.stack(batch)  # (B, H, W, 3)


def _iter_array(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def _image_batches(images: NpzImages | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of a streamed or an in-memory image set."""
    return images.batches(batch_size) if isinstance(images, NpzImages) else _iter_array(images, batch_size)


def _count_hw(images: NpzImages | np.ndarray) -> tuple[int, tuple[int, int]]:
    """(N, (H, W)) of a streamed or an in-memory image set."""
    if isinstance(images, NpzImages):
        return images.num_images, images.image_hw
    return len(images), (int(images.shape[1]), int(images.shape[2]))


# --------------------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(
    batches: Iterator[np.ndarray],
    total: int,
    extractor: torch.nn.Module,
    device: str | torch.device,
    names: Sequence[str],
    desc: str = "features",
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run the extractor over uint8 (B, H, W, 3) batches.

    Args:
        batches: iterator of uint8 NHWC batches.
        total: number of images (for the progress bar).
        extractor: torch-fidelity extractor built with ``features == names``.
        device: where to send the batches.
        names: the extractor's feature names, in its order.

    Returns:
        {name: float32 (N, dim)} for every name.
    """
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in batches:
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            x = x.to(device)
            for n, f in zip(names, extractor(x)):
                out[n].append(f.float().cpu().numpy())  # (B, dim)
            bar.update(len(batch))
    return {n: np.concatenate(v) for n, v in out.items()}


# ---------------------------------------------------------------------------------- reference stats


@dataclass
class RefStats:
    """Reference-set statistics in this package's feature space."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray  # (N, D) float32, for precision/recall and KID
    image_hw: tuple[int, int]
    weights_sha256: str
    source: str

    def save(self, path: Path) -> None:
        """Atomic write: a unique temporary name (concurrent scorers never share one), fsync, rename.

        An interrupted run never leaves a half cache file under ``path``.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_name(path)
        try:
            with open(tmp, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
                np.savez(
                    f,
                    format=np.array(STATS_FORMAT),
                    mu=self.mu,
                    sigma=self.sigma,
                    features=self.features,
                    image_hw=np.array(self.image_hw, dtype=np.int64),
                    weights_sha256=np.array(self.weights_sha256),
                    feature_extractor=np.array(FEATURE_EXTRACTOR_NAME),
                    source=np.array(self.source),
                )
            _commit(tmp, path)  # fsync + os.replace
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def load(path: Path) -> RefStats:
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z.files or str(z["format"]) != STATS_FORMAT:
                raise ScoreError(f"{path}: not a {STATS_FORMAT} statistics file")
            hw = (int(z["image_hw"][0]), int(z["image_hw"][1]))
            sha, source = str(z["weights_sha256"]), str(z["source"])
            return RefStats(z["mu"], z["sigma"], z["features"], hw, sha, source)


def reference_cache_key(ref: str | os.PathLike, weights_sha256: str) -> str:
    """sha256 over (format, resolved path, size + mtime of the file or of every folder image, weights).

    Any edit to the reference or a different weights file yields a different key.
    """
    ref = Path(ref).resolve()
    files = _folder_images(ref) if ref.is_dir() else [ref]
    stamp = [(str(p.relative_to(ref.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([STATS_FORMAT, str(ref), stamp, weights_sha256])
    return hashlib.sha256(blob.encode()).hexdigest()


def _npz_files(path: Path) -> list[str]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except (ValueError, OSError) as e:
        raise ScoreError(f"--ref {path}: not a readable .npz ({e})") from e


def _check_count(n: int, what: str, min_images: dict[str, tuple[int, str]]) -> None:
    """ScoreError for the first metric that needs more than ``n`` images; its fix may use ``{n}``."""
    for metric, (m, fix) in min_images.items():
        if n < m:
            raise ScoreError(f"{what}: {n} images, but {metric} needs at least {m}: {fix.format(n=n)}")


def required_images(pr_k: int, kid_subset_size: int) -> dict[str, tuple[int, str]]:
    """{metric: (least images per set, fix)}, checked on both sets before any Inception forward.

    Args:
        pr_k: precision/recall neighbourhood size.
        kid_subset_size: rows drawn from each set per KID subset.
    """
    more = "provide more images"
    return {
        "FID (covariance)": (2, more),
        f"precision/recall (k={pr_k} neighbours)": (pr_k + 1, more),
        f"KID with subset size {kid_subset_size}": (
            kid_subset_size, "pass --kid-subset-size N with 2 <= N <= {n} (kid_subset_size=N), or " + more
        ),
    }


def _check_hw(sample_hw: tuple[int, int], ref_hw: tuple[int, int], allow_mismatch: bool) -> None:
    if tuple(sample_hw) != tuple(ref_hw) and not allow_mismatch:
        raise ScoreError(
            f"samples are {sample_hw[1]}x{sample_hw[0]} (WxH) but the reference is {ref_hw[1]}x{ref_hw[0]}: "
            "resize one side to match (ADM: center-crop + resize the reference to the sample resolution) "
            "or pass --allow-size-mismatch"
        )


def reference_stats(
    ref: str | os.PathLike,
    extractor: torch.nn.Module,
    weights: WeightsInfo,
    cache_dir: str | os.PathLike,
    sample_hw: tuple[int, int],
    min_images: dict[str, tuple[int, str]],
    batch_size: int = 200,
    device: str | torch.device = "cpu",
    names: Sequence[str] = (POOL,),
    allow_size_mismatch: bool = False,
    progress: bool = True,
) -> tuple[RefStats, dict]:
    """Reference statistics from a stats file, the cache, or the images (then cached).

    Sizes and counts are checked before any Inception forward.

    Args:
        ref: ADM reference batch .npz, image folder, or stats .npz.
        extractor: torch-fidelity extractor returning ``names`` (only ``POOL`` is kept).
        weights: the extractor's weights (their sha256 keys the cache).
        cache_dir: where cached statistics live.
        sample_hw: (H, W) of the samples, which the reference must match.
        min_images: {metric: (least number of reference images, fix)}, see :func:`required_images`.

    Returns:
        (stats, info) where info = {path, kind, cache_path, cache_hit}.
    """
    ref = Path(ref)
    if not ref.exists():
        raise ScoreError(f"--ref {ref} not found")
    info = {"path": str(ref.resolve()), "kind": None, "cache_path": None, "cache_hit": False}
    if ref.is_file():
        keys = _npz_files(ref)
        if "format" in keys:
            stats = RefStats.load(ref)
            if stats.weights_sha256 != weights.sha256:
                raise ScoreError(
                    f"--ref {ref} was computed with Inception weights sha256 {stats.weights_sha256[:12]}..., "
                    f"scoring uses {weights.sha256[:12]}... ({weights.path}); pass the reference images "
                    "instead or the matching --inception-weights"
                )
            info["kind"] = "stats"
        elif "arr_0" not in keys:
            tf_only = {"mu", "sigma"} <= set(keys)
            extra = " It holds TF-Inception mu/sigma, which cannot be mixed with torch features." * tf_only
            raise ScoreError(
                f"--ref {ref}: no 'arr_0' images (keys: {keys}).{extra} Pass the ADM reference batch with "
                "its arr_0 images, an image folder, or a statistics file written by this tool"
            )
        else:
            info["kind"] = "adm_npz"
            if {"mu", "sigma"} & set(keys):
                _log(f"{ref.name}: ignoring its precomputed mu/sigma (TF Inception); recomputing from arr_0")
    elif ref.is_dir():
        info["kind"] = "folder"
    else:
        raise ScoreError(f"--ref {ref}: expected an .npz file or an image folder")

    if info["kind"] != "stats":
        key = reference_cache_key(ref, weights.sha256)
        cache_path = Path(cache_dir) / f"{ref.stem or ref.name}-{key[:16]}.npz"
        info["cache_path"] = str(cache_path)
        if cache_path.is_file():
            stats = RefStats.load(cache_path)
            info["cache_hit"] = stats.weights_sha256 == weights.sha256  # the key already implies it
    if info["kind"] == "stats" or info["cache_hit"]:
        if info["cache_hit"]:
            _log(f"reference statistics from cache {cache_path}")
        _check_hw(sample_hw, stats.image_hw, allow_size_mismatch)
        _check_count(len(stats.features), f"reference {ref}", min_images)
        return stats, info

    if info["kind"] == "adm_npz":
        images = open_npz_images(ref, what="--ref")  # streamed: ADM's 10k reference is 2 GB of pixels
        n, hw = _count_hw(images)
        batches = _image_batches(images, batch_size)
    else:
        files = _folder_images(ref)
        hw = _read_rgb(files[0]).shape[:2]
        n, batches = len(files), _iter_folder(files, batch_size, hw)
    hw = (int(hw[0]), int(hw[1]))
    _check_hw(sample_hw, hw, allow_size_mismatch)
    _check_count(n, f"reference {ref}", min_images)
    feats = extract_features(batches, n, extractor, device, names, desc="reference", progress=progress)[POOL]
    mu, sigma = metrics.feature_stats(feats)
    stats = RefStats(mu, sigma, feats, hw, weights.sha256, str(ref.resolve()))
    stats.save(cache_path)
    _log(f"reference statistics cached at {cache_path}")
    return stats, info


# ------------------------------------------------------------------------------------------ score


def score(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str = "auto",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = _PR_K,
    pr_batch_size: int = 10000,
    is_splits: int = _IS_SPLITS,
    allow_size_mismatch: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Compute FID, IS, precision/recall and KID of ``samples`` against ``ref``.

    Args:
        samples, ref, ...: as ``python -m sampling.score --help`` (same names, same defaults);
        ``progress=False`` is ``--no-progress``.

    Returns:
        The JSON-able report: fid, is_mean, is_std, is_unavailable_reason, precision, recall,
        kid_mean, kid_std, num_samples, num_ref, image_hw, samples, ref {path, kind, cache_path,
        cache_hit}, weights {path, sha256, logits_available}, feature_extractor, settings.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if kid_subset_size < 2:
        raise ScoreError(f"--kid-subset-size {kid_subset_size}: KID's unbiased estimate needs at least 2")
    needs = required_images(pr_k, kid_subset_size)
    images = open_npz_images(samples)  # header only: pixels are streamed batch by batch
    num_samples, sample_hw = _count_hw(images)
    _check_count(num_samples, f"samples {samples}", needs)

    weights = inspect_weights(inception_weights) if inception_weights is not None else None
    names = [POOL, LOGITS] if weights is None or weights.logits_available else [POOL]
    extractor = load_feature_extractor(inception_weights, device=device, features=names)
    if weights is None:  # torch-fidelity's own download: hash the file torch.hub cached
        weights = inspect_weights(default_weights_path())

    ref_stats, ref_info = reference_stats(
        ref, extractor, weights, cache_dir, sample_hw, needs, batch_size, device, names,
        allow_size_mismatch, progress,
    )
    num_ref = len(ref_stats.features)

    batches = _image_batches(images, batch_size)
    feats = extract_features(batches, num_samples, extractor, device, names, "samples", progress)
    pool = feats[POOL]  # (N, 2048)
    mu, sigma = metrics.feature_stats(pool)
    # Fewer samples than feature dims: the centred features are an exact, cheap factor of sigma.
    factor = metrics.covariance_factor(pool) if len(pool) <= pool.shape[1] else None
    fid = metrics.frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma, factor1=factor)

    is_mean = is_std = None
    is_reason = weights.logits_unavailable_reason
    if is_reason is None and num_samples < is_splits:
        is_reason = f"{num_samples} samples < is_splits={is_splits}"
    elif is_reason is None:
        is_mean, is_std = metrics.inception_score(feats[LOGITS], splits=is_splits)

    precision, recall = metrics.precision_recall(
        ref_stats.features, pool, k=pr_k, batch_size=pr_batch_size, device=device
    )

    kid_mean, kid_std = metrics.kernel_inception_distance(  # both set sizes were checked above
        pool, ref_stats.features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )

    import torch_fidelity

    return {
        "fid": fid,
        "is_mean": is_mean,
        "is_std": is_std,
        "is_unavailable_reason": is_reason,
        "precision": precision,
        "recall": recall,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "num_samples": int(num_samples),
        "num_ref": int(num_ref),
        "image_hw": [int(sample_hw[0]), int(sample_hw[1])],
        "samples": str(Path(samples).resolve()),
        "ref": ref_info,
        "weights": {
            "path": weights.path,
            "sha256": weights.sha256,
            "logits_available": weights.logits_available,
        },
        "feature_extractor": (
            f"torch-fidelity {torch_fidelity.__version__} {FEATURE_EXTRACTOR_NAME}: "
            f"'{POOL}' (pool3) for FID/KID/PR, '{LOGITS}' for IS"
        ),
        "settings": {
            "pr_k": pr_k,
            "is_splits": is_splits,
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "seed": seed,
        },
    }


def summary_line(result: dict) -> str:
    """One human-readable line of the headline numbers."""
    r = result
    is_part = f"IS {r['is_mean']:.2f} +- {r['is_std']:.2f}" if r["is_mean"] is not None else "IS n/a"
    return (
        f"FID {r['fid']:.3f} | {is_part} | precision {r['precision']:.4f} recall {r['recall']:.4f} | "
        f"KID {r['kid_mean']:.5f} +- {r['kid_std']:.5f} | "
        f"{r['num_samples']} samples vs {r['num_ref']} reference"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m sampling.score`` argument parser (``--help`` shows every default)."""
    parser = argparse.ArgumentParser(
        prog="python -m sampling.score",
        description="FID / IS / precision / recall / KID of an ADM-format sample .npz.",
        epilog="Offline: python scripts/convert_inception.py --out PATH, then --inception-weights PATH "
        "(IS is then reported as null).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("samples", type=Path, help="samples .npz: arr_0 uint8 (N, H, W, 3)")
    parser.add_argument(
        "--ref", type=Path, required=True,
        help="ADM reference batch .npz (arr_0 images), image folder, or a stats .npz written by this tool",
    )
    parser.add_argument(
        "--inception-weights", type=Path, default=None,
        help="torch-fidelity Inception state dict; None = torch-fidelity's download (cached by torch.hub)",
    )
    parser.add_argument("--batch-size", type=int, default=200, help="images per Inception forward")
    parser.add_argument("--device", default="auto", help="'auto' = cuda if available else cpu")
    parser.add_argument("--json", default=None, help="write the JSON report here ('-' = stdout)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="reference stats cache")
    parser.add_argument("--kid-subsets", type=int, default=100, help="KID: number of random subsets")
    parser.add_argument(
        "--kid-subset-size", type=int, default=1000,
        help="KID: rows drawn from each set per subset; both sets need at least this many images (else an error)",
    )
    parser.add_argument("--pr-k", type=int, default=_PR_K, help="precision/recall: k-th neighbour radius")
    parser.add_argument("--pr-batch-size", type=int, default=10000, help="precision/recall: block edge")
    parser.add_argument("--is-splits", type=int, default=_IS_SPLITS, help="IS: number of splits")
    parser.add_argument(
        "--allow-size-mismatch", action="store_true", default=False,
        help="score even if samples and reference have different HxW",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the KID subset draws (np.random.RandomState, as torch-fidelity)"
    )
    parser.add_argument("--no-progress", action="store_true", default=False, help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the report (also written to --json).

    The summary line goes to stdout, or to stderr with ``--json -`` so stdout is pure JSON.
    """
    args = build_parser().parse_args(argv)
    try:
        result = score(
            args.samples, args.ref, args.inception_weights, batch_size=args.batch_size, device=args.device,
            cache_dir=args.cache_dir, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            pr_k=args.pr_k, pr_batch_size=args.pr_batch_size, is_splits=args.is_splits,
            allow_size_mismatch=args.allow_size_mismatch, seed=args.seed, progress=not args.no_progress,
        )
    except (ScoreError, InceptionWeightsError) as e:
        raise SystemExit(f"error: {e}") from e
    text = json.dumps(result, indent=2)
    if args.json == "-":
        print(text, flush=True)
    elif args.json is not None:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    print(summary_line(result), file=sys.stderr if args.json == "-" else sys.stdout)
    return result


if __name__ == "__main__":
    main()
