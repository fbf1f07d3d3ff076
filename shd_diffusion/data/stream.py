"""The resumable sample stream: per-position seeds, the infinite sampler and the batch loader.

Global position ``p`` of the stream carries the item index of its epoch's permutation and the
seed :func:`sample_seed` gives it, so a batch never depends on the DataLoader worker that built
it, on the batch size or on the world size, and a resumed run sees exactly the items the
uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..seeding import derive_seed
from .items import DatasetError
from .text_latent_folder import collate_text_items

__all__ = ["InfiniteSampler", "make_loader", "sample_seed"]


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


def _stack_items(items: Sequence[tuple[torch.Tensor, Any]]) -> tuple[torch.Tensor, Any]:
    """Stack ``(x, y)`` items into ``(x (B, C, H, W), y (B,) int64)``; text items' ``y`` is a
    conditioning dict, stacked into a dict of (B, ...) tensors."""
    if items and isinstance(items[0][1], Mapping):
        return collate_text_items(items)
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
        dataset: a dataset of this package (keys may be ``(index, sample_seed)`` pairs).
        batch_size: items per batch on this rank.
        rank: this process's rank.
        world_size: number of processes.
        seed: data-order seed (see :class:`InfiniteSampler`).
        start: items this rank already consumed.
        num_workers: DataLoader worker processes (0 = load in this process).
        shuffle: shuffle each epoch.
        pin_memory: page-lock batches for faster host-to-GPU copies.

    Returns:
        An iterator yielding ``(x (B, C, H, W), y (B,))`` tuples (``y`` a dict of (B, ...) tensors for
        a :class:`~.text_latent_folder.TextLatentDataset`); item ``i`` of batch ``k`` is the
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
