"""Pre-extracted VAE latents: safetensors shards plus ``index.json`` (writer: :mod:`shd_diffusion.latents`)."""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .items import DatasetError, SampleKey, content_digest, flip_from_seed, split_key

__all__ = ["LATENT_FORMAT", "LATENT_INDEX", "LatentDataset", "ShardHandles", "open_shard", "read_index"]

# Latent shard folder layout, shared with the writer in shd_diffusion.latents.
LATENT_FORMAT = "shd_latents/1"
LATENT_INDEX = "index.json"


def open_shard(path: Path) -> Any:
    """A safetensors handle of a latent shard; a missing or broken file is a named DatasetError."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # missing, truncated or not a safetensors file
        msg = f"cannot open latent shard {path}: {err}; delete it and resume the extraction"
        raise DatasetError(msg) from err


def read_index(root: Path, expected_format: str) -> dict[str, Any]:
    """The parsed ``index.json`` of a finished latent folder, refused unless of ``expected_format``."""
    index_path = root / LATENT_INDEX
    if not index_path.is_file():
        raise DatasetError(
            f"{index_path} not found: {root} is not a finished latent folder. Run (or resume) "
            "scripts/extract_latents.py with --out pointing there"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetError(f"cannot parse {index_path}: {err}") from err
    found = index.get("format") if isinstance(index, dict) else None
    if found != expected_format:
        raise DatasetError(f"{index_path}: format {found!r}, expected {expected_format!r}")
    return index


class ShardHandles:
    """Lazily opened, per-process safetensors handles of a folder's shards.

    DataLoader workers each open their own handles: a forked worker drops the inherited ones, and
    pickling (spawned workers) drops them too, since safetensors handles cannot be pickled.
    """

    def __init__(self, root: Path, names: list[str]) -> None:
        self.root, self.names = root, names
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def get(self, shard: int) -> Any:
        """The handle of shard number ``shard``, opened on first use in this process."""
        if os.getpid() != self._pid:  # forked worker: inherited handles must not be shared
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = open_shard(self.root / self.names[shard])
        return self._handles[shard]


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
        self.index = index = read_index(self.root, LATENT_FORMAT)
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
        self._shards = ShardHandles(self.root, self.shard_names)

    def _check_shard(self, name: str, count: int) -> torch.Tensor:
        """Validate one shard's keys and shapes against the index; return its labels (n,)."""
        path = self.root / name
        handle = open_shard(path)
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

    def fingerprint(self) -> str:
        """Hash of ``index.json`` (the extraction's plan, which holds the source images' listing
        hash and the VAE), each shard's name and size, and every label: cheap for terabytes.

        Detects another extraction, a shard replaced by one of another size and changed labels;
        latent values rewritten in place at the same size are not detected (nothing is read).
        """
        shards = [f"{name}\t{(self.root / name).stat().st_size}".encode() for name in self.shard_names]
        index = json.dumps(self.index, sort_keys=True).encode()  # the parsed index: formatting does not count
        return content_digest([b"latents", index, *shards, self.labels.numpy().tobytes()])

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = split_key(key, len(self))
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        name = "latents_flip" if self.both_flips and self.hflip and flip_from_seed(seed) else "latents"
        x = self._shards.get(shard).get_slice(name)[local : local + 1]  # (1, C, h, w), read from the mmap
        return x[0].float(), self.labels[index]
