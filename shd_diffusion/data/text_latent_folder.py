"""Text-conditioned VAE latents: shards of latents plus each sample's text-encoder outputs.

Layout (writer: :func:`shd_diffusion.latents.write_text_latents`)::

    root/shard_00000.safetensors   latents (n, C, h, w) [, latents_flip], cond.<key> (n, ...) per key
    root/empty_prompt.safetensors  cond.<key> (...) per key: the empty prompt "", stored once
    root/index.json                format "shd_latents_text/1", the conditioning spec, the shards

The class-label folders of :class:`~.latent_folder.LatentDataset` (format ``shd_latents/1``) are
untouched by this format: each reader refuses the other's folders by their format string.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .conditioning import Conditioning, check_conditioning, stack_conditioning
from .items import DatasetError, SampleKey, content_digest, flip_from_seed, split_key
from .latent_folder import ShardHandles, open_shard, read_index

__all__ = ["LATENT_TEXT_FORMAT", "EMPTY_PROMPT_FILE", "COND_PREFIX", "TextLatentDataset", "collate_text_items"]

LATENT_TEXT_FORMAT = "shd_latents_text/1"
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
COND_PREFIX = "cond."  # tensor name of conditioning key k in a shard: "cond.k"

_FIX = "delete the file and rerun the writer (write_text_latents resumes)"


def cond_spec(cond: Conditioning) -> dict[str, dict[str, Any]]:
    """``{key: {"shape": [...], "dtype": "float32"}}`` of one sample's conditioning (as the index stores it)."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in sorted(cond.items())}


def load_empty_conditioning(root: Path, spec: dict[str, dict[str, Any]]) -> Conditioning:
    """The empty-prompt conditioning of a folder, checked against the index's spec."""
    path = root / EMPTY_PROMPT_FILE
    if not path.is_file():
        raise DatasetError(
            f"{path} not found: a text-conditioned latent folder stores the empty prompt's conditioning once "
            "(for CFG dropout); rerun the writer with empty= the encoded empty prompt"
        )
    handle = open_shard(path)
    empty = {name.removeprefix(COND_PREFIX): handle.get_tensor(name) for name in handle.keys()}
    check_conditioning(empty, str(path))
    if cond_spec(empty) != spec:
        raise DatasetError(
            f"{path}: empty-prompt conditioning {cond_spec(empty)} does not match the samples' {spec} in "
            f"index.json; encode the empty prompt with the same encoders and padding, then {_FIX}"
        )
    return empty


