"""FSDP2 for the student: what is sharded, what the launcher may ask for, and full state dicts.

``accelerate launch --use_fsdp --fsdp_version 2`` shards the trained modules (student plus
feature projectors) with torch's ``fully_shard``: every block of the student's top-level block
lists is one FSDP unit, the rest one root unit, each parameter split along dim 0 over the ranks.
The trainer does this itself rather than through ``accelerator.prepare`` because accelerate only
applies FSDP on GPUs (a CPU launch would silently fall back to DDP) and its default wrap policy
gathers the whole student at once.

The frozen teacher is *not* sharded: every rank holds it whole, outside the FSDP tree, the
optimizer and any gradient reduction. Its bytes are bf16 weights only (no grads, no optimizer
state, no master copy), so replicating it costs 2 bytes per teacher parameter per GPU (23.8 GB
for FLUX.1-dev, see docs/training.md), and the SHD capture reads its out-projection weights as
plain full tensors, with no gather per forward.

Checkpoints keep the one format of :mod:`shd_diffusion.checkpoint`: every sharded tensor
(student, EMA, optimizer state) is gathered into a full CPU tensor on save, and a loaded full
tensor is cut into this rank's shard on load, so a checkpoint written by N processes (FSDP or
not) resumes on M.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..train_config import ExperimentConfig

__all__ = ["fsdp_requested", "check_fsdp_launch", "check_teacher_apart", "shard_trained",
           "full_state", "gradient_sync", "shard_like", "shard_optimizer_state", "grad_norm_and_clip"]

_TRUE = ("1", "true", "yes")


def _env_flag(name: str, default: str = "false") -> bool:
    return os.environ.get(name, default).lower() in _TRUE


def fsdp_requested() -> bool:
    """Whether ``accelerate launch --use_fsdp`` (or ``accelerate config``) chose FSDP."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_fsdp_launch(cfg: ExperimentConfig) -> None:
    """Refuse, in one line, FSDP settings and training options the sharded trainer does not support.

    Called before any work when FSDP was chosen. The mixed-precision agreement with
    ``train.precision`` is :func:`~shd_diffusion.training.run.check_launch`'s (it holds for FSDP too).

    Raises:
        ConfigError: naming the launcher setting or config field and the fix.
    """
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(f"FSDP version {version} was chosen (`accelerate launch --use_fsdp` defaults to 1): this "
                          "trainer shards with FSDP2 (torch fully_shard); launch with --fsdp_version 2")
    if _env_flag("FSDP_OFFLOAD_PARAMS"):
        raise ConfigError("--fsdp_offload_params true is not supported (the student's shards, gradients and Adan "
                          "state stay on the GPU): launch with --fsdp_offload_params false")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise ConfigError("--fsdp_activation_checkpointing true is not supported here: launch without it and set "
                          "train.grad_checkpointing=true (the student's own checkpointing)")
    tc = cfg.train
    if tc.compile:
        raise ConfigError("train.compile=true with FSDP is not supported (torch.compile of the sharded student is "
                          "untested here): set train.compile=false, or launch DDP")
    if tc.sample_every or tc.figure_every:
        raise ConfigError("train.sample_every / train.figure_every draw previews on the main process only, which a "
                          "sharded student cannot run alone: set both to 0 under FSDP (sample from the checkpoints)")


def check_teacher_apart(teacher: nn.Module | None, trained: nn.Module) -> None:
    """Refuse a teacher that could train: a parameter that requires grad or is shared with the trained modules.

    Under FSDP the teacher stays outside the sharded tree and the optimizer; a teacher parameter
    that requires grad would get gradients that no rank reduces (silently different per rank),
    and one shared with the student would be sharded under the teacher's feet.

    Raises:
        ConfigError: naming the first such parameter and the fix.
    """
    if teacher is None:
        return
    trained_ptrs = {p.data_ptr() for p in trained.parameters() if p.numel()}
    for name, param in teacher.named_parameters():
        if param.requires_grad:
            raise ConfigError(f"FSDP needs a frozen teacher, but teacher parameter {name} requires grad: freeze it "
                              "(teacher.requires_grad_(False)) before training; the teacher is never optimized")
        if param.numel() and param.data_ptr() in trained_ptrs:
            raise ConfigError(f"teacher parameter {name} shares its storage with the student: FSDP would shard the "
                              "teacher's copy too; build the student from a copy of the teacher's weights")


def _block_lists(module: nn.Module) -> Iterable[nn.ModuleList]:
    """The top-level block lists of ``module`` (a ModuleList not inside another ModuleList)."""
    for child in module.children():
        if isinstance(child, nn.ModuleList):
            yield child
        else:
            yield from _block_lists(child)


def shard_trained(trained: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``trained`` in place with FSDP2 over all ranks: one unit per block, then the root.

    Each block is gathered just before its forward and freed after it (and again for the
    backward), so a rank holds its 1/N shard of everything plus one block in full at a time.

    Args:
        trained: the trained modules (student and projectors), identical on every rank.
        device: this rank's device (the mesh's device type).

    Returns:
        The same module, now an FSDP module whose parameters are DTensors sharded on dim 0.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for blocks in list(_block_lists(trained)):
        for block in blocks:
            fully_shard(block, mesh=mesh)
    fully_shard(trained, mesh=mesh)
    return trained


def full_state(state: Any, keep: bool = True) -> Any:
    """``state`` with every DTensor gathered into a full CPU tensor (collective: call on every rank).

    Containers are rebuilt with the same keys and order; other values pass through. With
    ``keep=False`` (ranks that do not write) each gathered tensor is dropped at once and None
    stands in its place, so only the writer ever holds the whole state.
    """
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        full = state.full_tensor()  # (every rank takes part in the all-gather)
        return full.cpu() if keep else None
    if isinstance(state, dict):
        return type(state)((k, full_state(v, keep)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(full_state(v, keep) for v in state)
    return state


@contextlib.contextmanager
def gradient_sync(trained: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce-scatter the gradients in this backward only when ``sync`` (the last micro-batch).

    Earlier micro-batches accumulate unsharded local gradients, as DDP's ``no_sync`` does.
    """
    trained.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        trained.set_requires_gradient_sync(True)


def _shard_as(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut like ``like`` (a DTensor: this rank's shard, no communication), else unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(full, DTensor):
        return full
    # Every rank read the same file, so each cuts its own shard locally (src_data_rank=None).
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def shard_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full state dict cut into the sharding of ``like`` (a sharded module's or EMA's state dict)."""
    return {k: _shard_as(v, like[k]) if k in like else v for k, v in full.items()}


def shard_optimizer_state(full: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict (torch's format, integer parameter ids) cut into this rank's shards.

    State id ``i`` belongs to the ``i``-th parameter over the param groups (torch's numbering);
    each of its tensors shaped like that parameter is cut like it, the rest (step counts) kept.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for pid, entries in full["state"].items():
        param = params[int(pid)]
        state[pid] = {k: _shard_as(v, param) if isinstance(v, torch.Tensor) and v.shape == param.shape else v
                      for k, v in entries.items()}
    return {**full, "state": state}


def grad_norm_and_clip(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total gradient norm of sharded parameters (a plain tensor), clipping to ``max_norm``.

    torch's ``clip_grad_norm_`` reduces DTensor gradients across the shards itself; the norm comes
    back replicated, and ``full_tensor`` makes it a plain tensor like the DDP path's.
    """
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
