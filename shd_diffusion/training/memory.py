"""Memory: refuse a batch that cannot fit before any run file is written; count the training state.

Without this a huge ``train.global_batch_size`` is killed by the kernel's out-of-memory killer
(no message, no exception) after the run folder was written. The estimate is a *lower bound* on
what one process must hold, so it refuses only batches that certainly cannot fit; batches it
lets through may still be too large (the real peak is several times the bound).

:func:`training_state_bytes` counts what the weights, gradients, optimizer state, EMA and teacher
take per GPU (docs/training.md's FSDP2 table).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cli import BadInput
from ..families import family_of

__all__ = ["activation_bytes_per_image", "available_bytes", "check_batch_fits", "OPTIMIZER_STATE_TENSORS",
           "training_state_bytes"]

_GIB = 2**30

# Float32 state tensors per parameter, read off the optimizers' code: timm's Adan keeps exp_avg,
# exp_avg_sq, exp_avg_diff and neg_pre_grad; AdamW exp_avg and exp_avg_sq (step counts are scalars).
OPTIMIZER_STATE_TENSORS = {"adan": 4, "adan_pytorch": 4, "adamw": 2}


def activation_bytes_per_image(student: nn.Module, precision: str, grad_checkpointing: bool) -> int:
    """A lower bound on the bytes one training image costs the student's forward + backward.

    Each transformer block must keep, for its backward, at least q, k, v (3 N D values), the
    attention output (N D) and the MLP's hidden layer (4 N D): 8 N D values in the autocast dtype
    (2 bytes for bf16, 4 for fp32). With gradient checkpointing it keeps at least its input, N D
    float32 values. Add the image itself (C H W float32). Attention maps, the MLP's activation
    output, optimizer state, the teacher and the allocator's overhead are left out on purpose.
    """
    family = family_of(student)
    tokens, size = family.num_tokens(student), family.footprint(student)  # N; D, blocks, C H W (0: the data decides)
    per_value = 2 if precision == "bf16" else 4
    per_block = tokens * size.width * (4 if grad_checkpointing else 8 * per_value)
    return size.blocks * per_block + size.image_values * 4


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Free memory on ``device`` now, and its name for messages (CUDA: the device's free memory)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"GPU {torch.cuda.get_device_name(device)}"
    import psutil

    return int(psutil.virtual_memory().available), "this machine's RAM"


def check_batch_fits(student: nn.Module, micro_batch: int, processes: int, train_cfg: Any,
                     device: torch.device) -> None:
    """Refuse, in one line, a micro-batch whose lower-bound activation memory exceeds what is free.

    On a CPU every process of the machine shares its RAM, so the bound is multiplied by the
    process count; on a GPU each process has its own device.

    Raises:
        BadInput: naming ``train.global_batch_size``, the bound, the free memory and the fixes.
    """
    per_image = activation_bytes_per_image(student, train_cfg.precision, train_cfg.grad_checkpointing)
    sharing = processes if device.type != "cuda" else 1
    need = per_image * micro_batch * sharing
    free, where = available_bytes(device)
    if need <= free:
        return
    fixes = "raise train.grad_accum (micro-batch = global batch / (processes x grad_accum))" + (
        "" if train_cfg.grad_checkpointing else ", set train.grad_checkpointing=true") + \
        " or lower train.global_batch_size"
    raise BadInput(
        f"train.global_batch_size={train_cfg.global_batch_size} cannot fit: a micro-batch of {micro_batch} images "
        f"needs at least {need / _GIB:.1f} GiB for the student's forward + backward ({per_image / 2**20:.2f} MiB "
        f"per image{f' x {sharing} processes' if sharing > 1 else ''}, a lower bound), but {where} has "
        f"{free / _GIB:.1f} GiB free: {fixes}"
    )


def training_state_bytes(student_params: int, teacher_params: int, world: int, optimizer: str = "adan",
                         teacher_bytes: int = 2, shard_student: bool = True,
                         shard_teacher: bool = False) -> dict[str, int]:
    """Bytes one GPU holds for the training state (activations, buffers and the allocator excluded).

    The student trains in float32 (autocast computes in bf16; the master weights stay float32):
    4 bytes of weight, 4 of gradient, 4 per optimizer state tensor and 4 of EMA per parameter,
    each divided over ``world`` when FSDP shards the student (rounded up). The frozen teacher
    holds only its weights, ``teacher_bytes`` each (2 for ``teacher.dtype=bfloat16``), whole on
    every GPU unless ``shard_teacher``. What FSDP gathers transiently (one block's float32 weights and
    gradients, and the next block's prefetch) is not in these sums.

    Args:
        student_params / teacher_params: parameter counts. world: GPUs.
        optimizer: ``optim.name`` (its state tensors per parameter: :data:`OPTIMIZER_STATE_TENSORS`).

    Returns:
        ``{"weights", "grads", "optimizer", "ema", "teacher", "total"}`` in bytes.
    """
    per = -(-student_params // world) if shard_student else student_params  # ceil
    teacher = -(-teacher_params // world) if shard_teacher else teacher_params
    parts = {"weights": 4 * per, "grads": 4 * per, "optimizer": 4 * OPTIMIZER_STATE_TENSORS[optimizer] * per,
             "ema": 4 * per, "teacher": teacher_bytes * teacher}
    return {**parts, "total": sum(parts.values())}
