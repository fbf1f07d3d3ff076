"""Which student layer learns from which teacher layer, and how the teacher's heads are squeezed.

:func:`plan_distillation` validates everything before any weight is loaded (token grids, head
counts, the layer map, the head groups) and returns the layer pairs with one
:class:`~shd_diffusion.shd.HeadSqueezer` per pair. Head matching (``distill.squeeze=matching``,
paper Tab. 5) replaces the default groups once, before the first step, with
:func:`calibration_groups`.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Iterable

import torch
from torch import nn

from .. import shd as shd_math
from ..attention import capture_qk
from ..families import FamilySpec, family_of, registered
from ..train_config import DistillConfig

__all__ = ["LayerPair", "solver_for_squeeze", "num_tokens", "plan_distillation", "regroup", "calibration_groups"]

LayerPair = tuple[int, int]  # (student layer, teacher layer), 0-indexed


def solver_for_squeeze(squeeze: str) -> str:
    """``distill.squeeze`` name -> :class:`~shd_diffusion.shd.HeadSqueezer` mode.

    Head matching only changes the groups (computed once); the per-sample alpha is still the
    least-squares solve of eq. 6, so ``matching`` maps to ``lstsq``. Other names map to themselves.
    """
    return "lstsq" if squeeze == "matching" else squeeze


def num_tokens(model: nn.Module) -> int:
    """N, the model's token count per image (its family's :attr:`~shd_diffusion.families.FamilySpec.num_tokens`)."""
    return family_of(model).num_tokens(model)


def plan_distillation(student: nn.Module, teacher: nn.Module | None, dc: DistillConfig
                      ) -> tuple[list[LayerPair], list[shd_math.HeadSqueezer]]:
    """(student layer, teacher layer) pairs and, per pair, how its teacher heads are squeezed.

    Returns ([], []) when nothing is distilled layer by layer (no teacher, or KD only). With
    ``distill.cross_attention`` each self-attention pair gains its blocks' cross-attention pair and
    all indices count cross-attention (:func:`_with_cross_attention`).

    Raises:
        ValueError: a student layer out of range, a pair SHD cannot squeeze (named), or
            ``distill.cross_attention`` for a family without cross-attention maps.
    """
    if teacher is None or not (dc.uses_shd or dc.feature_kind):
        return [], []
    family = family_of(student)
    if dc.feature_kind and not family.feature_distillation:
        raise ValueError(f"distill.mode={dc.mode}: feature distillation hooks this package's own blocks and does not "
                         f"apply to {family.name}; use kd, kd_shd or shd")
    if dc.squeeze == "matching" and family.conditioning != "class":
        raise ValueError(f"distill.squeeze=matching calibrates on class-conditional batches; for {family.name} use "
                         "lstsq, constant, hard or progressive")
    if dc.cross_attention:
        _check_cross_attention(family, family_of(teacher))
    s_layers, t_layers = family.attention_layers(student), family_of(teacher).attention_layers(teacher)
    mapping = shd_math.layer_mapping(len(s_layers), len(t_layers), dc.layer_map)
    chosen = range(len(s_layers)) if dc.student_layers is None else dc.student_layers
    for j in chosen:
        if not 0 <= j < len(s_layers):
            raise ValueError(f"distill.student_layers: {j} is out of range (student has {len(s_layers)} layers)")
    pairs = [(j, mapping[j]) for j in sorted(set(chosen))]
    if dc.cross_attention:  # renumbered with cross-attention counted, as the objective then captures
        pairs, s_layers, t_layers = _with_cross_attention(student, teacher, pairs)
    s_tokens, t_tokens = num_tokens(student), num_tokens(teacher)
    squeezers = []
    for j, i in pairs:
        h_s, h_t = int(s_layers[j].heads), int(t_layers[i].heads)
        shd_math.validate_pair(h_s, h_t, s_tokens, t_tokens)
        squeezers.append(shd_math.HeadSqueezer(h_t, h_s, solver_for_squeeze(dc.squeeze), dc.groups, dc.seed))
    return pairs, squeezers


def _check_cross_attention(student: FamilySpec, teacher: FamilySpec) -> None:
    """Refuse ``distill.cross_attention`` for a student or teacher family without cross-attention maps."""
    if student.cross_attention and teacher.cross_attention:
        return
    having = ", ".join(f.name for f in registered() if f.cross_attention) or "none"
    whose = f"the student's family {student.name}" if not student.cross_attention else f"the teacher's family {teacher.name}"
    raise ValueError(f"distill.cross_attention=true: {whose} has no cross-attention maps to distil (families with "
                     f"them: {having}); set distill.cross_attention=false")


def _with_cross_attention(student: nn.Module, teacher: nn.Module, pairs: list[LayerPair]
                          ) -> tuple[list[LayerPair], list[nn.Module], list[nn.Module]]:
    """Self-attention pairs (default numbering) -> those pairs plus each pair's cross-attention pair.

    Every index is renumbered in capture order with cross-attention counted (the numbering of
    ``capture_qk(..., cross_attention=True)``): student block b's self-attention stays paired with
    its mapped teacher block's self-attention, and b's cross-attention is paired with that teacher
    block's cross-attention. Returns the pairs in student order and both models' modules in the
    new numbering (for the head counts).
    """
    from ..t2i_capture import cross_attention_numbering, t2i_attention_layers

    s_num, t_num = cross_attention_numbering(student), cross_attention_numbering(teacher)
    out = []
    for j, i in pairs:
        (s_self, s_cross), (t_self, t_cross) = s_num[j], t_num[i]
        out.append((s_self, t_self))
        if (s_cross is None) != (t_cross is None):
            raise ValueError(f"distill.cross_attention=true: student layer {j} and teacher layer {i} are paired, but "
                             "only one of their blocks has cross-attention")
        if s_cross is not None:
            out.append((s_cross, t_cross))
    modules = [[site.module for site in t2i_attention_layers(m, cross_attention=True)] for m in (student, teacher)]
    return sorted(out), modules[0], modules[1]


def regroup(squeezers: list[shd_math.HeadSqueezer], groups: list[list[list[int]]]
            ) -> list[shd_math.HeadSqueezer]:
    """The squeezers with these head groups (head matching, or a resumed run's saved groups).

    ``hard`` and ``progressive`` choose their own heads and are kept as they are.

    Raises:
        ValueError: the number of group layers differs from the number of layer pairs.
    """
    if len(groups) != len(squeezers):
        raise ValueError(
            f"{len(groups)} saved head-group layers for {len(squeezers)} distilled layer pairs: "
            "the checkpoint comes from another distill.student_layers / layer_map setup"
        )
    return [
        sq if sq.mode in ("hard", "progressive") else
        shd_math.HeadSqueezer(sq.teacher_heads, sq.student_heads, sq.mode, [list(g) for g in layer], sq.seed)
        for sq, layer in zip(squeezers, groups)
    ]


@torch.no_grad()
def calibration_groups(
    teacher: nn.Module,
    layer_pairs: list[LayerPair],
    squeezers: list[shd_math.HeadSqueezer],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    chunk_size: int | None,
    max_group_size: int | None,
    autocast: Callable[[], ContextManager[object]],
) -> list[list[list[int]]]:
    """Head matching: per layer pair, group similar teacher heads into one group per student head.

    ``batches`` yields noised calibration batches ``(x_t (B, C, H, W), t (B,), y (B,))``. Only the
    (H_t, H_t) head similarities are kept, summed over the batches, so memory does not grow with
    the calibration set; the maps are recomputed by query-row blocks, never stored whole.
    """
    t_layers = sorted({i for _, i in layer_pairs})
    sims: dict[int, torch.Tensor] = {}
    count = 0
    for x_t, t, y in batches:
        with autocast(), capture_qk(teacher, t_layers, export_values=True) as store:
            teacher(x_t, t, y)
        for i, q, k, bias in zip(store.layer_indices, store.queries, store.keys, store.biases):
            sim = shd_math.head_similarity_qk(q, k, bias, chunk_size)  # (H_t, H_t), summed over the batch
            sims[i] = sim if i not in sims else sims[i] + sim
        count += len(x_t)
    return [shd_math.cluster_heads(sims[i] / count, sq.student_heads, max_group_size)
            for (_, i), sq in zip(layer_pairs, squeezers)]
