"""The item protocol every dataset here follows, and its one error type.

``dataset[index]`` or ``dataset[(index, sample_seed)]`` returns ``(x, y)``: ``x`` a float32
tensor, ``y`` a 0-d int64 label. Any randomness in an item (only the horizontal flip) is a pure
function of ``sample_seed`` (:func:`flip_from_seed`); a bare index is the un-augmented item.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Union

from ..cli import BadInput

__all__ = ["DatasetError", "SampleKey", "flip_from_seed", "split_key", "content_digest"]

# A dataset key: a bare index (no augmentation) or the sampler's (index, sample_seed) pair.
SampleKey = Union[int, tuple[int, int]]


class DatasetError(BadInput, RuntimeError):
    """A dataset cannot be built or an item cannot be read; the message names the file and fix."""


def flip_from_seed(seed: int | None) -> bool:
    """Whether the sample drawn with ``seed`` is horizontally flipped.

    Bit 0 of a hash output is a fair coin. A bare index (``seed`` None) is never flipped, so
    ``dataset[i]`` is the canonical, un-augmented item.

    Args:
        seed: the sample seed from :class:`~.stream.InfiniteSampler`, or None.

    Returns:
        True to flip.
    """
    return seed is not None and (seed & 1) == 1


def split_key(key: SampleKey, length: int) -> tuple[int, int | None]:
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


def content_digest(parts: Iterable[bytes]) -> str:
    """Hex sha256 of ``parts`` in order, each prefixed by its length (so part boundaries count).

    The one hash behind every dataset's ``fingerprint()``, the identity a training checkpoint
    stores so that a resume on other data is refused.
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()
