"""The images to score: ADM-format ``.npz`` arrays streamed batch by batch, and image folders.

``arr_0`` of an ``.npz`` is uint8 (N, H, W, 3) (ADM's sample format; grayscale (N, H, W) or
(N, H, W, 1) is replicated to 3 channels). It is read straight from the archive (stored or
deflated) in batches, so 50,000 x 256 x 256 images need memory for one batch, not 9.8 GB. Every
layout error is a :class:`ScoreError` naming the fix, raised from the ``.npy`` header before any
pixel is read.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..cli import BadInput
from ..console import say

__all__ = [
    "ARCHIVE_ERRORS",
    "IMAGE_EXTS",
    "NpzImages",
    "ScoreError",
    "as_rgb_nhwc",
    "check_image_layout",
    "count_hw",
    "folder_images",
    "image_batches",
    "iter_folder",
    "load_samples",
    "open_npz_images",
    "read_rgb",
]

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_READ_CHUNK = 1 << 20  # bytes per read when streaming arr_0


class ScoreError(BadInput, ValueError):
    """Bad inputs to scoring; the message names the problem and the fix."""


# Corrupt archives surface as any of these, from the zip layer, inflate or numpy's header parser.
ARCHIVE_ERRORS = (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


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
        name = f"{self.path}:{self.member[:-4]}"
        try:
            yield from self._batches(batch_size, name)
        except ScoreError:
            raise
        except ARCHIVE_ERRORS as e:  # bad CRC, corrupt deflate stream, I/O error mid-read
            raise ScoreError(
                f"{name}: the archive is corrupt ({type(e).__name__}: {e}); re-create or re-copy the file"
            ) from e

    def _batches(self, batch_size: int, name: str) -> Iterator[np.ndarray]:
        per_image = self.shape[1:]
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
    if path.is_dir():
        raise ScoreError(f"{what} {path} is a folder; pass the .npz file (arr_0 uint8 (N, H, W, 3))")
    if not path.is_file():
        raise ScoreError(f"{what} {path} not found")
    member, name = f"{key}.npy", f"{path}:{key}"
    header, members, stored_bytes = None, [], 0
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
            if member in members:
                stored_bytes = zf.getinfo(member).file_size  # uncompressed size, from the zip directory
                with zf.open(member) as f:
                    header = _read_npy_header(f)
    except ARCHIVE_ERRORS as e:
        # Not a zip, a corrupt header, or a zip compression method Python cannot read.
        raise ScoreError(
            f"{path}: not a readable .npz ({type(e).__name__}: {e}); the file is truncated or corrupt, or not "
            f"np.savez / np.savez_compressed output with {key} uint8 (N, H, W, 3): re-create or re-copy it"
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
        declared = offset + math.prod(shape)  # uint8: one byte per value
        if declared > stored_bytes:  # before any batch is allocated or any forward runs
            raise ScoreError(
                f"{name}: its header declares shape {tuple(shape)} ({declared} bytes) but the archive holds "
                f"{stored_bytes}; the file is truncated or corrupt: re-create or re-copy it"
            )
        if not fortran:
            return NpzImages(path, member, shape, offset)
    say(f"{name}: not a C-order .npy v1/v2 member, so it cannot be streamed: loading it whole", "score",
        err=True)  # diagnostics go to stderr: stdout carries the summary line / JSON
    try:
        with np.load(path, allow_pickle=False) as z:
            return as_rgb_nhwc(z[key], name)
    except ScoreError:
        raise
    except ARCHIVE_ERRORS as e:
        raise ScoreError(f"{name}: the archive is corrupt ({type(e).__name__}: {e}); re-create or re-copy the file") from e


def load_samples(path: str | os.PathLike) -> np.ndarray:
    """Load ADM-format samples whole: ``arr_0`` uint8 (N, H, W, 3) from an ``.npz`` (no pickle).

    Scoring streams instead (:func:`open_npz_images`); this is for small sets and tests.
    """
    images = open_npz_images(path)
    if isinstance(images, np.ndarray):
        return images
    return np.concatenate(list(images.batches(max(images.num_images, 1))))  # (N, H, W, 3)


def folder_images(path: Path) -> list[Path]:
    """The .png / .jpg / .jpeg files under ``path`` (recursive, sorted); ScoreError if none."""
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ScoreError(
            f"reference folder {path} has no {'/'.join(IMAGE_EXTS)} images (searched recursively); "
            "pass a folder of reference images, an ADM reference batch .npz or a statistics file"
        )
    return files


def read_rgb(path: Path) -> np.ndarray:
    """uint8 (H, W, 3) of one reference image; a corrupt or truncated file is named."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # L -> RGB replicates; RGBA drops alpha
    except (OSError, SyntaxError, ValueError, zlib.error, EOFError) as e:  # PIL raises all of these
        raise ScoreError(
            f"reference image {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "replace or remove it from the folder"
        ) from e


def iter_folder(files: list[Path], batch_size: int, hw: tuple[int, int]) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of image files that must all be ``hw``."""
    for i in range(0, len(files), batch_size):
        batch = []
        for f in files[i : i + batch_size]:
            im = read_rgb(f)
            if im.shape[:2] != hw:
                raise ScoreError(
                    f"{f}: size {im.shape[1]}x{im.shape[0]} (WxH) differs from {hw[1]}x{hw[0]} of "
                    f"{files[0].name}; resize the folder to one size first"
                )
            batch.append(im)
        yield np.stack(batch)  # (B, H, W, 3)


def _iter_array(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive slices of at most ``batch_size`` images."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


def image_batches(images: NpzImages | np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of a streamed or an in-memory image set."""
    return images.batches(batch_size) if isinstance(images, NpzImages) else _iter_array(images, batch_size)


def count_hw(images: NpzImages | np.ndarray) -> tuple[int, tuple[int, int]]:
    """(N, (H, W)) of a streamed or an in-memory image set."""
    if isinstance(images, NpzImages):
        return images.num_images, images.image_hw
    return len(images), (int(images.shape[1]), int(images.shape[2]))
