"""Score an ADM-format sample set on ADM's evaluator protocol: FID, sFID, IS, precision/recall (k=3), KID.

The library behind ``python -m sampling.score`` (its command line: :mod:`shd_diffusion.commands.score`);
:func:`score` returns the JSON-able report, :func:`summary_line` its headline numbers.

Inputs:
    samples  ``.npz`` whose ``arr_0`` is uint8 (N, H, W, 3) (``arr_1`` labels are allowed and
             ignored), streamed batch by batch (:mod:`.images`).
    --ref    one of
             * an ADM reference batch ``.npz`` (``arr_0`` images; ``mu``/``sigma`` and
               ``mu_s``/``sigma_s`` over the ImageNet training set): FID and sFID are measured against
               the stored statistics, as ADM's evaluator does (protocol ``adm-stored-stats``);
               precision/recall and KID against the features of its ``arr_0`` images.
               ``--recompute-ref-stats`` measures FID against the ``arr_0`` statistics instead
               (``recomputed-from-arr_0``; sFID is then not computed);
             * a folder of .png / .jpg / .jpeg images (searched recursively; converted to RGB:
               grayscale replicated to 3 channels, alpha dropped), or an ``.npz`` with ``arr_0`` and
               no stored statistics (``reference-images``);
             * a statistics file written by this tool (``stats-file``; see below).

Features come from torch-fidelity's FID Inception (uint8 NCHW in, TF-exact resize to 299 inside):
pool3 ('2048') for FID, KID and precision/recall, 'logits_unbiased' for IS, and for sFID the hooked
``Mixed_6d.branch1x1`` output (TF ``mixed_6/conv``), channels 0..6 in TF's (H, W, C) order. With
converted no-logits weights (scripts/convert_inception.py) IS is reported as null with the reason.
The report records, for every figure, its protocol, reference, feature extractor and weights sha256.

Bad input is a :class:`~.images.ScoreError` naming the cause and the fix, raised before anything is
written; the cache folder is checked before any feature is computed.

Reference statistics are computed once and cached in ``--cache-dir`` as
``<ref name>-<key16>.npz`` where key = sha256 of (format, resolved ref path, its size + mtime —
for a folder every image's relative path, size and mtime —, weights sha256). The file
(format ``shd_diffusion.ref_stats/v1``) holds ``format``, ``mu`` (D,) and ``sigma`` (D, D) float64,
``features`` (N, D) float32 (for precision/recall and KID), ``image_hw``, ``weights_sha256``,
``feature_extractor`` and ``source``; it can itself be passed as ``--ref``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..cli import check_writable_dir, describe_os_error
from ..console import say
from ..fileio import atomic_path
from . import metrics
from .images import (
    ARCHIVE_ERRORS,
    ScoreError,
    count_hw,
    folder_images,
    image_batches,
    iter_folder,
    open_npz_images,
    read_rgb,
)
from .inception import (
    FEATURE_EXTRACTOR_NAME,
    SPATIAL_DIM,
    WeightsInfo,
    capture_spatial,
    default_weights_path,
    inspect_weights,
    load_feature_extractor,
)

STATS_FORMAT = "shd_diffusion.ref_stats/v1"
DEFAULT_CACHE_DIR = (
    Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shd_diffusion" / "ref_stats"
)
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity feature names
SPATIAL = "spatial"  # ADM's sFID features (mixed_6/conv[..., :7]), captured by a hook
POOL_DIM = 2048
PR_K = 3  # precision/recall neighbourhood size (ADM)
IS_SPLITS = 10  # Inception Score splits (ADM)


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
    spatial: bool = False,
) -> dict[str, np.ndarray]:
    """Run the extractor over uint8 (B, H, W, 3) batches.

    Args:
        batches: iterator of uint8 NHWC batches.
        total: number of images (for the progress bar).
        extractor: torch-fidelity extractor built with ``features == names``.
        device: where to send the batches.
        names: the extractor's feature names, in its order.
        spatial: also return ADM's sFID features under ``SPATIAL`` (see ``capture_spatial``).

    Returns:
        {name: float32 (N, dim)} for every name (and ``SPATIAL``: (N, 2023) if asked).
    """
    out: dict[str, list[np.ndarray]] = {n: [] for n in [*names, *[SPATIAL] * spatial]}
    hook = capture_spatial(extractor) if spatial else contextlib.nullcontext([])
    with hook as captured, tqdm(total=total, desc=desc, unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in batches:
            x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
            x = x.to(device)
            for n, f in zip(names, extractor(x)):
                out[n].append(f.float().cpu().numpy())  # (B, dim)
            if spatial:
                out[SPATIAL].append(captured.pop().cpu().numpy())  # (B, 2023)
            bar.update(len(batch))
    return {n: np.concatenate(v) for n, v in out.items()}  # {name: (N, dim)}


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
        """Write atomically (``fileio.atomic_path``): an interrupted run never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
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

    @staticmethod
    def load(path: Path) -> RefStats:
        """Read a statistics file written by :meth:`save` (no pickle); ScoreError if it is not one."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != STATS_FORMAT:
                    raise ScoreError(f"{path}: not a {STATS_FORMAT} statistics file")
                hw = (int(z["image_hw"][0]), int(z["image_hw"][1]))
                sha, source = str(z["weights_sha256"]), str(z["source"])
                return RefStats(z["mu"], z["sigma"], z["features"], hw, sha, source)
        except ScoreError:
            raise
        except (*ARCHIVE_ERRORS, KeyError, IndexError) as e:  # KeyError: a member is missing
            raise ScoreError(
                f"{path}: unreadable {STATS_FORMAT} statistics file ({type(e).__name__}: {e}); "
                "pass the reference images as --ref instead (their statistics are then recomputed)"
            ) from e


@dataclass(frozen=True)
class StoredStats:
    """The TF-Inception statistics an ADM reference batch stores beside its ``arr_0`` images.

    ``mu``/``sigma`` are pool3 (2048-d) over the whole ImageNet training set; ``mu_s``/``sigma_s``
    (2023-d spatial, for sFID) are None when absent, with the reason in ``spatial_missing``.
    """

    mu: np.ndarray  # (2048,)
    sigma: np.ndarray  # (2048, 2048)
    mu_s: np.ndarray | None  # (2023,)
    sigma_s: np.ndarray | None  # (2023, 2023)
    spatial_missing: str | None


def _stored_pair(z: np.lib.npyio.NpzFile, mu_key: str, sigma_key: str, dim: int, what: str) -> tuple:
    """(mu, sigma) as float64 after checking shapes and finiteness; ScoreError names the fix."""
    mu, sigma = z[mu_key], z[sigma_key]
    fix = "pass ADM's reference batch unchanged, or --recompute-ref-stats to use its arr_0 images instead"
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ScoreError(
            f"{what}: stored {mu_key} {mu.shape} / {sigma_key} {sigma.shape}, expected ({dim},) / "
            f"({dim}, {dim}) for {FEATURE_EXTRACTOR_NAME}; {fix}"
        )
    if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
        raise ScoreError(f"{what}: stored {mu_key}/{sigma_key} are {mu.dtype}/{sigma.dtype}, not numbers; {fix}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ScoreError(f"{what}: stored {mu_key}/{sigma_key} contain NaN or inf; {fix}")
    return mu, sigma


def read_stored_stats(path: Path, keys: Sequence[str]) -> StoredStats | None:
    """The stored statistics of an ADM reference batch, or None if it stores no ``mu``/``sigma``.

    Raises:
        ScoreError: only one of a pair is present, or a shape, dtype or value is wrong.
    """
    what = f"--ref {path}"
    for a, b in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (a in keys) != (b in keys):
            have, lack = (a, b) if a in keys else (b, a)
            raise ScoreError(
                f"{what}: stores '{have}' but not '{lack}'; pass ADM's reference batch unchanged, "
                "or --recompute-ref-stats to use its arr_0 images instead"
            )
    if "mu" not in keys:
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = _stored_pair(z, "mu", "sigma", POOL_DIM, what)
            if "mu_s" not in keys:
                return StoredStats(mu, sigma, None, None, f"{path.name} stores no mu_s/sigma_s")
            mu_s, sigma_s = _stored_pair(z, "mu_s", "sigma_s", SPATIAL_DIM, what)
    except ScoreError:
        raise
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise ScoreError(f"{what}: the archive is corrupt ({type(e).__name__}: {e}); re-download it") from e
        raise ScoreError(  # an object array: a pickle, refused unread
            f"{what}: its stored statistics are pickled Python objects, which are refused (loading them "
            "could run code); use ADM's reference batch as published, or --recompute-ref-stats"
        ) from e
    except ARCHIVE_ERRORS as e:
        raise ScoreError(f"{what}: the archive is corrupt ({type(e).__name__}: {e}); re-download it") from e
    return StoredStats(mu, sigma, mu_s, sigma_s, None)


def reference_cache_key(ref: str | os.PathLike, weights_sha256: str) -> str:
    """sha256 over (format, resolved path, size + mtime of the file or of every folder image, weights).

    Any edit to the reference or a different weights file yields a different key.
    """
    ref = Path(ref).resolve()
    files = folder_images(ref) if ref.is_dir() else [ref]
    stamp = [(str(p.relative_to(ref.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    blob = json.dumps([STATS_FORMAT, str(ref), stamp, weights_sha256])
    return hashlib.sha256(blob.encode()).hexdigest()


def _npz_files(path: Path) -> list[str]:
    """Member names of an ``.npz`` (no array is read); ScoreError if it is not a readable one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except ARCHIVE_ERRORS as e:
        raise ScoreError(
            f"--ref {path}: not a readable .npz ({type(e).__name__}: {e}); the file is truncated or not "
            "an np.savez archive: re-download or re-create it"
        ) from e


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


