"""Which teacher heads feed which student head, and which teacher layer feeds which student layer.

Groupings: the default contiguous near-equal groups, explicit groups, hard selection, the
progressive pairwise path, and head matching (cluster heads by map similarity once, on a
calibration batch). Layer pairs: :func:`layer_mapping` and :func:`validate_pair`.
"""

from __future__ import annotations

import itertools
from typing import Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import compute_dtype

__all__ = [
    "SqueezeMode",
    "default_groups",
    "validate_groups",
    "hard_selection",
    "progressive_groups",
    "resolve_groups",
    "is_identity",
    "SQUEEZE_MODES",
    "head_similarity",
    "cluster_heads",
    "layer_mapping",
    "validate_pair",
]

SqueezeMode = Literal["lstsq", "constant", "hard", "progressive"]
SQUEEZE_MODES: tuple[str, ...] = get_args(SqueezeMode)  # the modes, in the order errors list them


def _check_head_counts(num_teacher_heads: int, num_student_heads: int) -> None:
    if num_teacher_heads < 1 or num_student_heads < 1:
        raise ValueError(
            f"head counts must be >= 1, got teacher {num_teacher_heads} and student {num_student_heads}"
        )
    if num_student_heads > num_teacher_heads:
        raise ValueError(
            f"student has {num_student_heads} heads > teacher {num_teacher_heads} heads: "
            "SHD squeezes teacher heads, it cannot create new ones"
        )


