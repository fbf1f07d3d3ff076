"""The SHD loss on whole maps (paper eq. 11): row-wise KL(squeezed teacher || student), or MSE."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from ..precision import compute_dtype

__all__ = ["LossKind", "LossReduction", "shd_loss"]

LossKind = Literal["kl", "mse"]
LossReduction = Literal["sum", "mean"]


def shd_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    *,
    beta: float,
    kind: LossKind = "kl",
    reduction: LossReduction = "sum",
    eps: float = 1e-10,
) -> Tensor:
    """Per-sample SHD loss between student maps and squeezed teacher maps (paper eq. 11).

    Per layer l and student head j, with rows n = 1..N (query tokens) and keys k:
      * kind "kl":  (1/N) sum_n sum_k p_t log(p_t / p_s), i.e. KL(teacher || student) averaged
        over query rows; 0 log 0 = 0, and log p_s uses ``p_s.clamp_min(eps)`` (student maps are
        probabilities; entries below eps get no gradient through the log).
      * kind "mse": (1/(N M)) sum_n sum_k (p_s - p_t)^2.
    reduction "sum" adds these over all layers and heads (eq. 11, the paper default); "mean"
    divides that sum by the number of layer-heads sum_l H_s. The result is multiplied by beta.
    Teacher maps are detached; computation is in float32 (float64 for float64 students).

    The whole-map path (tests and benchmarks); training computes the same term blockwise
    with :func:`~.chunked.shd_term` and weights it by ``distill.shd_beta`` in the objective. So
    ``beta`` has no default: a caller says which weight it means (1.0 for the bare term).

    Args:
        student_maps: per layer (B, H_s, N, M) student probabilities (with graph).
        teacher_maps: per layer (B, H_s, N, M) squeezed teacher probabilities.
        beta: loss weight (keyword only; the paper uses 2.0 for image generation).
        kind: "kl" or "mse". reduction: "sum" or "mean". eps: log clamp.

    Returns:
        (B,) per-sample loss; the training loop reduces over the batch.
    """
    if kind not in ("kl", "mse"):
        raise ValueError(f"unknown SHD loss kind {kind!r}; choose 'kl' or 'mse'")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown SHD reduction {reduction!r}; choose 'sum' or 'mean'")
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"shd_loss needs the same non-zero number of student and teacher layers, got "
            f"{len(student_maps)} and {len(teacher_maps)}"
        )
    total: Tensor | None = None
    count = 0
    for l, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(
                f"layer {l}: student maps {tuple(s.shape)} and squeezed teacher maps {tuple(t.shape)} "
                "must both be (B, H_s, N, M); squeeze the teacher to the student's head count first"
            )
        dtype = compute_dtype(s)
        s = s.to(dtype)
        t = t.detach().to(dtype)
        if kind == "kl":
            per_row = (torch.xlogy(t, t) - t * s.clamp_min(eps).log()).sum(-1)  # (B, H, N)
            per_head = per_row.mean(-1)  # (B, H)
        else:
            per_head = (s - t).pow(2).mean((-2, -1))  # (B, H)
        layer = per_head.sum(-1)  # (B,)
        total = layer if total is None else total + layer
        count += s.shape[1]
    assert total is not None
    if reduction == "mean":
        total = total / count
    return beta * total
