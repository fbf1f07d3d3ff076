"""Datasets, the resumable infinite sampler and the batch loader.

Three datasets share one item protocol: ``dataset[index]`` or ``dataset[(index, sample_seed)]``
returns ``(x, y)`` with ``x`` a float32 tensor and ``y`` a 0-d int64 label. Any randomness in an
item (only the horizontal flip) is a pure function of ``sample_seed``, which the
:class:`InfiniteSampler` derives from ``(seed, epoch, position in the global stream)``. An item
therefore never depends on the DataLoader worker that built it, on the batch size or on the world
size, and a resumed run sees exactly the items the uninterrupted run would have seen.

* :class:`AnimalMNIST` -- the embedded demo: 10,000 real 28x28 silhouettes, 10 classes, in memory.
* :class:`ImageFolderDataset` -- ImageNet-style ``root/<class>/<image>``, ADM center crop.
* :class:`LatentDataset` -- VAE latents written by ``scripts/extract_latents.py``
  (see :mod:`shd_diffusion.latents` for the writer).

:func:`build_dataset` picks one by name; :func:`make_loader` wraps it in a DataLoader driven by
:class:`InfiniteSampler`.
"""

from __future__ import annotations

import bisect
import gzip
import importlib.util
import json
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .cli import BadInput
from .seeding import derive_seed
from .vae import SD_VAE_SCALE_FACTOR  # noqa: F401  old home; training and sampling.sample still import it from here

__all__ = [
    "DatasetError",
    "AnimalMNIST",
    "ImageFolderDataset",
    "LatentDataset",
    "InfiniteSampler",
    "build_dataset",
    "make_loader",
    "center_crop_adm",
    "sample_seed",
    "flip_from_seed",
    "animal_mnist_dir",
    "DATASET_KINDS",
    "ANIMAL_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "LATENT_FORMAT",
    "LATENT_INDEX",
]

# A dataset key: a bare index (no augmentation) or the sampler's (index, sample_seed) pair.
SampleKey = Union[int, tuple[int, int]]

DATASET_KINDS = ("animal_mnist", "image_folder", "latents")

# Label order of the animal_mnist package (checked by eye: 1,000 images per class, sorted).
ANIMAL_MNIST_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_ANIMAL_MNIST_DATA = "animal_data_version_3.gz"
_ANIMAL_MNIST_LABELS = "animal_label_version_3.gz"
_ANIMAL_MNIST_INSTALL = "pip install --no-deps animal-mnist==0.4"

# Lower-case suffixes read by ImageFolderDataset (ImageNet's files are ``.JPEG``).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff"})

# Latent shard folder layout, shared with the writer in shd_diffusion.latents.
LATENT_FORMAT = "shd_latents/1"
LATENT_INDEX = "index.json"


class DatasetError(BadInput, RuntimeError):
    """A dataset cannot be built or an item cannot be read; the message names the file and fix."""


# --------------------------------------------------------------------------------------------
# Seeds and keys
# --------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Per-sample seed of one position of the global sample stream.

    Args:
        seed: the run's data seed.
        epoch: epoch of the position (``position // num_samples``; included so the function is
            self-describing, it is implied by ``position``).
        position: position in the global stream (all ranks interleaved), counted from 0.

    Returns:
        A non-negative 63-bit integer; distinct positions give unrelated seeds.
    """
    return derive_seed("shd-sample", seed, epoch, position)


def flip_from_seed(seed: int | None) -> bool:
    """Whether the sample drawn with ``seed`` is horizontally flipped.

    Bit 0 of a hash output is a fair coin. A bare index (``seed`` None) is never flipped, so
    ``dataset[i]`` is the canonical, un-augmented item.

    Args:
        seed: the sample seed from :class:`InfiniteSampler`, or None.

    Returns:
        True to flip.
    """
    return seed is not None and (seed & 1) == 1


def _split_key(key: SampleKey, length: int) -> tuple[int, int | None]:
    """Normalise a dataset key to ``(index in [0, length), seed or None)``."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"dataset key must be an index or an (index, sample_seed) pair, got {key!r}")
        index, seed = int(key[0]), int(key[1])
    else:
        index, seed = int(key), None
    if index < 0:
        index += length
    if not 0 <= index < length:
        # IndexError (not DatasetError) keeps Python's sequence iteration protocol working.
        raise IndexError(f"index {index} out of range for a dataset of {length} items")
    return index, seed


# --------------------------------------------------------------------------------------------
# AnimalMNIST (embedded demo)
# --------------------------------------------------------------------------------------------


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

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = _split_key(key, len(self))
        x = self.images[index].clone()  # (1, S, S); a copy, so callers cannot edit the cache
        if self.hflip and flip_from_seed(seed):
            x = x.flip(-1)
        return x, self.labels[index]


# --------------------------------------------------------------------------------------------
# ImageFolderDataset (ImageNet layout)
# --------------------------------------------------------------------------------------------


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
        index, seed = _split_key(key, len(self))
        image = center_crop_adm(self.load(index), self.image_size)
        x = torch.from_numpy(np.array(image))  # (H, W, 3) uint8; np.array copies, so it is writable
        x = x.permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W) in [-1, 1]
        if self.hflip and flip_from_seed(seed):
            x = x.flip(-1)
        return x, torch.tensor(self._labels[index], dtype=torch.int64)


