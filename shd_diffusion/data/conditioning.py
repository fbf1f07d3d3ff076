"""Text conditioning as data: per-sample dicts of text-encoder outputs, stacking, and CFG dropout.

A conditioning dict maps a name of :data:`COND_KEYS` to one sample's tensor (``prompt_embeds``
(L, D), ``pooled_prompt_embeds`` (P,), ``prompt_mask`` (L,) bool) or, batched, to (B, ...)
tensors. The names follow the diffusers pipelines' arguments (``prompt_embeds``,
``pooled_prompt_embeds``; the mask is ``prompt_embeds_mask`` in Qwen-Image and
``prompt_attention_mask`` in PixArt). Every prompt of one dataset is padded to the same length L
(e.g. the pipelines' ``max_sequence_length``), so samples stack without ragged handling.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .items import DatasetError

__all__ = ["COND_KEYS", "Conditioning", "check_conditioning", "stack_conditioning", "drop_conditioning"]

# Known conditioning entries and the number of dims of one sample's tensor.
COND_KEYS: dict[str, int] = {
    "prompt_embeds": 2,  # (L, D) per-token text-encoder states (T5 / Qwen2.5-VL; SD3 also CLIP, concatenated)
    "pooled_prompt_embeds": 1,  # (P,) pooled CLIP embedding (SD3, FLUX)
    "prompt_mask": 1,  # (L,) bool, True on real tokens (Qwen-Image, PixArt)
}
REQUIRED_KEY = "prompt_embeds"  # every text-to-image family conditions on per-token states

Conditioning = dict[str, Tensor]


def check_conditioning(sample: Mapping[str, Tensor], where: str) -> None:
    """Check one sample's conditioning dict: known keys, ``prompt_embeds`` present, dims, mask.

    Args:
        sample: one sample's (unbatched) tensors, e.g. the empty-prompt dict.
        where: the file or argument it came from, for the message.

    Raises:
        DatasetError: naming ``where`` and the fix.
    """
    unknown = sorted(set(sample) - set(COND_KEYS))
    if unknown:
        raise DatasetError(
            f"{where}: unknown conditioning key(s) {unknown}; use only {', '.join(COND_KEYS)} "
            "(or add the new key to shd_diffusion.data.conditioning.COND_KEYS)"
        )
    if REQUIRED_KEY not in sample:
        raise DatasetError(f"{where}: conditioning lacks {REQUIRED_KEY!r}; store the text encoder's per-token states")
    for key, value in sample.items():
        if value.ndim != COND_KEYS[key]:
            raise DatasetError(
                f"{where}: {key} of one sample has shape {tuple(value.shape)}, expected {COND_KEYS[key]} dims; "
                "give per-sample tensors without the batch dim"
            )
    mask = sample.get("prompt_mask")
    if mask is not None and (mask.dtype != torch.bool or mask.shape[0] != sample[REQUIRED_KEY].shape[0]):
        raise DatasetError(
            f"{where}: prompt_mask is {tuple(mask.shape)} {mask.dtype}; it must be bool with one flag per token "
            f"of prompt_embeds ({sample[REQUIRED_KEY].shape[0]})"
        )


def stack_conditioning(samples: Sequence[Mapping[str, Tensor]], where: str = "batch") -> Conditioning:
    """Stack per-sample conditioning dicts into one batch dict (the collate of text items).

    Args:
        samples: B dicts with the same keys, each key's tensors of one shape and dtype.
        where: what the samples are, for the error message (a file, "batch").

    Returns:
        dict of (B, ...) tensors.

    Raises:
        DatasetError: samples with different keys, shapes or dtypes (naming the sample).
    """
    if not samples:
        raise DatasetError(f"{where}: no conditioning to stack")
    first = samples[0]
    for i, sample in enumerate(samples[1:], start=1):
        if set(sample) != set(first):
            raise DatasetError(
                f"{where}: sample {i} has conditioning keys {sorted(sample)}, sample 0 has {sorted(first)}; "
                "encode every prompt with the same text encoders"
            )
        for key, value in sample.items():
            if value.shape != first[key].shape or value.dtype != first[key].dtype:
                raise DatasetError(
                    f"{where}: sample {i} {key} is {tuple(value.shape)} {value.dtype}, sample 0 is "
                    f"{tuple(first[key].shape)} {first[key].dtype}; pad every prompt to the same length "
                    "(max_sequence_length) and store one dtype"
                )
    return {key: torch.stack([s[key] for s in samples]) for key in first}  # each (B, ...)


def drop_conditioning(cond: Mapping[str, Tensor], empty: Mapping[str, Tensor], drop: Tensor) -> Conditioning:
    """Classifier-free-guidance dropout: the empty prompt's conditioning where ``drop`` is True.

    The caller draws ``drop`` per sample (one generator per sample), so this stays pure.

    Args:
        cond: batch dict of (B, ...) tensors.
        empty: the dataset's empty-prompt dict, the same keys with one sample's shapes (...).
        drop: (B,) bool.

    Returns:
        A new dict: sample i is ``empty`` where ``drop[i]``, else ``cond``'s, in ``cond``'s dtypes.

    Raises:
        ValueError: different keys, shapes, or a ``drop`` that is not (B,) bool.
    """
    if set(cond) != set(empty):
        raise ValueError(
            f"conditioning keys {sorted(cond)} != empty-prompt keys {sorted(empty)}: use the empty prompt "
            "of the same dataset"
        )
    out: Conditioning = {}
    for key, value in cond.items():
        if drop.dtype != torch.bool or drop.shape != value.shape[:1]:
            raise ValueError(
                f"drop must be ({value.shape[0]},) bool, one flag per sample; got {tuple(drop.shape)} {drop.dtype}"
            )
        if empty[key].shape != value.shape[1:]:
            raise ValueError(
                f"empty-prompt {key} is {tuple(empty[key].shape)}, the batch's samples are {tuple(value.shape[1:])}: "
                "use the empty prompt of the same dataset"
            )
        flags = drop.to(value.device).view(-1, *([1] * (value.ndim - 1)))  # (B, 1, ..., 1)
        out[key] = torch.where(flags, empty[key].to(device=value.device, dtype=value.dtype), value)
    return out
