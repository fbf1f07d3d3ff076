"""What the loop logs each interval: mean loss terms, lr, grad norm, throughput, memory, alphas."""

from __future__ import annotations

from typing import Any

import torch

from .heads import LayerPair

__all__ = ["log_interval", "flat_hparams"]


def log_interval(
    acc: Any,
    step: int,
    means: dict[str, float],
    alphas: list[torch.Tensor],
    layer_pairs: list[LayerPair],
    *,
    lr: float,
    grad_norm: torch.Tensor,
    img_per_s: float,
) -> dict[str, float]:
    """Log one interval's scalars (and an alpha histogram per SHD layer) to the trackers.

    ``means`` are already averaged over the ranks. ``alphas`` holds one (B_all, H_t) tensor per
    SHD layer pair, every rank's; ``zero_frac`` is the share of teacher heads whose alpha sits on
    the simplex boundary (0), i.e. how often the simplex constraint was active.

    Returns:
        The logged scalars, name -> value.
    """
    scalars = {f"loss/{k}": v for k, v in means.items() if k != "loss"}
    scalars["loss"] = means["loss"]
    scalars["lr"] = lr
    scalars["throughput/img_per_s"] = img_per_s
    scalars["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        scalars["memory/max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    hists = {}
    for (j, _), a in zip(layer_pairs, alphas):  # a: (ranks * micro-batches * B, H_t)
        scalars[f"alpha/layer{j:02d}_min"] = float(a.min())
        scalars[f"alpha/layer{j:02d}_max"] = float(a.max())
        scalars[f"alpha/layer{j:02d}_std"] = float(a.std())
        scalars[f"alpha/layer{j:02d}_zero_frac"] = float((a == 0).float().mean())
        hists[f"alpha/layer{j:02d}"] = a.cpu().numpy().reshape(-1)  # (ranks * micro-batches * B * H_t,)
    acc.log(scalars, step=step)
    if hists and acc.is_main_process:
        from ..figures import log_histograms

        log_histograms(acc.trackers, hists, step)
    return scalars


def flat_hparams(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The nested config as dotted keys with scalar values (TensorBoard hparams take scalars only)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_hparams(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out
