"""Optimizers, the learning-rate schedule and the EMA of the student's weights.

Default optimizer: ``"adan"`` = timm's ``Adan``. Chosen by measurement
(``tests/test_optim.py``, ``benchmarks/bench_optim.py``):

* Correctness. Against a float64 reference of the official update rule (sail-sg/Adan ``adan.py``,
  restart-free, decoupled ``param / (1 + lr * wd)`` decay) over 20 steps of a toy regression,
  timm's Adan agrees to 7e-16 (foreach and per-tensor paths, wd 0 and 0.02). adan-pytorch 0.1.0
  follows a different trajectory (max gap 1.1e-1, still 6.9e-2 after allowing for its skipped
  first step): its first ``step()`` only records the gradient (yet applies the ``1 / (1 + lr * wd)``
  decay when weight_decay > 0), its moments start at the second gradient with a real first
  difference ``g2 - g1`` instead of 0, and its bias corrections count the skipped step. That is
  not the upstream MDTv2 recipe.
* Speed (``benchmarks/bench_optim.py``; figures in the README's "Measured results"): on the CPU
  timm's Adan is the fastest Adan (its per-tensor default; its foreach path is slower there),
  adan-pytorch is slower still (a Python loop only), and both cost more than AdamW. timm's
  ``foreach=None`` picks foreach on CUDA and per-tensor on CPU, where torch's foreach ops are a
  slower fallback. No GPU figure yet: run the benchmark on one.

Betas in our configs are ALWAYS the official convention ``(0.98, 0.92, 0.99)`` (decay rates of
the averages); :func:`build_optimizer` converts them to adan-pytorch's ``1 - beta`` convention.
Gradient clipping (upstream ``max_grad_norm 1``, which the official Adan applies inside
``step``) is the training loop's ``accelerator.clip_grad_norm_`` before ``step``: the same
scaling up to the epsilon in the clip factor (torch 1e-6, official Adan 1e-8).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "check_hyperparameters",
    "OptimizerName",
    "OFFICIAL_ADAN_BETAS",
    "build_optimizer",
    "warmup_lr_lambda",
    "build_scheduler",
    "EMA",
]

OptimizerName = Literal["adan", "adan_pytorch", "adamw"]

# Official Adan betas (sail-sg/Adan, MDTv2 upstream): decay rates of m, v (gradient difference), n.
OFFICIAL_ADAN_BETAS: tuple[float, float, float] = (0.98, 0.92, 0.99)
_ADAMW_BETAS: tuple[float, float] = (0.9, 0.999)


def check_hyperparameters(
    name: OptimizerName, lr: float, betas: tuple[float, ...] | None, weight_decay: float, eps: float
) -> None:
    """Raise ValueError naming the ``optim.*`` setting that is out of range (used by the config too).

    Args:
        name, lr, betas, weight_decay, eps: as for :func:`build_optimizer` (betas None = default).
    """
    if name not in ("adan", "adan_pytorch", "adamw"):
        raise ValueError(f"unknown optimizer {name!r} (optim.name); choose one of 'adan', 'adan_pytorch', 'adamw'")
    values = {"lr": lr, "weight_decay": weight_decay, "eps": eps}
    for key, value in values.items():
        if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            bound = "> 0" if key == "lr" else ">= 0"
            raise ValueError(f"optim.{key} must be a finite number {bound}, got {value}")
    if betas is not None:
        _check_betas(tuple(float(b) for b in betas), name)


def _check_betas(betas: tuple[float, ...], name: OptimizerName) -> None:
    """Raise ValueError for betas outside (0, 1), of the wrong count, or in the 1 - beta convention."""
    expected = 2 if name == "adamw" else 3
    if len(betas) != expected:
        example = _ADAMW_BETAS if name == "adamw" else OFFICIAL_ADAN_BETAS
        raise ValueError(f"optim.name={name!r} takes {expected} betas (optim.betas), got {tuple(betas)}; e.g. {example}")
    for i, b in enumerate(betas):
        if not 0.0 < b < 1.0:
            raise ValueError(f"optim.betas[{i}] = {b} is outside (0, 1)")
    if name != "adamw" and all(b < 0.5 for b in betas):
        # (0.02, 0.08, 0.01) is adan-pytorch's spelling of the official betas; taken as official
        # betas it would make the averages forget almost everything each step.
        raise ValueError(
            f"Adan betas {tuple(betas)} look like the 1 - beta convention of adan-pytorch; our config "
            f"uses the official convention {OFFICIAL_ADAN_BETAS} (decay rates). Pass "
            f"{tuple(round(1 - b, 10) for b in betas)} instead; build_optimizer converts for adan-pytorch."
        )
    if name != "adamw" and any(b < 0.5 for b in betas):
        warnings.warn(
            f"Adan betas {tuple(betas)} mix large and small values; our config uses the official "
            f"convention {OFFICIAL_ADAN_BETAS}: check none was written as 1 - beta",
            stacklevel=3,
        )


def build_optimizer(
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    name: OptimizerName = "adan",
    lr: float = 5e-4,
    betas: tuple[float, ...] | None = None,
    weight_decay: float = 0.0,
    eps: float = 1e-8,
    foreach: bool | None = None,
) -> torch.optim.Optimizer:
    """Build the training optimizer.

    Args:
        params: Parameters or parameter-group dicts, as for any ``torch.optim`` optimizer.
        name: ``"adan"`` (timm's Adan, official update rule; the default, see module docstring),
            ``"adan_pytorch"`` (the adan-pytorch package, kept for comparison) or ``"adamw"``.
        lr: Learning rate. 5e-4 is the MDTv2-S/2 upstream value at global batch 256; scale it
            yourself for other batch sizes.
        betas: Official convention for Adan (decay rates, default ``(0.98, 0.92, 0.99)``); for
            AdamW two betas (default ``(0.9, 0.999)``). Values that look like adan-pytorch's
            ``1 - beta`` convention are rejected.
        weight_decay: Decoupled weight decay (Adan: ``param / (1 + lr * wd)``). Upstream uses 0.
        eps: Denominator epsilon.
        foreach: Multi-tensor path for ``"adan"``/``"adamw"``; None lets the library choose
            (foreach on CUDA). adan-pytorch has none, so True is an error there.

    Returns:
        The optimizer. Its ``state_dict()`` holds only tensors and Python scalars, so it loads
        under ``torch.load(weights_only=True)``.
    """
    if betas is None:
        betas = _ADAMW_BETAS if name == "adamw" else OFFICIAL_ADAN_BETAS
    betas = tuple(float(b) for b in betas)
    check_hyperparameters(name, lr, betas, weight_decay, eps)

    if name == "adan":
        from timm.optim import Adan as TimmAdan

        return TimmAdan(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach)
    if name == "adan_pytorch":
        if foreach:
            raise ValueError("adan-pytorch has no foreach path: use name='adan' (timm) or foreach=None")
        from adan_pytorch import Adan as LucidrainsAdan

        # adan-pytorch weights the *new* value by beta: its beta is 1 - our (official) beta.
        converted = tuple(1.0 - b for b in betas)
        return LucidrainsAdan(params, lr=lr, betas=converted, eps=eps, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach
        )
    raise ValueError(f"unknown optimizer {name!r}; choose one of 'adan', 'adan_pytorch', 'adamw'")


def warmup_lr_lambda(warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps`` optimizer steps, then constant.

    Step ``s`` (0-based, as LambdaLR counts) gets ``min(1, (s + 1) / warmup_steps)``, so the first
    update already moves (lr / warmup_steps) and step ``warmup_steps - 1`` is at the full lr.

    Args:
        warmup_steps: Number of warmup steps; 0 means constant lr from the start (DiT/MDT upstream).

    Returns:
        A plain function of the step, so ``LambdaLR.state_dict()`` stores no closure state: the
        schedule is a pure function of the restored ``last_epoch``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        if warmup_steps == 0:
            return 1.0
        return min(1.0, (step + 1) / warmup_steps)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup then constant lr, as a LambdaLR (``state_dict`` holds ``last_epoch``).

    Call ``scheduler.step()`` once after every ``optimizer.step()``.

    Args:
        optimizer: The optimizer whose groups' ``lr`` is the peak lr.
        warmup_steps: See :func:`warmup_lr_lambda`.

    Returns:
        The scheduler; save and restore its ``state_dict()`` with the optimizer's for exact resume.
    """
    return LambdaLR(optimizer, warmup_lr_lambda(warmup_steps))


def _checked_decay(decay: float) -> float:
    """``decay`` itself, or ValueError when it is outside [0, 1]."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    return decay


class EMA:
    """Exponential moving average of a model's weights, kept in float32.

    The shadow is keyed by the model's own ``state_dict`` names, so :meth:`state_dict` loads into
    the model with ``strict=True`` (what sampling does, and what upstream releases). Parameters
    are averaged; buffers (persistent ones, as in ``state_dict``) are copied. There is no hidden
    counter, so the state dict alone resumes the EMA exactly.

    Build it from the unwrapped model (``accelerator.unwrap_model``) so names carry no
    ``module.`` / ``_orig_mod.`` prefix.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999) -> None:
        """Copy the model's current weights into the shadow.

        Args:
            model: The (unwrapped) student.
            decay: Default decay per :meth:`update`; upstream DiT/MDT use 0.9999.
        """
        self.decay = _checked_decay(decay)
        param_ids = {id(p) for p in model.parameters()}
        self.shadow: dict[str, torch.Tensor] = {}
        self._param_names: list[str] = []
        self._buffer_names: list[str] = []
        self._aliases: dict[str, str] = {}  # tied weights: second name -> first name
        first_name: dict[int, str] = {}
        model_state = model.state_dict(keep_vars=True)  # exactly the names load_state_dict expects
        self._order = list(model_state)
        for name, tensor in model_state.items():
            if id(tensor) in first_name:
                self._aliases[name] = first_name[id(tensor)]
                continue
            first_name[id(tensor)] = name
            if id(tensor) in param_ids:
                if not tensor.is_floating_point():
                    raise TypeError(
                        f"EMA can only average floating-point parameters; {name} is {tensor.dtype}"
                    )
                self.shadow[name] = tensor.detach().to(torch.float32, copy=True)
                self._param_names.append(name)
            else:
                self.shadow[name] = tensor.detach().clone()
                self._buffer_names.append(name)

    def _model_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's parameters and buffers in shadow order (one dict build, no per-tensor ops)."""
        params = dict(model.named_parameters(remove_duplicate=False))
        buffers = dict(model.named_buffers(remove_duplicate=False))
        try:
            return [params[n] for n in self._param_names], [buffers[n] for n in self._buffer_names]
        except KeyError as err:
            raise KeyError(
                f"model has no tensor {err.args[0]!r} that the EMA tracks: pass the same unwrapped "
                "model the EMA was built from (no DDP 'module.' or torch.compile '_orig_mod.' prefix)"
            ) from None

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> float:
        """``shadow = decay * shadow + (1 - decay) * param`` for all parameters; copy buffers.

        Args:
            model: The model just stepped (same names as at construction).
            decay: Override of the default decay for this call.

        Returns:
            The decay used.
        """
        d = self.decay if decay is None else _checked_decay(decay)
        params, buffers = self._model_tensors(model)
        shadow_params = [self.shadow[n] for n in self._param_names]
        if shadow_params:
            if params[0].device != shadow_params[0].device:
                raise RuntimeError(
                    f"EMA shadow is on {shadow_params[0].device} but the model is on {params[0].device}: "
                    "call ema.to(device) after moving the model"
                )
            # fp32 masters are used as they are; low-precision params are upcast once per call.
            src = [p if p.dtype == torch.float32 else p.float() for p in params]
            torch._foreach_lerp_(shadow_params, src, 1.0 - d)
        if buffers:
            torch._foreach_copy_([self.shadow[n] for n in self._buffer_names], buffers)
        return d

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights (cast to each tensor's dtype) and buffers into ``model``.

        Args:
            model: Same architecture and names as at construction.
        """
        params, buffers = self._model_tensors(model)
        for dst, name in zip(params + buffers, self._param_names + self._buffer_names):
            dst.copy_(self.shadow[name])

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``model`` (e.g. to sample mid-training).

        The model's own weights are backed up (one extra copy of the model) and restored on exit,
        even if the body raises.

        Args:
            model: The training model.

        Yields:
            ``model`` holding the EMA weights.
        """
        params, buffers = self._model_tensors(model)
        backup = [t.detach().clone() for t in params + buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for dst, saved in zip(params + buffers, backup):
                    dst.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as a model state dict (float32 parameters), loadable with ``strict=True``.

        Returns:
            ``{name: tensor}`` in the model's ``state_dict`` order, tied names included.
        """
        return {name: self.shadow[self._aliases.get(name, name)] for name in self._order}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a shadow saved by :meth:`state_dict` (or any matching model state dict).

        Args:
            state_dict: ``{name: tensor}`` with exactly the tracked names.
        """
        missing = sorted(set(self._order) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(self._order))
        if missing or unexpected:
            raise KeyError(
                f"EMA state dict does not match the model: missing {missing}, unexpected {unexpected}"
            )
        for name, tensor in self.shadow.items():
            tensor.copy_(state_dict[name])

    def to(self, device: torch.device | str) -> EMA:
        """Move the shadow to ``device`` (keeps float32).

        Args:
            device: Target device, normally the model's.

        Returns:
            self.
        """
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self