def default_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Contiguous groups of near-equal size, larger groups first (16 -> 6: sizes 3,3,3,3,2,2).

    Args:
        num_teacher_heads: H_t.
        num_student_heads: H_s <= H_t.

    Returns:
        H_s lists of teacher head indices; group j feeds student head j.
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    base, extra = divmod(num_teacher_heads, num_student_heads)
    groups, start = [], 0
    for j in range(num_student_heads):
        size = base + (1 if j < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def validate_groups(
    groups: Sequence[Sequence[int]],
    num_teacher_heads: int,
    num_student_heads: int,
    require_partition: bool = True,
) -> list[list[int]]:
    """Check a user grouping and return it as plain ``list[list[int]]`` (order kept).

    Args:
        groups: one sequence of teacher head indices per student head.
        num_teacher_heads: H_t. num_student_heads: H_s.
        require_partition: every teacher head must appear (True for squeezing; False lets
            :func:`apply_alphas` take the hard-selection groups, which skip heads).

    Returns:
        The groups as lists of ints.

    Raises:
        ValueError: naming the problem (count, empty group, bad index, duplicate, missing head).
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    if isinstance(groups, (str, bytes)) or len(groups) != num_student_heads:
        count = "a string" if isinstance(groups, (str, bytes)) else f"{len(groups)} groups"
        raise ValueError(
            f"head grouping has {count} but the student has {num_student_heads} heads: "
            "give exactly one group of teacher heads per student head"
        )
    seen: dict[int, int] = {}
    out: list[list[int]] = []
    for j, group in enumerate(groups):
        if isinstance(group, (int, str, bytes)) or len(group) == 0:
            raise ValueError(
                f"head group {j} is empty or not a list ({group!r}): every student head needs >= 1 teacher head"
            )
        ints = []
        for i in group:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"head group {j} contains {i!r}, which is not an integer head index")
            if not 0 <= i < num_teacher_heads:
                raise ValueError(
                    f"head group {j} contains head {i}, out of range for a teacher with "
                    f"{num_teacher_heads} heads (valid 0..{num_teacher_heads - 1})"
                )
            if i in seen:
                raise ValueError(f"teacher head {i} appears in head groups {seen[i]} and {j}: groups must be disjoint")
            seen[i] = j
            ints.append(int(i))
        out.append(ints)
    if require_partition:
        missing = sorted(set(range(num_teacher_heads)) - set(seen))
        if missing:
            raise ValueError(
                f"teacher heads {missing} are in no head group: the groups must cover all "
                f"{num_teacher_heads} teacher heads"
            )
    return out


def hard_selection(num_teacher_heads: int, num_student_heads: int, generator_seed: int = 0) -> list[int]:
    """The hard-selection ablation's teacher heads (paper Tab. 7): a seeded random subset.

    A CPU ``torch.Generator`` draws the subset, so it does not depend on the device; the heads are
    returned sorted and student head j imitates teacher head ``selection[j]``.

    Args:
        num_teacher_heads: H_t. num_student_heads: H_s. generator_seed: seed of the draw.

    Returns:
        H_s distinct sorted teacher head indices.
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    gen = torch.Generator().manual_seed(int(generator_seed))
    chosen = torch.randperm(num_teacher_heads, generator=gen)[:num_student_heads]
    return sorted(chosen.tolist())


def _halving_sequence(num_teacher_heads: int, num_student_heads: int) -> list[int]:
    seq = [num_teacher_heads]
    while seq[-1] > num_student_heads:
        seq.append((seq[-1] + 1) // 2)
    return seq


def progressive_groups(num_teacher_heads: int, num_student_heads: int) -> list[list[int]]:
    """Teacher heads that end up in each student head under progressive pairwise merging.

    Each level merges adjacent pairs (2i, 2i+1) and carries an odd last head (Algorithm 1 of the
    authors' rebuttal): 9 -> 5 -> 3 gives [[0..3], [4..7], [8]].

    Args:
        num_teacher_heads: H_t.
        num_student_heads: H_s; must lie on the halving path of H_t (rounding up).

    Returns:
        H_s contiguous lists of teacher head indices, in head order; group j feeds student head j.

    Raises:
        ValueError: when halving (rounding up) never lands on H_s (e.g. 16 -> 8 -> 4, not 6).
    """
    _check_head_counts(num_teacher_heads, num_student_heads)
    seq = _halving_sequence(num_teacher_heads, num_student_heads)
    if seq[-1] != num_student_heads:
        path = " -> ".join(str(n) for n in _halving_sequence(num_teacher_heads, 1))
        raise ValueError(
            f"progressive squeezing halves the head count ({path}) and never reaches "
            f"{num_student_heads} student heads; use mode='lstsq' (direct k -> 1 groups) or a "
            "student head count on that path"
        )
    groups = [[i] for i in range(num_teacher_heads)]
    while len(groups) > num_student_heads:
        groups = [sum(groups[i : i + 2], []) for i in range(0, len(groups), 2)]
    return groups


def resolve_groups(
    num_teacher_heads: int,
    num_student_heads: int,
    mode: SqueezeMode = "lstsq",
    groups: Sequence[Sequence[int]] | None = None,
    generator_seed: int = 0,
) -> list[list[int]]:
    """The groups a squeeze mode uses, i.e. what :func:`~.reference.apply_alphas` needs.

    Args:
        num_teacher_heads: H_t. num_student_heads: H_s.
        mode: "lstsq" / "constant" (``groups`` or :func:`default_groups`), "hard" (one selected
            head per group, see :func:`hard_selection`), "progressive" (:func:`progressive_groups`).
        groups: explicit grouping (lstsq/constant only).
        generator_seed: seed of the hard selection.

    Returns:
        H_s lists of teacher head indices.
    """
    if mode not in SQUEEZE_MODES:
        raise ValueError(f"unknown squeeze mode {mode!r}; choose one of {', '.join(SQUEEZE_MODES)}")
    if mode in ("hard", "progressive") and groups is not None:
        raise ValueError(
            f"squeeze mode {mode!r} chooses its own heads; explicit groups are only for 'lstsq' and 'constant'"
        )
    if mode == "hard":
        return [[i] for i in hard_selection(num_teacher_heads, num_student_heads, generator_seed)]
    if mode == "progressive":
        return progressive_groups(num_teacher_heads, num_student_heads)
    if groups is None:
        return default_groups(num_teacher_heads, num_student_heads)
    return validate_groups(groups, num_teacher_heads, num_student_heads)


def is_identity(groups: Sequence[Sequence[int]], num_teacher_heads: int) -> bool:
    """Whether squeezing is the identity: H_t == H_s and group j is teacher head j."""
    return len(groups) == num_teacher_heads and all(list(g) == [j] for j, g in enumerate(groups))


@torch.no_grad()
def head_similarity(attn: Tensor) -> Tensor:
    """Sum over samples of the cosine similarity between every two heads' flattened maps.

    The similarity of head matching (paper Tab. 5): per sample rather than of batch-mean maps,
    because alpha is per sample (two heads that agree on every sample squeeze with no loss; mean
    maps can agree by accident). Summed, not averaged, so calibration can run in chunks: add the
    chunks' results, divide by the sample count, and pass that to :func:`cluster_heads`.
    Computed in float32 (float64 for float64 maps) with autocast off.

    Args:
        attn: (B, H, N, M) attention probabilities.

    Returns:
        (H, H) float32 or float64.
    """
    if attn.ndim != 4:
        raise ValueError(f"attn must be (B, H, N, M), got shape {tuple(attn.shape)}")
    with torch.autocast(attn.device.type, enabled=False):
        flat = F.normalize(attn.to(compute_dtype(attn)).flatten(2), dim=-1)  # (B, H, N*M)
        return (flat @ flat.transpose(1, 2)).sum(0)  # (H, H)


def cluster_heads(similarity: Tensor, num_student_heads: int, max_group_size: int | None = None) -> list[list[int]]:
    """Greedy average-linkage clustering of heads into ``num_student_heads`` groups.

    Repeatedly merges the two most similar clusters (average of their pairwise similarities;
    ties: lowest head indices) until H_s remain.

    Args:
        similarity: (H_t, H_t) symmetric head similarities (e.g. :func:`head_similarity` / B).
        num_student_heads: H_s.
        max_group_size: optional cap on a group's size; merges beyond it are skipped.

    Returns:
        H_s groups, each sorted, ordered by their smallest head.

    Raises:
        ValueError: if ``max_group_size`` makes H_s groups unreachable by greedy merging.
    """
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be (H, H), got shape {tuple(similarity.shape)}")
    num_teacher_heads = similarity.shape[0]
    _check_head_counts(num_teacher_heads, num_student_heads)
    sim = similarity.tolist()
    clusters = [[i] for i in range(num_teacher_heads)]
    while len(clusters) > num_student_heads:
        best: tuple[float, int, int] | None = None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            if max_group_size is not None and len(clusters[a]) + len(clusters[b]) > max_group_size:
                continue
            link = sum(sim[i][j] for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
            if best is None or link > best[0]:
                best = (link, a, b)
        if best is None:
            raise ValueError(
                f"head matching cannot reach {num_student_heads} groups with max_group_size="
                f"{max_group_size} (stuck at sizes {[len(c) for c in clusters]}); raise max_group_size or use None"
            )
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


# --------------------------------------------------------------------------------------------
# Layer mapping and pair validation
# --------------------------------------------------------------------------------------------


def layer_mapping(
    num_student_layers: int, num_teacher_layers: int, override: Sequence[int] | None = None
) -> list[int]:
    """Teacher layer (0-indexed) supervising each student layer.

    Student layer j (1-indexed) <- teacher layer round(j * L_t / L_s) (1-indexed), rounding halves
    up (floor(x + 0.5), computed in integers) rather than Python's banker's rounding, and at least
    teacher layer 1 when the student is deeper. 48 -> 24 maps student 4 to teacher 8 (index 7).

    Args:
        num_student_layers: L_s. num_teacher_layers: L_t.
        override: explicit 0-indexed teacher layer per student layer (validated).

    Returns:
        L_s teacher layer indices.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be >= 1, got student {num_student_layers} and teacher {num_teacher_layers}"
        )
    if override is not None:
        if len(override) != num_student_layers:
            raise ValueError(
                f"layer mapping override has {len(override)} entries but the student has "
                f"{num_student_layers} layers: give one teacher layer per student layer"
            )
        for j, t in enumerate(override):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < num_teacher_layers:
                raise ValueError(
                    f"layer mapping override[{j}] = {t!r} is not a teacher layer: the teacher has "
                    f"{num_teacher_layers} layers (0-indexed: 0..{num_teacher_layers - 1})"
                )
        return [int(t) for t in override]
    # floor(j L_t / L_s + 1/2) = (2 j L_t + L_s) // (2 L_s), exact in integers.
    return [
        max(1, (2 * j * num_teacher_layers + num_student_layers) // (2 * num_student_layers)) - 1
        for j in range(1, num_student_layers + 1)
    ]


def validate_pair(student_heads: int, teacher_heads: int, student_tokens: int, teacher_tokens: int) -> None:
    """Check that a student/teacher attention pair can be distilled with SHD.

    Args:
        student_heads: H_s of the student layer.
        teacher_heads: H_t of the teacher layer it imitates.
        student_tokens: N of the student's attention maps.
        teacher_tokens: N of the teacher's attention maps.

    Returns:
        None; the pair is valid when no error is raised.

    Raises:
        ValueError: different token grids, or more student heads than teacher heads.
    """
    if student_tokens != teacher_tokens:
        raise ValueError(
            f"teacher has {teacher_tokens} tokens but student has {student_tokens}: SHD needs the "
            "same token grid (same input_size/patch_size)"
        )
    if student_heads > teacher_heads:
        raise ValueError(
            f"student has {student_heads} heads > teacher {teacher_heads} heads: SHD squeezes "
            "teacher heads, it cannot create new ones"
        )
    if student_heads < 1:
        raise ValueError(f"student must have >= 1 head, got {student_heads}")

