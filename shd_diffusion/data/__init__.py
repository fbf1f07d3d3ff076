"""Data: three datasets with one item protocol, and the resumable stream that feeds training.

Every dataset takes ``dataset[index]`` or ``dataset[(index, sample_seed)]`` and returns ``(x, y)``
(:mod:`.items`); any randomness in an item is a pure function of the sample seed, which
:class:`InfiniteSampler` derives from ``(seed, epoch, position in the global stream)``
(:mod:`.stream`). So an item never depends on the DataLoader worker, the batch size or the world
size, and a resumed run sees exactly the items the uninterrupted run would have seen.

* :class:`AnimalMNIST` (:mod:`.animal_mnist`) -- the embedded demo: 10,000 real 28x28 silhouettes.
* :class:`ImageFolderDataset` (:mod:`.image_folder`) -- ImageNet-style ``root/<class>/<image>``, ADM center crop.
* :class:`LatentDataset` (:mod:`.latent_folder`) -- VAE latents written by ``scripts/extract_latents.py``
  (see :mod:`shd_diffusion.latents` for the writer).
* :class:`TextLatentDataset` (:mod:`.text_latent_folder`) -- latents with per-sample text-encoder
  outputs: items are ``(x, cond dict)`` (:mod:`.conditioning`: stacking, CFG's
  :func:`drop_conditioning`); written by :func:`shd_diffusion.latents.write_text_latents`.

:func:`build_dataset` picks one by name; :func:`make_loader` wraps it in a DataLoader driven by
:class:`InfiniteSampler`.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from .animal_mnist import ANIMAL_MNIST_CLASSES, AnimalMNIST, animal_mnist_dir
from .image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, center_crop_adm
from .items import DatasetError, flip_from_seed
from .conditioning import COND_KEYS, drop_conditioning, stack_conditioning
from .latent_folder import LATENT_FORMAT, LATENT_INDEX, LatentDataset
from .stream import InfiniteSampler, make_loader, sample_seed
from .text_latent_folder import LATENT_TEXT_FORMAT, TextLatentDataset, collate_text_items

__all__ = [
    "DatasetError",
    "AnimalMNIST",
    "ImageFolderDataset",
    "LatentDataset",
    "TextLatentDataset",
    "collate_text_items",
    "stack_conditioning",
    "drop_conditioning",
    "COND_KEYS",
    "LATENT_TEXT_FORMAT",
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

DATASET_KINDS = ("animal_mnist", "image_folder", "latents", "text_latents")


def build_dataset(kind: str, path: str | Path | None, image_size: int, hflip: bool | None = None) -> Dataset:
    """Build a dataset by kind name.

    Every returned dataset has ``num_classes``, ``in_channels`` and ``input_size`` (side of ``x``:
    the pixel size, or the latent size for ``latents``).

    Args:
        kind: ``"animal_mnist"``, ``"image_folder"``, ``"latents"`` or ``"text_latents"`` (items
            ``(x, conditioning dict)``, :class:`TextLatentDataset`).
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
    dataset = TextLatentDataset(path, hflip=flip) if kind == "text_latents" else LatentDataset(path, hflip=flip)
    if dataset.image_size != image_size:
        raise DatasetError(
            f"latents in {path} were extracted from {dataset.image_size} px images, but image_size is "
            f"{image_size}: set data.image_size={dataset.image_size} or extract latents at {image_size}"
        )
    return dataset