# --------------------------------------------------------------------------------------------
# LatentDataset (pre-extracted VAE latents)
# --------------------------------------------------------------------------------------------


def _open_shard(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # missing, truncated or not a safetensors file
        msg = f"cannot open latent shard {path}: {err}; delete it and resume the extraction"
        raise DatasetError(msg) from err


class LatentDataset(Dataset):
    """VAE latents in safetensors shards plus ``index.json``, as written by extract_latents.

    Each shard holds ``latents`` (n, C, h, w) float16/float32 (already multiplied by the VAE
    scale factor), ``labels`` (n,) int64 and, when the index says ``both_flips``, ``latents_flip``:
    the latents of the horizontally flipped images. The item then flips by choosing that tensor
    (a flipped latent is not the latent of a flipped image, so latents are never flipped
    directly; without stored flips there is no flip augmentation).

    Shards are memory-mapped lazily, once per process, so DataLoader workers open their own
    handles; only the labels (8 bytes per item) are read into memory up front. Every shard is
    checked against the index when the dataset is built.

    Args:
        root: the folder passed to ``extract_latents --out``.
        hflip: use the stored flipped latents for items drawn with an odd sample seed.

    Items:
        ``x`` (C, h, w) float32; ``y`` 0-d int64.
    """

    def __init__(self, root: str | Path, hflip: bool = True) -> None:
        self.root = Path(root)
        index_path = self.root / LATENT_INDEX
        if not index_path.is_file():
            raise DatasetError(
                f"{index_path} not found: {self.root} is not a finished latent folder. Run (or resume) "
                "scripts/extract_latents.py with --out pointing there"
            )
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetError(f"cannot parse {index_path}: {err}") from err
        found = index.get("format") if isinstance(index, dict) else None
        if found != LATENT_FORMAT:
            raise DatasetError(f"{index_path}: format {found!r}, expected {LATENT_FORMAT!r}")
        self.index = index
        self.image_size = int(index["image_size"])
        self.scale_factor = float(index["scale_factor"])
        self.both_flips = bool(index["both_flips"])
        self.latent_shape = tuple(int(s) for s in index["latent_shape"])  # (C, h, w)
        self.classes = list(index["classes"])
        self.num_classes = len(self.classes)
        self.in_channels = self.latent_shape[0]
        self.input_size = self.latent_shape[1]
        self.hflip = hflip

        self.shard_names = [str(s["name"]) for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        self._starts = np.cumsum([0] + counts[:-1]).tolist()  # first global index of each shard
        labels = [self._check_shard(name, count) for name, count in zip(self.shard_names, counts)]
        self.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)  # (N,)
        if len(self.labels) != int(index["num_images"]):
            raise DatasetError(
                f"{index_path}: shards hold {len(self.labels)} items, index says {index['num_images']}"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(f"{self.root}: labels outside 0..{self.num_classes - 1}")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _check_shard(self, name: str, count: int) -> torch.Tensor:
        """Validate one shard's keys and shapes against the index; return its labels (n,)."""
        path = self.root / name
        handle = _open_shard(path)
        keys = set(handle.keys())
        needed = {"latents", "labels"} | ({"latents_flip"} if self.both_flips else set())
        if not needed <= keys:
            raise DatasetError(
                f"latent shard {path} lacks {sorted(needed - keys)}; delete it and resume the extraction"
            )
        want = [count, *self.latent_shape]
        for key in sorted(needed - {"labels"}):
            shape = list(handle.get_slice(key).get_shape())
            if shape != want:
                raise DatasetError(
                    f"latent shard {path}: {key} has shape {shape}, expected {want} from {LATENT_INDEX} "
                    "(shards from different runs mixed?); delete the shard and resume the extraction"
                )
        labels = handle.get_tensor("labels")
        if list(labels.shape) != [count]:
            raise DatasetError(
                f"latent shard {path}: labels have shape {list(labels.shape)}, expected [{count}]"
            )
        return labels.to(torch.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict[str, Any]:
        # safetensors handles cannot be pickled (spawned workers); each process reopens its own.
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, shard: int) -> Any:
        if os.getpid() != self._pid:  # forked worker: inherited handles must not be shared
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = _open_shard(self.root / self.shard_names[shard])
        return self._handles[shard]

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = _split_key(key, len(self))
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        name = "latents_flip" if self.both_flips and self.hflip and flip_from_seed(seed) else "latents"
        x = self._handle(shard).get_slice(name)[local : local + 1]  # (1, C, h, w), read from the mmap
        return x[0].float(), self.labels[index]


# --------------------------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------------------------


class InfiniteSampler(Sampler):
    """Endless, resumable stream of ``(index, sample_seed)`` pairs for one rank.

    The global stream is the concatenation of epochs; epoch ``e`` is a permutation of
    ``range(num_samples)`` drawn from a ``torch.Generator`` seeded by a hash of ``(seed, e)``
    (identity order when ``shuffle`` is False). Global position ``p`` carries
    ``sample_seed(seed, p // num_samples, p)``. Rank ``r`` of ``world_size`` takes positions
    ``r, r + world_size, r + 2 * world_size, ...``, so the ranks together see every index exactly
    once per epoch.

    The sampler has no hidden state: its output is a function of its arguments only, and
    ``start`` (items this rank already consumed, e.g. ``step * per_rank_batch``) resumes the
    stream exactly. Every call to ``iter`` restarts at ``start``. The permutation is
    reproducible for a given torch version (``torch.randperm``'s CPU algorithm).

    Args:
        num_samples: dataset length (> 0).
        rank: this process's rank.
        world_size: number of processes.
        seed: data-order seed.
        shuffle: permute each epoch (False: 0..N-1 every epoch; seeds still differ).
        start: items of this rank's stream to skip.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise DatasetError("the dataset is empty: InfiniteSampler needs at least one item")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"start {start} must be >= 0 (items this rank already consumed)")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.start = start

    def epoch_order(self, epoch: int) -> list[int]:
        """The index order of ``epoch`` (a permutation of ``range(num_samples)``)."""
        if not self.shuffle:
            return list(range(self.num_samples))
        gen = torch.Generator().manual_seed(derive_seed("shd-epoch", self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = self.num_samples
        local = self.start
        epoch, order = -1, []
        while True:
            position = self.rank + local * self.world_size  # in the global stream
            e, i = divmod(position, n)
            if e != epoch:  # one permutation per epoch, computed when the stream enters it
                epoch, order = e, self.epoch_order(e)
            yield order[i], sample_seed(self.seed, e, position)
            local += 1


# --------------------------------------------------------------------------------------------
# Factory and loader
# --------------------------------------------------------------------------------------------


def build_dataset(kind: str, path: str | Path | None, image_size: int, hflip: bool | None = None) -> Dataset:
    """Build a dataset by kind name.

    Every returned dataset has ``num_classes``, ``in_channels`` and ``input_size`` (side of ``x``:
    the pixel size, or the latent size for ``latents``).

    Args:
        kind: ``"animal_mnist"``, ``"image_folder"`` or ``"latents"``.
        path: data folder; for ``animal_mnist`` None means the installed package.
        image_size: pixel size. For ``latents`` it must equal the size the latents were
            extracted at (latents of a 256 px image are 32x32 for the SD VAE).
        hflip: random horizontal flips; None = the kind's default (off for the demo, on
            otherwise; ``latents`` flip only when both flips were stored).

    Returns:
        The dataset.

    Raises:
        DatasetError: unknown kind, missing path, or an image size mismatch.
    """
    if kind == "animal_mnist":
        return AnimalMNIST(path, image_size=image_size, hflip=bool(hflip))
    if kind not in DATASET_KINDS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(DATASET_KINDS)}")
    if path is None:
        raise DatasetError(f"dataset kind {kind!r} needs a path (data.path)")
    flip = True if hflip is None else hflip
    if kind == "image_folder":
        return ImageFolderDataset(path, image_size=image_size, hflip=flip)
    dataset = LatentDataset(path, hflip=flip)
    if dataset.image_size != image_size:
        raise DatasetError(
            f"latents in {path} were extracted from {dataset.image_size} px images, but image_size is "
            f"{image_size}: set data.image_size={dataset.image_size} or extract latents at {image_size}"
        )
    return dataset


def _stack_items(items: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(x, y)`` items into ``(x (B, C, H, W), y (B,) int64)``."""
    xs, ys = zip(*items)
    return torch.stack(xs), torch.stack([torch.as_tensor(y, dtype=torch.int64) for y in ys])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start: int = 0,
    num_workers: int = 0,
    *,
    shuffle: bool = True,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless iterator of batches of this rank's share of the sample stream.

    Batches depend only on the arguments, never on ``num_workers`` (items take their randomness
    from the sample seed, and the DataLoader keeps sampler order), so no worker seeding is
    needed. Resuming after ``k`` batches: pass ``start = k * batch_size``.

    Args:
        dataset: a dataset of this module (keys may be ``(index, sample_seed)`` pairs).
        batch_size: items per batch on this rank.
        rank: this process's rank.
        world_size: number of processes.
        seed: data-order seed (see :class:`InfiniteSampler`).
        start: items this rank already consumed.
        num_workers: DataLoader worker processes (0 = load in this process).
        shuffle: shuffle each epoch.
        pin_memory: page-lock batches for faster host-to-GPU copies.

    Returns:
        An iterator yielding ``(x (B, C, H, W), y (B,))`` tuples; item ``i`` of batch ``k`` is the
        dataset item at this rank's sampler key ``k * batch_size + i``.

    Raises:
        DatasetError: when the dataset is empty.
    """
    if len(dataset) == 0:
        raise DatasetError(f"cannot make a loader for an empty {type(dataset).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} must be >= 1")
    sampler = InfiniteSampler(
        len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, start=start
    )
    loader = DataLoader(
        dataset,  # the sampler's keys are (index, sample_seed) pairs, which every dataset here takes
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=_stack_items,
        pin_memory=pin_memory,
    )
    return iter(loader)
