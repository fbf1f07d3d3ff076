"""ImageNet-style image folders (``root/<class>/<image>``) with the ADM/DiT center crop."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .items import DatasetError, SampleKey, content_digest, flip_from_seed, split_key

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "center_crop_adm"]

# Lower-case suffixes read by ImageFolderDataset (ImageNet's files are ``.JPEG``).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})


def center_crop_adm(image: Image.Image, image_size: int) -> Image.Image:
    """ADM/DiT center crop: box-halve, bicubic-resize the short side to ``image_size``, crop.

    Halving with a BOX filter while the short side stays >= ``2 * image_size`` is a cheap
    anti-aliased pre-shrink; the final BICUBIC step then covers at most a factor of two. This
    reproduces the preprocessing the official DiT/MDT checkpoints and FID references used, so
    its arithmetic (integer halving, ``round`` of the scaled size, floor of the crop offset) is
    kept exactly.

    Args:
        image: any PIL image (mode is kept).
        image_size: side of the square output.

    Returns:
        An ``image_size`` x ``image_size`` PIL image.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(size, resample=Image.Resampling.BICUBIC)  # a no-op copy when size is unchanged
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _image_files(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, symlinks followed), sorted, relative to it.

    Hidden files are skipped: macOS ``._name.JPEG`` resource forks would otherwise be read as
    (corrupt) images.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/.../<file>``; class index = position in the sorted folder names.

    Unreadable images raise :class:`DatasetError` naming the file; nothing is skipped, because a
    skipped file would shift every later index and break exact resume and latent extraction.
    Remove or replace the file and restart.

    Args:
        root: dataset root (e.g. ``imagenet/train``) with one sub-folder per class.
        image_size: side of the square output (ADM center crop, :func:`center_crop_adm`).
        hflip: flip items drawn with an odd sample seed (see :func:`flip_from_seed`).

    Items:
        ``x`` (3, image_size, image_size) float32 in [-1, 1]; ``y`` 0-d int64 class index.
    """

    in_channels = 3

    def __init__(self, root: str | Path, image_size: int = 256, hflip: bool = True) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"image folder {self.root} does not exist or is not a folder")
        entries = os.scandir(self.root)
        self.classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise DatasetError(
                f"{self.root} has no class sub-folders: expected the ImageNet layout root/<class>/<image>"
            )
        paths: list[str] = []
        labels: list[int] = []
        empty = []
        for label, name in enumerate(self.classes):
            files = _image_files(self.root / name)
            if not files:
                empty.append(name)
            paths.extend(os.path.join(name, f) for f in files)
            labels.extend([label] * len(files))
        if not paths:
            suffixes = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"no images under {self.root} (looked for {suffixes} in its class folders)")
        if empty:
            shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
            raise DatasetError(
                f"{len(empty)} class folder(s) of {self.root} hold no images ({shown}): labels are folder "
                "positions, so an empty class is likely an incomplete copy; fill or remove them"
            )
        # Fixed-width numpy arrays instead of Python lists: forked DataLoader workers would
        # otherwise touch (and copy) a million refcounted objects each.
        self._paths = np.array([p.encode() for p in paths], dtype=np.bytes_)
        self._labels = np.array(labels, dtype=np.int64)
        self.image_size = image_size
        self.input_size = image_size
        self.num_classes = len(self.classes)
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self._paths)

    def fingerprint(self) -> str:
        """Hash of the (label, relative path, size in bytes) list: one ``stat`` per file, no reads.

        Detects added, removed, renamed or relabelled images and a file replaced by one of another
        size; an image rewritten in place with exactly the same size is not detected.
        """
        def rows():
            yield b"image_folder"
            for i in range(len(self)):
                name = self.relative_path(i)
                size = os.stat(self.root / name).st_size
                yield f"{int(self._labels[i])}\t{name}\t{size}".encode()

        return content_digest(rows())

    def relative_path(self, index: int) -> str:
        """Path of item ``index`` relative to ``root`` (``<class>/<file>``)."""
        return self._paths[index].decode()

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels in item order."""
        return self._labels

    def load(self, index: int) -> Image.Image:
        """Decoded RGB image of item ``index`` (before cropping).

        Raises:
            DatasetError: naming the file, when it cannot be opened or decoded.
        """
        path = self.root / self.relative_path(index)
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # forces a full decode; L/CMYK/RGBA/P -> RGB
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise DatasetError(
                f"cannot read image {path}: {type(err).__name__}: {err}. Delete or replace the file "
                "(files are never skipped, so indices stay fixed)"
            ) from err

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = split_key(key, len(self))
        image = center_crop_adm(self.load(index), self.image_size)
        x = torch.from_numpy(np.array(image))  # (H, W, 3) uint8; np.array copies, so it is writable
        x = x.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]
        if self.hflip and flip_from_seed(seed):
            x = x.flip(-1)
        return x, torch.tensor(self._labels[index], dtype=torch.int64)