class TextLatentDataset(Dataset):
    """Latents with per-sample text conditioning, as written by ``write_text_latents``.

    Shards are memory-mapped lazily, once per process (:class:`~.latent_folder.ShardHandles`);
    every shard's tensor names, shapes and dtypes are checked against the index when the
    dataset is built, so a bad folder fails before training starts.

    Args:
        root: the folder.
        hflip: use the stored flipped latents (``both_flips``) for items with an odd sample seed;
            the text conditioning is the same for both.

    Items:
        ``x`` (C, h, w) float32; ``cond`` dict of one sample's tensors in their stored dtypes
        (``prompt_embeds`` (L, D), ``prompt_mask`` (L,) bool, ...).

    Attributes:
        empty_conditioning: the empty prompt's dict (same keys and shapes as an item's).
    """

    def __init__(self, root: str | Path, hflip: bool = True) -> None:
        self.root = Path(root)
        self.index = index = read_index(self.root, LATENT_TEXT_FORMAT)
        self.image_size = int(index["image_size"])
        self.scale_factor = float(index["scale_factor"])
        self.both_flips = bool(index["both_flips"])
        self.latent_shape = tuple(int(s) for s in index["latent_shape"])  # (C, h, w)
        self.in_channels, self.input_size = self.latent_shape[0], self.latent_shape[1]
        self.hflip = hflip
        self.cond_spec: dict[str, dict[str, Any]] = index["conditioning"]
        self.empty_conditioning = load_empty_conditioning(self.root, self.cond_spec)

        self.shard_names = [str(s["name"]) for s in index["shards"]]
        counts = [int(s["count"]) for s in index["shards"]]
        for name, count in zip(self.shard_names, counts):
            self._check_shard(name, count)
        self._starts = np.cumsum([0] + counts[:-1]).tolist()  # first global index of each shard
        self._length = sum(counts)
        if self._length != int(index["num_images"]):
            raise DatasetError(
                f"{self.root / 'index.json'}: shards hold {self._length} items, index says {index['num_images']}"
            )
        self._shards = ShardHandles(self.root, self.shard_names)

    def _expected(self, count: int) -> dict[str, tuple[list[int], str]]:
        """Tensor name -> (shape, dtype) that a shard of ``count`` items must hold exactly."""
        latent = ([count, *self.latent_shape], str(self.index["dtype"]))
        want = {"latents": latent, **({"latents_flip": latent} if self.both_flips else {})}
        for key, spec in self.cond_spec.items():
            want[COND_PREFIX + key] = ([count, *spec["shape"]], spec["dtype"])
        return want

    def _check_shard(self, name: str, count: int) -> None:
        """Refuse a shard whose tensor names, shapes or dtypes differ from the index's."""
        path = self.root / name
        handle = open_shard(path)
        want = self._expected(count)
        keys = set(handle.keys())
        if keys != set(want):
            raise DatasetError(
                f"{path}: tensors {sorted(keys)}, expected {sorted(want)} from index.json "
                f"(missing {sorted(set(want) - keys)}, unknown {sorted(keys - set(want))}); {_FIX}"
            )
        for key, (shape, dtype) in want.items():
            found = handle.get_slice(key)
            got_shape, got_dtype = list(found.get_shape()), _dtype_name(found.get_dtype())
            if (got_shape, got_dtype) != (shape, dtype):
                raise DatasetError(
                    f"{path}: {key} is {got_shape} {got_dtype}, expected {shape} {dtype} from index.json "
                    f"(samples of another encoder or padding length mixed in?); {_FIX}"
                )

    def __len__(self) -> int:
        return self._length

    def fingerprint(self) -> str:
        """Hash of ``index.json`` (which holds the writer's content hash), shard names and sizes,
        and the empty-prompt file's size: what a training checkpoint records as the data identity."""
        files = [*self.shard_names, EMPTY_PROMPT_FILE]
        sizes = [f"{name}\t{(self.root / name).stat().st_size}".encode() for name in files]
        index = json.dumps(self.index, sort_keys=True).encode()
        return content_digest([b"text_latents", index, *sizes])

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, Conditioning]:
        index, seed = split_key(key, len(self))
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        handle = self._shards.get(shard)
        name = "latents_flip" if self.both_flips and self.hflip and flip_from_seed(seed) else "latents"
        x = handle.get_slice(name)[local : local + 1][0].float()  # (C, h, w)
        cond = {k: handle.get_slice(COND_PREFIX + k)[local : local + 1][0] for k in self.cond_spec}  # each (...)
        return x, cond


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "BOOL": "bool",
                       "I64": "int64", "I32": "int32", "U8": "uint8", "I8": "int8", "I16": "int16"}


def _dtype_name(safetensors_dtype: str) -> str:
    """torch's name (``float32``) for a safetensors dtype code (``F32``)."""
    return _SAFETENSORS_DTYPES.get(safetensors_dtype, safetensors_dtype)


def collate_text_items(items: Sequence[tuple[torch.Tensor, Conditioning]]) -> tuple[torch.Tensor, Conditioning]:
    """Stack ``(x, cond)`` items into ``(x (B, C, h, w), cond dict of (B, ...))``."""
    xs, conds = zip(*items)
    return torch.stack(xs), stack_conditioning(conds)
