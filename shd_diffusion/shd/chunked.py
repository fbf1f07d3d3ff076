"""What training runs: one layer pair's SHD term from q, k, v, over blocks of query rows (memory linear in N).

:func:`shd_term` never holds a (B, H, N, N) tensor. With c = ``chunk_size`` rows per block:

1. **alpha.** Every product eq. (6) needs is a sum over query rows, so a first pass over the
   blocks recomputes the teacher's T = 1 maps softmax(q k^T / sqrt(d) + bias) for c rows at a
   time, (B, H_t, c, N), and hands them to the alpha engine, :func:`~.alpha.mode_alphas`, which
   accumulates the Gram terms of eq. (6) and solves once, simplex rule included, exactly as for
   whole maps (the whole-map reference, :mod:`.reference`, runs the same engine on one block).
2. **The loss.** A second pass recomputes the teacher's block at T_a, squeezes it with alpha,
   computes the student's block log-softmax((q_s k_s^T / sqrt(d_s) + bias_s) / T_a) and adds up
   row-wise KL(squeezed teacher || student) (or the MSE) per sample.
3. **The backward** is a custom :class:`torch.autograd.Function` that saves only q, k, biases and
   the mixing weights and, block by block, recomputes both maps and applies the softmax Jacobian
   by hand (:func:`_block_grad_logits`). When all N rows fit one block (the automatic size at
   N = 256 for 16 -> 6 heads up to batch 12), the block's target and student log-probabilities
   are kept for the backward instead, and the teacher's logits serve alpha and the target at once
   (:func:`_one_block`).

Why a custom Function rather than ``torch.utils.checkpoint`` around each block
(:func:`checkpointed_term`, kept for ``benchmarks/bench_squeeze.py``): the peak memory is the
same, the Function was faster in four of the five timed CPU comparisons, and it keeps a single
block for its backward without an autograd graph (README, "Measured results").

Cost against whole maps: with several blocks the teacher's block logits are computed three times
(alpha, loss, backward) and the student's twice; memory per layer is O(B H c N) for the blocks
plus the (B, H, N, d) inputs and gradients (and a learned bias's own (H, N, N) gradient).
"""

from __future__ import annotations

import math
from typing import Iterator, Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..precision import compute_dtype
from .alpha import Blocks, mode_alphas, put_heads
from .groups import SqueezeMode, default_groups, is_identity, resolve_groups

__all__ = ["shd_term", "head_similarity_qk", "auto_chunk_size", "DEFAULT_BLOCK_BYTES", "LossKind", "LossReduction",
           "checkpointed_term"]

# The loss settings (shared with the whole-map reference's shd_loss): the per-row divergence, and
# how the training loop combines the layer-heads' terms (eq. 11's sum, or their mean).
LossKind = Literal["kl", "mse"]
LossReduction = Literal["sum", "mean"]

# Memory budget of one block's float32 temporaries when chunk_size is None (see auto_chunk_size).
DEFAULT_BLOCK_BYTES = 256 * 2**20
# (B, H_t, c, N)-sized and (B, H_s, c, N)-sized float32 temporaries alive at once in a block:
# teacher logits + probabilities (+ squeezed-group maps and differences); the squeezed target,
# student logits, log-probabilities, probabilities, the gradient weights and the logit gradient.
_TEACHER_COPIES, _STUDENT_COPIES = 3, 6