def _classify_ref(ref: Path) -> tuple[str, list[str]]:
    """(kind, npz keys) of a --ref: 'stats', 'adm_npz' or 'folder'; ScoreError for anything else."""
    if not ref.exists():
        raise ScoreError(f"--ref {ref} not found")
    if ref.is_dir():
        return "folder", []
    if not ref.is_file():
        raise ScoreError(f"--ref {ref}: expected an .npz file or an image folder")
    keys = _npz_files(ref)
    if "format" in keys:
        return "stats", keys
    if "arr_0" not in keys:
        tf_only = {"mu", "sigma"} <= set(keys)
        extra = (" It stores mu/sigma only; precision/recall and KID need the reference images." * tf_only)
        raise ScoreError(
            f"--ref {ref}: no 'arr_0' images (keys: {keys}).{extra} Pass the ADM reference batch with "
            "its arr_0 images, an image folder, or a statistics file written by this tool"
        )
    return "adm_npz", keys


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
    """Statistics and pool3 features of the reference images: a stats file, the cache, or computed.

    These are this package's own features of the images (``arr_0`` of an ADM batch); a batch's
    stored TF statistics are read separately (:func:`read_stored_stats`). Sizes, counts and the
    cache folder are checked before any Inception forward.

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
    kind, _ = _classify_ref(ref)
    info = {"path": str(ref.resolve()), "kind": kind, "cache_path": None, "cache_hit": False}
    stats = None
    if kind == "stats":
        stats = RefStats.load(ref)
        if stats.weights_sha256 != weights.sha256:
            raise ScoreError(
                f"--ref {ref} was computed with Inception weights sha256 {stats.weights_sha256[:12]}..., "
                f"scoring uses {weights.sha256[:12]}... ({weights.path}); pass the reference images "
                "instead or the matching --inception-weights"
            )
    else:
        key = reference_cache_key(ref, weights.sha256)
        cache_path = Path(cache_dir) / f"{ref.stem or ref.name}-{key[:16]}.npz"
        info["cache_path"] = str(cache_path)
        if cache_path.is_file():
            try:
                stats = RefStats.load(cache_path)
                info["cache_hit"] = stats.weights_sha256 == weights.sha256  # the key already implies it
            except ScoreError as e:  # a damaged cache entry is recomputed, not fatal
                say(f"ignoring the cache entry: {e}", "score", err=True)
    if kind == "stats" or info["cache_hit"]:
        if info["cache_hit"]:
            say(f"reference statistics from cache {cache_path}", "score", err=True)
        _check_hw(sample_hw, stats.image_hw, allow_size_mismatch)
        _check_count(len(stats.features), f"reference {ref}", min_images)
        return stats, info

    if kind == "adm_npz":
        images = open_npz_images(ref, what="--ref")  # streamed: ADM's 10k reference is 2 GB of pixels
        n, hw = count_hw(images)
        batches = image_batches(images, batch_size)
    else:
        files = folder_images(ref)
        hw = read_rgb(files[0]).shape[:2]
        n, batches = len(files), iter_folder(files, batch_size, hw)
    hw = (int(hw[0]), int(hw[1]))
    _check_hw(sample_hw, hw, allow_size_mismatch)
    _check_count(n, f"reference {ref}", min_images)
    check_writable_dir(cache_path.parent, "--cache-dir")  # before the work whose result it keeps
    feats = extract_features(batches, n, extractor, device, names, desc="reference", progress=progress)[POOL]
    mu, sigma = metrics.feature_stats(feats)
    stats = RefStats(mu, sigma, feats, hw, weights.sha256, str(ref.resolve()))
    try:
        stats.save(cache_path)
        say(f"reference statistics cached at {cache_path}", "score", err=True)
    except OSError as e:  # the cache only saves time: a full disk must not cost the scores
        say(f"could not cache the reference statistics ({describe_os_error(e)}); continuing without", "score",
            err=True)
    return stats, info


# ------------------------------------------------------------------------------------------ score

# How each FID protocol is described in the report; only the first is ADM's (papers' numbers).
FID_PROTOCOLS = {
    "adm-stored-stats": "FID against the reference batch's stored mu/sigma (ADM evaluator protocol)",
    "recomputed-from-arr_0": "FID against statistics recomputed from the reference batch's arr_0 images "
    "(--recompute-ref-stats; not ADM's protocol)",
    "reference-images": "FID against statistics of the reference images, which store no mu/sigma "
    "(not ADM's protocol)",
    "stats-file": "FID against a statistics file written by this tool (statistics of its source images; "
    "not ADM's protocol)",
}
_PR_PROTOCOL = "improved precision/recall (Kynkaanniemi et al.), k={k} nearest-neighbour manifolds, float32 distances"


def check_settings(batch_size: int, kid_subsets: int, kid_subset_size: int, pr_k: int,
                   pr_batch_size: int, is_splits: int, seed: int) -> None:
    """Refuse settings that would crash late or report a meaningless number (e.g. k=0: precision 1.0)."""
    least = {"--batch-size": (batch_size, 1), "--kid-subsets": (kid_subsets, 1),
             "--kid-subset-size": (kid_subset_size, 2), "--pr-k": (pr_k, 1),
             "--pr-batch-size": (pr_batch_size, 1), "--is-splits": (is_splits, 1), "--seed": (seed, 0)}
    why = {"--kid-subset-size": " (KID's unbiased estimate needs at least 2)",
           "--pr-k": " (k = 0 makes every radius 0; ADM uses k = 3)"}
    for flag, (value, low) in least.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ScoreError(f"{flag} {value}: must be an integer >= {low}{why.get(flag, '')}")
    if seed >= 2**32:
        raise ScoreError(f"--seed {seed}: must be < 2**32 (np.random.RandomState seeds the KID subsets)")


def resolve_device(device: str) -> str:
    """'auto' -> cuda if available else cpu; ScoreError for a device torch does not know or lacks."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ScoreError(f"--device {device!r}: not a torch device ({e}); use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScoreError(f"--device {device}: CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ScoreError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    return device


def _fid_against(pool: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray) -> float:
    """FID of (N, D) sample features against (mu_r, sigma_r)."""
    mu, sigma = metrics.feature_stats(pool)
    # Fewer samples than feature dims: the centred features are an exact, cheap factor of sigma.
    factor = metrics.covariance_factor(pool) if len(pool) <= pool.shape[1] else None
    return metrics.frechet_distance(mu, sigma, mu_r, sigma_r, factor1=factor)


def _fid_reference(kind: str, stored: StoredStats | None, has_stored: bool, ref_stats: RefStats,
                   ref_desc: str) -> tuple[str, np.ndarray, np.ndarray, str]:
    """(protocol, mu, sigma, reference description) of the statistics FID is measured against.

    ``stored`` is None when the reference stores none or ``--recompute-ref-stats`` set them aside
    (then ``has_stored``).
    """
    if stored is not None:
        return "adm-stored-stats", stored.mu, stored.sigma, f"stored mu/sigma of {ref_desc}"
    if kind == "stats":
        return "stats-file", ref_stats.mu, ref_stats.sigma, f"statistics file {ref_desc} (of {ref_stats.source})"
    protocol = "recomputed-from-arr_0" if has_stored else "reference-images"
    return protocol, ref_stats.mu, ref_stats.sigma, f"{len(ref_stats.features)} images of {ref_desc}"


def _sfid_unavailable(kind: str, stored: StoredStats | None, has_stored: bool) -> str | None:
    """Why sFID is not computed, or None when the reference's stored mu_s/sigma_s are used."""
    if stored is None and has_stored:
        return "--recompute-ref-stats: sFID is computed only against a reference batch's stored mu_s/sigma_s"
    if stored is None:
        return (f"the reference ({kind}) stores no mu_s/sigma_s: sFID is computed only against an ADM "
                "reference batch's stored spatial statistics")
    return stored.spatial_missing


def score(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 200,
    device: str = "auto",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = PR_K,
    pr_batch_size: int = 10000,
    is_splits: int = IS_SPLITS,
    allow_size_mismatch: bool = False,
    seed: int = 0,
    progress: bool = True,
    recompute_ref_stats: bool = False,
) -> dict:
    """Compute FID, sFID, IS, precision/recall and KID of ``samples`` against ``ref``.

    With an ADM reference batch, FID (and sFID) are measured against its stored statistics unless
    ``recompute_ref_stats``; precision/recall and KID always use its ``arr_0`` images' features.

    Args:
        samples, ref, ...: as ``python -m sampling.score --help`` (same names, same defaults);
        ``progress=False`` is ``--no-progress``.

    Returns:
        The JSON-able report: fid, fid_protocol, sfid, sfid_unavailable_reason, is_mean, is_std,
        is_unavailable_reason, precision, recall, kid_mean, kid_std, num_samples, num_ref, image_hw,
        samples, ref {path, kind, cache_path, cache_hit, stored_stats}, weights {path, sha256,
        logits_available}, feature_extractor, provenance {figure: {protocol, reference,
        feature_extractor, features, weights_sha256}}, settings.
    """
    check_settings(batch_size, kid_subsets, kid_subset_size, pr_k, pr_batch_size, is_splits, seed)
    device = resolve_device(device)
    needs = required_images(pr_k, kid_subset_size)
    images = open_npz_images(samples)  # header only: pixels are streamed batch by batch
    num_samples, sample_hw = count_hw(images)
    _check_count(num_samples, f"samples {samples}", needs)
    kind, keys = _classify_ref(Path(ref))  # refusals about the reference come before any weights load
    has_stored = kind == "adm_npz" and ("mu" in keys or "sigma" in keys)
    # --recompute-ref-stats sets stored statistics aside unread, so it is also the way past bad ones.
    stored = read_stored_stats(Path(ref), keys) if kind == "adm_npz" and not recompute_ref_stats else None
    sfid_reason = _sfid_unavailable(kind, stored, has_stored)

    extractor, weights, names = _feature_extractor(inception_weights, device)
    ref_stats, ref_info = reference_stats(
        ref, extractor, weights, cache_dir, sample_hw, needs, batch_size, device, names,
        allow_size_mismatch, progress,
    )
    num_ref = len(ref_stats.features)
    batches = image_batches(images, batch_size)
    feats = extract_features(batches, num_samples, extractor, device, names, "samples", progress,
                             spatial=sfid_reason is None)
    pool = feats[POOL]  # (N, 2048)
    protocol, mu_r, sigma_r, fid_ref = _fid_reference(kind, stored, has_stored, ref_stats, str(ref))
    say(f"FID protocol: {protocol}: {FID_PROTOCOLS[protocol]}", "score", err=True)
    fid = _fid_against(pool, mu_r, sigma_r)
    sfid = None if sfid_reason is not None else _fid_against(feats[SPATIAL], stored.mu_s, stored.sigma_s)

    is_mean, is_std, is_reason = _inception_score(feats, weights, is_splits)
    precision, recall = metrics.precision_recall(
        ref_stats.features, pool, k=pr_k, batch_size=pr_batch_size, device=device
    )
    kid_mean, kid_std = metrics.kernel_inception_distance(  # both set sizes were checked above
        pool, ref_stats.features, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed
    )
    ref_info["stored_stats"] = sorted(k for k in keys if k in ("mu", "sigma", "mu_s", "sigma_s"))
    settings = {"pr_k": pr_k, "is_splits": is_splits, "kid_subsets": kid_subsets,
                "kid_subset_size": kid_subset_size, "seed": seed, "recompute_ref_stats": recompute_ref_stats}
    return {
        "fid": fid, "fid_protocol": protocol, "sfid": sfid, "sfid_unavailable_reason": sfid_reason,
        "is_mean": is_mean, "is_std": is_std, "is_unavailable_reason": is_reason,
        "precision": precision, "recall": recall, "kid_mean": kid_mean, "kid_std": kid_std,
        "num_samples": int(num_samples), "num_ref": int(num_ref),
        "image_hw": [int(sample_hw[0]), int(sample_hw[1])],
        "samples": str(Path(samples).resolve()), "ref": ref_info,
        **_provenance(weights, protocol, fid_ref, sfid_reason, f"stored mu_s/sigma_s of {ref}", is_reason,
                      _ref_images_desc(kind, ref, ref_stats), settings),
        "settings": settings,
    }


def _feature_extractor(
    inception_weights: str | os.PathLike | None, device: str
) -> tuple[torch.nn.Module, WeightsInfo, list[str]]:
    """The Inception extractor, its weights' info and its feature names (logits only when the
    weights have them). ``None`` = torch-fidelity's own download, hashed where torch.hub cached it."""
    weights = inspect_weights(inception_weights) if inception_weights is not None else None
    names = [POOL, LOGITS] if weights is None or weights.logits_available else [POOL]
    extractor = load_feature_extractor(inception_weights, device=device, features=names)
    if weights is None:
        weights = inspect_weights(default_weights_path())
    return extractor, weights, names


def _inception_score(feats: dict[str, np.ndarray], weights: WeightsInfo, splits: int) -> tuple:
    """(mean, std, None), or (None, None, why) when the weights have no logits or samples are too few."""
    if weights.logits_unavailable_reason is not None:
        return None, None, weights.logits_unavailable_reason
    if len(feats[POOL]) < splits:
        return None, None, f"{len(feats[POOL])} samples < is_splits={splits}"
    return (*metrics.inception_score(feats[LOGITS], splits=splits), None)


def _ref_images_desc(kind: str, ref: str | os.PathLike, ref_stats: RefStats) -> str:
    """What precision/recall and KID compare against, for the provenance."""
    where = " (arr_0)" if kind == "adm_npz" else f" (from {ref_stats.source})" if kind == "stats" else ""
    return f"pool3 features of the {len(ref_stats.features)} reference images of {ref}{where}"


def _provenance(weights: WeightsInfo, protocol: str, fid_ref: str, sfid_reason: str | None, sfid_ref: str,
                is_reason: str | None, ref_images: str, settings: dict) -> dict:
    """The report's weights, feature_extractor and provenance: for every figure its protocol,
    reference, feature extractor, features and weights sha256."""
    import torch_fidelity

    extractor = f"torch-fidelity {torch_fidelity.__version__} {FEATURE_EXTRACTOR_NAME}"
    sfid_protocol = ("Frechet distance of spatial features against the reference batch's stored mu_s/sigma_s "
                     "(ADM evaluator protocol)")
    is_protocol = (f"Inception Score over {settings['is_splits']} contiguous splits of the samples' softmax "
                   "(ADM: chunks of 5000, the same split for 50,000 samples)")
    kid_protocol = (f"KID: unbiased MMD^2, cubic kernel, {settings['kid_subsets']} subsets of "
                    f"{settings['kid_subset_size']} (seed {settings['seed']}); not part of ADM's evaluator")
    figures = {  # name: (protocol, reference, features)
        "fid": (FID_PROTOCOLS[protocol], fid_ref, "pool3 (2048-d)"),
        "sfid": (sfid_protocol if sfid_reason is None else f"not computed: {sfid_reason}",
                 sfid_ref if sfid_reason is None else None,
                 "Mixed_6d.branch1x1 = TF mixed_6/conv[..., :7], flattened (17, 17, 7) = 2023-d"),
        "is": (is_protocol if is_reason is None else f"not computed: {is_reason}", None,
               "logits_unbiased (pool3 @ W, no bias, as ADM)"),
        "precision_recall": (_PR_PROTOCOL.format(k=settings["pr_k"]), ref_images, "pool3 (2048-d)"),
        "kid": (kid_protocol, ref_images, "pool3 (2048-d)"),
    }
    return {
        "weights": {"path": weights.path, "sha256": weights.sha256, "logits_available": weights.logits_available},
        "feature_extractor": (f"{extractor}: '{POOL}' (pool3) for FID/KID/PR, '{LOGITS}' for IS, "
                              "Mixed_6d.branch1x1[:7] (TF mixed_6/conv) for sFID"),
        "provenance": {
            name: {"protocol": prot, "reference": ref, "feature_extractor": extractor, "features": feats,
                   "weights_sha256": weights.sha256}
            for name, (prot, ref, feats) in figures.items()
        },
    }


def summary_line(result: dict) -> str:
    """One human-readable line of a :func:`score` report's headline numbers, with the FID protocol."""
    r = result
    is_part = f"IS {r['is_mean']:.2f} +- {r['is_std']:.2f}" if r["is_mean"] is not None else "IS n/a"
    sfid_part = f"sFID {r['sfid']:.3f}" if r["sfid"] is not None else "sFID n/a"
    return (
        f"FID {r['fid']:.3f} ({r['fid_protocol']}) | {sfid_part} | {is_part} | "
        f"precision {r['precision']:.4f} recall {r['recall']:.4f} | "
        f"KID {r['kid_mean']:.5f} +- {r['kid_std']:.5f} | "
        f"{r['num_samples']} samples vs {r['num_ref']} reference"
    )
