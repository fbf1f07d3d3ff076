"""Animal-MNIST, the embedded demo's data: 10,000 real 28x28 silhouettes, 10 classes, in memory."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .items import DatasetError, SampleKey, content_digest, flip_from_seed, split_key

__all__ = ["ANIMAL_MNIST_CLASSES", "AnimalMNIST", "animal_mnist_dir"]

# Label order of the animal_mnist package (checked by eye: 1,000 images per class, sorted).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_ANIMAL_MNIST_DATA = "animal_data_version_3.gz"
_ANIMAL_MNIST_LABELS = "animal_label_version_3.gz"
_ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist==0.4"


def animal_mnist_dir() -> Path:
    """Folder of the installed ``animal_mnist`` package's data files, found without importing it.

    The package's ``__init__`` imports tensorflow, so it is located with ``find_spec`` (which, for
    a top-level package, reads the file system only) and never imported.

    Returns:
        The ``animal_mnist/data/Animal_MNIST`` folder.

    Raises:
        DatasetError: the package is not installed, or its data files are missing.
    """
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the animal_mnist package is not installed: run `{_ANIMAL_MNIST_INSTALL}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    if not (folder / _ANIMAL_MNIST_DATA).is_file():
        raise DatasetError(
            f"animal_mnist is installed but {folder / _ANIMAL_MNIST_DATA} is missing: "
            f"reinstall with `{_ANIMAL_MNIST_INSTALL}`"
        )
    return folder


def _numpy_reconstruct() -> Callable[..., np.ndarray]:
    try:  # numpy >= 2 moved the implementation; `numpy.core` is a deprecated alias there
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _reason(err: BaseException) -> str:
    """An OSError without its errno prefix ('No such file or directory'), other errors as they are."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds plain numpy arrays and refuses every other global.

    Pickle can run arbitrary code; the demo files only need the three globals below, so a file
    that asks for anything else (a tampered or wrong ``root``) fails instead of executing.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected")


def _load_gzip_array(path: Path, fix: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            array = _NumpyArrayUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        raise DatasetError(f"cannot read {path}: {_reason(err)}; {fix}") from err
    if not isinstance(array, np.ndarray):
        raise DatasetError(f"{path} holds a {type(array).__name__}, expected a numpy array")
    return array


class AnimalMNIST(Dataset):
    """The 10,000 Animal-MNIST silhouettes (10 classes x 1,000), held in memory.

    The package ships one un-split set (no train/test files), and all of it is used: the demo is
    generative, and FID reference statistics come from the same 10,000 images.

    Pixels are scaled ``u8 / 127.5 - 1`` to [-1, 1] (0 -> -1 exactly, 255 -> 1 exactly). The
    silhouettes are white on a black (0) background, so the 28x28 images are padded to
    ``image_size`` with -1, i.e. with background; the padding adds no edge. About 4% of the
    silhouettes touch the 28-pixel frame, and stay cut there.

    Args:
        root: folder holding ``animal_data_version_3.gz`` and ``animal_label_version_3.gz``;
            None = the installed ``animal_mnist`` package.
        image_size: output side, >= 28 (extra pixels split evenly, the odd one right/bottom).
        hflip: flip items drawn with an odd sample seed. Off by default: the demo keeps the
            data exactly as shipped.

    Items:
        ``x`` (1, image_size, image_size) float32 in [-1, 1]; ``y`` 0-d int64 in 0..9.
    """

    num_classes = 10
    in_channels = 1
    classes = ANIMAL_MNIST_CLASSES

    def __init__(self, root: str | Path | None = None, image_size: int = 32, hflip: bool = False) -> None:
        if image_size < 28:
            raise DatasetError(
                f"AnimalMNIST image_size {image_size} < 28: the images are 28x28 and are padded, not shrunk"
            )
        folder = Path(root) if root is not None else animal_mnist_dir()
        fix = (f"reinstall with `{_ANIMAL_MNIST_INSTALL}`" if root is None else
               f"data.path={root} must hold the Animal-MNIST files (or be null for the installed package)")
        images = _load_gzip_array(folder / _ANIMAL_MNIST_DATA, fix)  # (N, 28, 28) uint8
        labels = _load_gzip_array(folder / _ANIMAL_MNIST_LABELS, fix)  # (N,) int64
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DatasetError(
                f"{folder / _ANIMAL_MNIST_DATA}: expected (N, 28, 28) uint8, "
                f"got {images.shape} {images.dtype}"
            )
        if labels.shape != (images.shape[0],):
            raise DatasetError(f"{folder}: {images.shape[0]} images but labels of shape {labels.shape}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DatasetError(f"{folder / _ANIMAL_MNIST_LABELS}: labels outside 0..{self.num_classes - 1}")

        self.image_size = image_size
        self.input_size = image_size
        self.hflip = hflip
        pad = image_size - 28
        before, after = pad // 2, pad - pad // 2
        x = torch.from_numpy(images).float().div_(127.5).sub_(1.0)  # (N, 28, 28) in [-1, 1]
        x = F.pad(x, (before, after, before, after), value=-1.0)  # (N, S, S), background border
        self.images = x.unsqueeze(1).contiguous()  # (N, 1, S, S)
        self.labels = torch.from_numpy(labels.astype(np.int64))  # (N,)

    def __len__(self) -> int:
        return self.images.shape[0]

    def fingerprint(self) -> str:
        """Hash of every pixel and label as held (about 50 ms): any change to the data is detected."""
        return content_digest([b"animal_mnist", self.images.numpy().tobytes(), self.labels.numpy().tobytes()])

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = split_key(key, len(self))
        x = self.images[index].clone()  # (1, S, S); a copy, so callers cannot edit the cache
        if self.hflip and flip_from_seed(seed):
            x = x.flip(-1)
        return x, self.labels[index]