def auto_chunk_size(batch: int, teacher_heads: int, student_heads: int, tokens: int,
                    budget_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Query rows per block so that one block's float32 temporaries fit ``budget_bytes``.

    A row costs (3 H_t + 6 H_s) B N float32 values (see ``_TEACHER_COPIES``/``_STUDENT_COPIES``);
    the result is rounded down to a multiple of 16 (at least 16 rows, at most N). With
    16 -> 6 heads, N = 1024 and the default 256 MiB: 16 rows at B = 32, 48 rows at B = 16.
    """
    per_row = (_TEACHER_COPIES * teacher_heads + _STUDENT_COPIES * student_heads) * batch * tokens * 4
    rows = max(1, budget_bytes // max(per_row, 1))
    return int(min(tokens, max(16, rows // 16 * 16)))


class _Spec(NamedTuple):
    """The non-tensor settings of one term (shared by the forward and the backward)."""

    groups: list[list[int]]
    temperature: float
    chunk: int
    kind: str
    eps: float
    student_scale: float
    teacher_scale: float
    dtype: torch.dtype


def _row_blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    return ((r, min(r + chunk, n)) for r in range(0, n, chunk))


def _bias_rows(bias: Tensor | None, r0: int, r1: int) -> Tensor | None:
    """Rows r0:r1 of a 4-D bias (a row-broadcast bias, shape[-2] == 1, is used whole)."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., r0:r1, :]


def _logits(q: Tensor, k: Tensor, scale: float, bias: Tensor | None, dtype: torch.dtype,
            temperature: float = 1.0) -> Tensor:
    """(q k^T * scale + bias) / T in ``dtype`` (float32 or float64): (B, H, c, N).

    The scalar factors go on q (c x d values, not c x N) and the bias is added in place, so a
    block costs one (B, H, c, N) tensor. Call with autocast off.
    """
    logits = (q.to(dtype) * (scale / temperature)) @ k.to(dtype).transpose(-2, -1)  # (B, H, c, N)
    if bias is not None:
        logits.add_(bias.to(dtype), alpha=1.0 / temperature)
    return logits


def _teacher_blocks(t_q: Tensor, t_k: Tensor, t_bias: Tensor | None, spec: _Spec,
                    t_out: Tensor | None = None) -> Blocks:
    """Block source of the teacher's T = 1 maps (see :data:`~.alpha.Blocks`), c rows at a time."""

    def blocks() -> Iterator[tuple[Tensor, Tensor | None]]:
        for r0, r1 in _row_blocks(t_q.shape[-2], spec.chunk):
            logits = _logits(t_q[:, :, r0:r1], t_k, spec.teacher_scale, _bias_rows(t_bias, r0, r1), spec.dtype)
            probs = logits.softmax(-1)  # (B, H_t, c, N)
            del logits  # one block tensor alive while the consumer works
            yield probs, None if t_out is None else t_out[:, :, r0:r1]

    return blocks


def _mixing(alphas: Tensor, groups: Sequence[Sequence[int]], dtype: torch.dtype) -> Tensor:
    """(B, H_s, H_t) weights: row j holds alpha_i for the teacher heads i of group j, else 0."""
    b, h_t = alphas.shape
    member = torch.zeros(len(groups), h_t, dtype=dtype, device=alphas.device)  # (H_s, H_t)
    for j, group in enumerate(groups):
        put_heads(member[j : j + 1], group, 1.0)  # slices of runs: no host sync
    return member.unsqueeze(0) * alphas.to(dtype).unsqueeze(1)  # (B, H_s, H_t)


def _target_block(t_q: Tensor, t_k: Tensor, t_bias: Tensor | None, mix: Tensor | None, spec: _Spec,
                  r0: int, r1: int) -> Tensor:
    """Squeezed teacher maps at T_a for rows r0:r1: (B, H_s, c, N); ``mix`` None = identity."""
    logits = _logits(t_q[:, :, r0:r1], t_k, spec.teacher_scale, _bias_rows(t_bias, r0, r1), spec.dtype,
                     spec.temperature)
    soft = logits.softmax(-1)  # (B, H_t, c, N)
    del logits
    if mix is None:
        return soft
    b, h_t, c, n = soft.shape
    return (mix @ soft.view(b, h_t, c * n)).view(b, -1, c, n)  # (B, H_s, c, N): one pass over the block


def _student_logp(s_q: Tensor, s_k: Tensor, s_bias: Tensor | None, spec: _Spec, r0: int, r1: int) -> Tensor:
    """Student log-probabilities at T_a for rows r0:r1: (B, H_s, c, N)."""
    logits = _logits(s_q[:, :, r0:r1], s_k, spec.student_scale, _bias_rows(s_bias, r0, r1), spec.dtype,
                     spec.temperature)
    return logits.log_softmax(-1)


def _block_loss(logp: Tensor, target: Tensor, spec: _Spec, inplace: bool = True) -> Tensor:
    """(B,) sum over the block's rows and heads of the per-row loss (normalised by the caller).

    KL: sum_k t log t - t log max(p_s, eps), i.e. :func:`~.reference.shd_loss`'s clamp of the student
    probabilities at eps, written on log p_s. MSE: sum_k (p_s - t)^2. ``inplace`` overwrites ``logp``.
    """
    if spec.kind == "kl":
        log_clamped = (logp.clamp_min_ if inplace else logp.clamp_min)(math.log(spec.eps))
        # Entry by entry, then summed: t log t and t log p are each ~log N per row while their
        # difference is small, so summing them separately would cancel away float32 digits.
        return torch.xlogy(target, target).addcmul_(target, log_clamped, value=-1.0).sum((1, 2, 3))
    p = logp.exp_() if inplace else logp.exp()
    return (p - target).square().sum((1, 2, 3))


def _block_grad_logits(logp: Tensor, target: Tensor, spec: _Spec, coef: Tensor) -> Tensor:
    """coef x d(block loss) / d(student logits / T) for one block: (B, H_s, c, N).

    With p = softmax(z) and w = dL/d(log p), dL/dz = w - p sum_k w_k. KL: w = -t where
    log p > log eps (the clamp passes no gradient below it). MSE: w = p * 2 (p - t). ``coef``
    (B, 1, 1, 1) carries the upstream gradient, 1/T and the row normalisation.
    """
    p = logp.exp()
    if spec.kind == "kl":
        w = torch.where(logp > math.log(spec.eps), -target, 0.0)
    else:
        w = p * (2 * (p - target))
    return w.addcmul_(p, w.sum(-1, keepdim=True), value=-1.0).mul_(coef)


def _sum_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum a broadcast (B, H, c, N) gradient down to a 4-D bias block's ``shape``."""
    dims = [i for i, (have, want) in enumerate(zip(x.shape, shape)) if want == 1 and have != 1]
    return x.sum(dims, keepdim=True) if dims else x


class _BlockwiseMapLoss(torch.autograd.Function):
    """Per-sample map loss over row blocks; backward recomputes each block (see the module doc).

    ``kept``: the squeezed target of the only block when all N rows fit one block; then the block's
    target and student log-probabilities are kept for the backward instead of recomputed (they
    fit the block budget by construction).
    """

    @staticmethod
    def forward(ctx, s_q, s_k, s_bias, t_q, t_k, t_bias, mix, kept, spec):  # type: ignore[override]
        n, m = s_q.shape[-2], s_k.shape[-2]
        norm = n if spec.kind == "kl" else n * m  # KL: mean over rows; MSE: mean over entries
        total = s_q.new_zeros(s_q.shape[0], dtype=spec.dtype)  # (B,)
        logp_kept = None
        with torch.no_grad(), torch.autocast(s_q.device.type, enabled=False):
            if kept is not None:
                logp_kept = _student_logp(s_q, s_k, s_bias, spec, 0, n)  # (B, H_s, N, N)
                total += _block_loss(logp_kept, kept, spec, inplace=False)
            else:
                for r0, r1 in _row_blocks(n, spec.chunk):
                    target = _target_block(t_q, t_k, t_bias, mix, spec, r0, r1)
                    total += _block_loss(_student_logp(s_q, s_k, s_bias, spec, r0, r1), target, spec)
        ctx.save_for_backward(s_q, s_k, s_bias, t_q, t_k, t_bias, mix, kept, logp_kept)
        ctx.spec, ctx.norm = spec, norm
        return total / norm

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s_q, s_k, s_bias, t_q, t_k, t_bias, mix, kept, logp_kept = ctx.saved_tensors
        spec = ctx.spec
        need_bias = s_bias is not None and ctx.needs_input_grad[2]
        dq = torch.zeros(s_q.shape, dtype=spec.dtype, device=s_q.device)  # (B, H_s, N, d)
        dk = torch.zeros(s_k.shape, dtype=spec.dtype, device=s_k.device)  # (B, H_s, N, d)
        dbias = torch.zeros(s_bias.shape, dtype=spec.dtype, device=s_bias.device) if need_bias else None
        # Upstream per-sample gradient, 1/T of the logits and the row normalisation, in one factor.
        coef = (grad.to(spec.dtype) / (spec.temperature * ctx.norm))[:, None, None, None]  # (B, 1, 1, 1)
        q_s, k_s = s_q.to(spec.dtype) * spec.student_scale, s_k.to(spec.dtype) * spec.student_scale
        with torch.no_grad(), torch.autocast(s_q.device.type, enabled=False):
            for r0, r1 in _row_blocks(s_q.shape[-2], spec.chunk):
                if kept is not None:  # the one block, kept by the forward
                    target, logp = kept, logp_kept
                else:
                    target = _target_block(t_q, t_k, t_bias, mix, spec, r0, r1)
                    logp = _student_logp(s_q, s_k, s_bias, spec, r0, r1)
                dz = _block_grad_logits(logp, target, spec, coef)  # (B, H_s, c, N): dL / d(q k^T / sqrt(d) + bias)
                del target, logp
                dq[:, :, r0:r1] = dz @ k_s  # (B, H_s, c, d)
                dk += dz.transpose(-2, -1) @ q_s[:, :, r0:r1]  # (B, H_s, N, d)
                if need_bias:
                    if s_bias.shape[-2] == 1:
                        dbias += _sum_to(dz, s_bias.shape)
                    else:
                        dbias[..., r0:r1, :] += _sum_to(dz, dbias[..., r0:r1, :].shape)
        return (dq.to(s_q.dtype), dk.to(s_k.dtype), None if dbias is None else dbias.to(s_bias.dtype),
                None, None, None, None, None, None)


def _checkpointed_map_loss(s_q: Tensor, s_k: Tensor, s_bias: Tensor | None, t_q: Tensor, t_k: Tensor,
                           t_bias: Tensor | None, alphas: Tensor, spec: _Spec) -> Tensor:
    """The measured alternative to :class:`_BlockwiseMapLoss`: autograd through each block, with
    ``torch.utils.checkpoint`` recomputing the block in the backward (:func:`checkpointed_term`)."""
    n, m = s_q.shape[-2], s_k.shape[-2]
    mix = None if is_identity(spec.groups, t_q.shape[1]) else _mixing(alphas, spec.groups, spec.dtype)

    def block(q_rows: Tensor, k: Tensor, bias: Tensor | None, r0: int, r1: int) -> Tensor:
        with torch.autocast(q_rows.device.type, enabled=False):
            with torch.no_grad():
                target = _target_block(t_q, t_k, t_bias, mix, spec, r0, r1)
            logits = _logits(q_rows, k, spec.student_scale, _bias_rows(bias, r0, r1), spec.dtype, spec.temperature)
            return _block_loss(logits.log_softmax(-1), target, spec, inplace=False)

    total = sum(checkpoint(block, s_q[:, :, r0:r1], s_k, s_bias, r0, r1, use_reentrant=False)
                for r0, r1 in _row_blocks(n, spec.chunk))
    return total / (n if spec.kind == "kl" else n * m)


def checkpointed_term(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, teacher_v: Tensor,
                      out_weight: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None,
                      teacher_out: Tensor | None = None) -> Tensor:
    """:func:`shd_term`'s default term (lstsq, default groups, KL, no biases) with autograd and
    ``torch.utils.checkpoint`` per block instead of the recomputing backward: the alternative the
    module doc compares against, for ``benchmarks/bench_squeeze.py --impl checkpoint`` only.

    Args:
        student_q, student_k, teacher_q, teacher_k, teacher_v, out_weight, temperature, chunk_size,
        teacher_out: as for :func:`shd_term`.

    Returns:
        the per-sample loss (B,) (float32; float64 for float64 students), with its autograd graph.
    """
    _check_term_inputs(student_q, student_k, teacher_q, teacher_k, teacher_v, out_weight)
    b, h_s, n, d_s = student_q.shape
    h_t, d_t = teacher_q.shape[1], teacher_q.shape[-1]
    chunk = _check_chunk(chunk_size, n, auto_chunk_size(b, h_t, h_s, max(n, teacher_k.shape[-2])))
    spec = _Spec(default_groups(h_t, h_s), float(temperature), chunk, "kl", 1e-10, d_s**-0.5, d_t**-0.5,
                 compute_dtype(student_q, teacher_q))
    alphas = _alphas(_teacher_blocks(teacher_q, teacher_k, None, spec, teacher_out), teacher_v, out_weight, "lstsq",
                     spec, b)
    return _checkpointed_map_loss(student_q, student_k, None, teacher_q, teacher_k, None, alphas, spec)


def _as_4d_bias(bias: Tensor | None, name: str, b: int, h: int, n: int, m: int | None = None) -> Tensor | None:
    """``bias`` viewed as 4-D, after checking it broadcasts to (B, H, N, M) (M = N by default)."""
    if bias is None:
        return None
    shape = tuple(bias.shape)
    full = (b, h, n, n if m is None else m)
    if bias.dtype == torch.bool or not bias.is_floating_point():
        raise TypeError(f"{name} must be an additive float logit bias, got dtype {bias.dtype}")
    padded = (1,) * (4 - len(shape)) + shape if len(shape) <= 4 else None
    if padded is None or any(have not in (1, want) for have, want in zip(padded, full)):
        raise ValueError(f"{name} of shape {shape} does not broadcast to (B, H, N, M) = {full}")
    return bias.reshape(padded)


def _check_term_inputs(s_q: Tensor, s_k: Tensor, t_q: Tensor, t_k: Tensor, t_v: Tensor, w: Tensor) -> None:
    """One clear error for q/k/v/weight shapes that do not form one SHD layer pair.

    Queries are N rows, keys and values M rows (M = N for self-attention; a text-to-image model's
    image-query rows over the joint sequence have M > N).
    """
    for name, x in (("student_q", s_q), ("student_k", s_k), ("teacher_q", t_q), ("teacher_k", t_k), ("teacher_v", t_v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(x.shape)}")
    if s_k.shape[:2] + s_k.shape[3:] != s_q.shape[:2] + s_q.shape[3:]:
        raise ValueError(f"student_k {tuple(s_k.shape)} must match student_q {tuple(s_q.shape)}: (B, H_s, M, d_s)")
    if t_v.shape != t_k.shape or t_k.shape[:2] + t_k.shape[3:] != t_q.shape[:2] + t_q.shape[3:]:
        raise ValueError(
            f"teacher_q {tuple(t_q.shape)}, teacher_k {tuple(t_k.shape)} and teacher_v {tuple(t_v.shape)} "
            "must be (B, H_t, N, d_t), (B, H_t, M, d_t) and (B, H_t, M, d_t)"
        )
    (b, h_s, n, _), (b_t, h_t, n_t, d_t) = s_q.shape, t_q.shape
    if (b_t, n_t, t_k.shape[2]) != (b, n, s_k.shape[2]):
        raise ValueError(
            f"teacher (B, N, M) = {(b_t, n_t, t_k.shape[2])} != student {(b, n, s_k.shape[2])}: SHD needs the same "
            "batch and token grid (same input_size/patch_size)"
        )
    if h_s > h_t:
        raise ValueError(f"student has {h_s} heads > teacher {h_t}: SHD squeezes teacher heads, it cannot create new ones")
    if w.ndim != 2 or w.shape[1] != h_t * d_t:
        raise ValueError(f"out_weight {tuple(w.shape)} must be (D, H_t * d_t) = (D, {h_t * d_t}) in nn.Linear layout")


def _check_chunk(chunk_size: int | None, n: int, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size (distill.chunk_size) must be an integer >= 1 or None (automatic), got {chunk_size!r}")
    return min(chunk_size, n)


def shd_term(
    student_q: Tensor,
    student_k: Tensor,
    teacher_q: Tensor,
    teacher_k: Tensor,
    teacher_v: Tensor,
    out_weight: Tensor,
    *,
    groups: Sequence[Sequence[int]] | None = None,
    temperature: float = 1.0,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int | None = None,
    loss: LossKind = "kl",
    mode: SqueezeMode = "lstsq",
    generator_seed: int = 0,
    eps: float = 1e-10,
    teacher_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One layer pair's SHD term, computed over blocks of ``chunk_size`` query rows.

    The value per sample is the sum over student heads j of the row-mean
    KL(A~_j^t || A_j^s) at ``temperature`` (or the entry-mean squared error, ``loss="mse"``),
    where A~^t is the teacher's maps squeezed with alpha from its T = 1 maps (paper eq. 6, simplex
    rule included), exactly as :func:`~.reference.squeeze_heads` + :func:`~.reference.shd_loss` with
    ``beta=1`` on whole maps; ``chunk_size=N`` is that computation in one block.

    Args:
        student_q, student_k: (B, H_s, N, d_s), (B, H_s, M, d_s), any float dtype (with their graph);
            M = N for self-attention, M > N for a text-to-image model's image rows over the joint
            sequence (:func:`shd_diffusion.t2i_capture.shd_inputs`).
        teacher_q, teacher_k, teacher_v: (B, H_t, N, d_t), (B, H_t, M, d_t), (B, H_t, M, d_t) (no graph needed).
        out_weight: (D, H_t * d_t) the teacher's out-projection weight (``nn.Linear`` layout).
        groups: teacher heads per student head ("lstsq"/"constant"); None = contiguous near-equal.
        temperature: T_a >= 1 of the distilled maps; alpha always comes from T = 1.
        student_bias, teacher_bias: additive logit biases broadcastable to (B, H, N, M) (MDT's
            relative-position bias, (1, H, N, N), shared by the batch).
        chunk_size: query rows per block (>= 1); None = :func:`auto_chunk_size`.
        loss: "kl" or "mse". mode: squeeze rule ("lstsq", "constant", "hard", "progressive").
        generator_seed: seed of the "hard" selection. eps: clamp of the student probabilities.
        teacher_out: optional (B, H_t, N, d_t) per-head attention outputs A_i V_i of the teacher
            (``capture_qk(..., export_values=True)`` exports them): they only set the ridge's
            scale, and spare one attention-sized product per block of the alpha pass.

    Returns:
        per-sample loss (B,) (float32; float64 for float64 students) and alphas (B, H_t).
        Gradients flow to the student's q, k and a student bias that requires grad (MDT's learned
        relative-position bias), never to the teacher's tensors or alpha.
    """
    _check_term_inputs(student_q, student_k, teacher_q, teacher_k, teacher_v, out_weight)
    if loss not in ("kl", "mse"):
        raise ValueError(f"unknown SHD loss kind {loss!r}; choose 'kl' or 'mse'")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, h_s, n, d_s = student_q.shape
    h_t, d_t, m = teacher_q.shape[1], teacher_q.shape[-1], teacher_k.shape[-2]
    s_bias = _as_4d_bias(student_bias, "student_bias", b, h_s, n, m)
    t_bias = _as_4d_bias(teacher_bias, "teacher_bias", b, h_t, n, m)
    chunk = _check_chunk(chunk_size, n, auto_chunk_size(b, h_t, h_s, max(n, m)))
    resolved = resolve_groups(h_t, h_s, mode, groups, generator_seed)
    dtype = compute_dtype(student_q, teacher_q)
    spec = _Spec(resolved, float(temperature), chunk, loss, eps, d_s**-0.5, d_t**-0.5, dtype)
    if teacher_out is not None and teacher_out.shape != teacher_q.shape:
        raise ValueError(f"teacher_out {tuple(teacher_out.shape)} must be (B, H_t, N, d_t) = {tuple(teacher_q.shape)}")
    t_q, t_k, t_v, t_w = teacher_q.detach(), teacher_k.detach(), teacher_v.detach(), out_weight.detach()
    t_bias = None if t_bias is None else t_bias.detach()
    t_out = None if teacher_out is None else teacher_out.detach()
    if chunk >= n:
        alphas, mix, kept = _one_block(t_q, t_k, t_v, t_w, t_bias, t_out, mode, spec)
    else:
        alphas, kept = _alphas(_teacher_blocks(t_q, t_k, t_bias, spec, t_out), t_v, t_w, mode, spec, b), None
        mix = None if is_identity(resolved, h_t) else _mixing(alphas, resolved, dtype)  # (B, H_s, H_t)
    per_sample = _BlockwiseMapLoss.apply(student_q, student_k, s_bias, t_q, t_k, t_bias, mix, kept, spec)
    return per_sample, alphas


def _alphas(blocks: Blocks, t_v: Tensor, t_w: Tensor, mode: SqueezeMode, spec: _Spec, b: int) -> Tensor:
    """(B, H_t) alphas of the mode from a block source (all ones for the identity squeeze)."""
    if is_identity(spec.groups, t_v.shape[1]):
        return torch.ones(b, t_v.shape[1], dtype=spec.dtype, device=t_v.device)
    return mode_alphas(blocks, t_v, t_w, spec.groups, mode, None, True, spec.dtype)  # the dtype's default ridge


@torch.no_grad()
def _one_block(t_q: Tensor, t_k: Tensor, t_v: Tensor, t_w: Tensor, t_bias: Tensor | None, t_out: Tensor | None,
               mode: SqueezeMode, spec: _Spec) -> tuple[Tensor, Tensor | None, Tensor]:
    """All N rows in one block: the teacher's logits serve alpha and the target (computed once).

    Returns alphas (B, H_t), the mixing weights (None for the identity) and the squeezed target
    at T_a (B, H_s, N, N), which the loss keeps for its backward.
    """
    with torch.autocast(t_q.device.type, enabled=False):
        logits = _logits(t_q, t_k, spec.teacher_scale, t_bias, spec.dtype)  # (B, H_t, N, N)
        probs = logits.softmax(-1)  # T = 1: drives alpha
        alphas = _alphas(lambda: iter([(probs, t_out)]), t_v, t_w, mode, spec, t_q.shape[0])
        soft = probs if spec.temperature == 1.0 else logits.div_(spec.temperature).softmax(-1)  # (B, H_t, N, N)
        del logits, probs
        if is_identity(spec.groups, t_q.shape[1]):
            return alphas, None, soft
        mix = _mixing(alphas, spec.groups, spec.dtype)  # (B, H_s, H_t)
        b, h_t, n, m = soft.shape
        return alphas, mix, (mix @ soft.view(b, h_t, n * m)).view(b, -1, n, m)  # (B, H_s, N, N)


@torch.no_grad()
def head_similarity_qk(q: Tensor, k: Tensor, bias: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
    """:func:`~.groups.head_similarity` of the maps softmax(q k^T / sqrt(d) + bias), over row blocks.

    The cosine similarity of two flattened maps needs only their Frobenius inner products, sums
    over query rows, so head matching's calibration also runs without whole maps.

    Args:
        q, k: (B, H, N, d) queries and keys. bias: additive logit bias broadcastable to (B, H, N, N).
        chunk_size: query rows per block; None = :func:`auto_chunk_size`.

    Returns:
        (H, H) float32 (float64 for float64 inputs): the sum over samples of the cosine similarities.
    """
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must both be (B, H, N, d)")
    b, h, n, d = q.shape
    t_bias = _as_4d_bias(bias, "bias", b, h, n)
    chunk = _check_chunk(chunk_size, n, auto_chunk_size(b, h, h, n))
    dtype = compute_dtype(q)
    gram = torch.zeros(b, h, h, dtype=dtype, device=q.device)  # (B, H, H): <A_a, A_b> per sample
    with torch.autocast(q.device.type, enabled=False):
        for r0, r1 in _row_blocks(n, chunk):
            p = _logits(q[:, :, r0:r1], k, d**-0.5, _bias_rows(t_bias, r0, r1), dtype).softmax(-1)  # (B, H, c, N)
            flat = p.flatten(2)  # (B, H, c*N)
            gram += flat @ flat.transpose(1, 2)
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(torch.finfo(dtype).tiny).sqrt()  # (B, H)
    return (gram / (norms[:, :, None] * norms[:, None, :])).sum(0)  # (H, H)
