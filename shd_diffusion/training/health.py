"""Checkpoint health: which saved checkpoints a diverged run can safely go back to.

Each step records its global mean loss and gradient norm; a checkpoint is judged healthy once the
steps around it are known (:func:`~shd_diffusion.checkpoint.checkpoint_health`). The records stay
on the device until the next host sync (logging or a save), so a step adds no sync of its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import HEALTH_RECENT, HEALTH_WINDOW, checkpoint_health, list_checkpoints
from ..cli import Diverged

__all__ = ["NonFiniteLossError", "RunHealth"]

VERDICTS_KEPT = 1000  # newest checkpoint verdicts remembered (older checkpoints are long deleted)


class NonFiniteLossError(Diverged):
    """The loss became NaN/inf; the message names the step and the last healthy checkpoint."""


class RunHealth:
    """Per-step (loss, grad norm) records and the verdict on each checkpoint of one run.

    Args:
        factor: ``train.healthy_factor`` (how far from the running median is still healthy).
    """

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.history: list[tuple[int, float, float]] = []  # global (step, loss, grad norm), host side
        self.pending: list[torch.Tensor] = []  # (2,) per step since the last host sync
        self.verdicts: dict[int, bool] = {}  # checkpoint step -> healthy
        self.unjudged: list[int] = []  # checkpoint steps whose first step on their weights is unknown

    def record(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Keep one step's mean loss and grad norm on the device until the next :meth:`sync`."""
        self.pending.append(torch.stack([loss, grad_norm.float()]))  # (2,)

    def sync(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor], step: int, diverged: bool = False) -> None:
        """Move the pending records to the host (one all-reduce) and judge the checkpoints.

        ``step``: the steps done so far (the last pending record is step ``step``).
        ``diverged``: step ``step + 1`` was non-finite; it is recorded as NaN (no update was applied).
        """
        if self.pending:
            records = reduce_mean(torch.stack(self.pending)).tolist()  # (n, 2)
            first = step - len(records) + 1
            self.history.extend((first + k, loss, grad) for k, (loss, grad) in enumerate(records))
            self.pending = []
        if diverged:
            self.history.append((step + 1, math.nan, math.nan))
        for saved in list(self.unjudged):  # judged before trimming: a long log interval loses nothing
            verdict = checkpoint_health(self.history, saved, self.factor)
            if verdict is not None or saved < step - HEALTH_WINDOW:  # None this late: no stats (old file)
                self.verdicts[saved] = bool(verdict)
                self.unjudged.remove(saved)
        # Keep what judging the next checkpoints needs (the window before them) and the newest verdicts.
        del self.history[: max(0, len(self.history) - 2 * HEALTH_WINDOW)]
        for saved in sorted(self.verdicts)[:-VERDICTS_KEPT]:
            del self.verdicts[saved]

    def last_healthy(self, run_dir: Path) -> tuple[int, Path] | None:
        """(step, path) of the newest checkpoint in ``run_dir`` known to be healthy."""
        for step, path in reversed(list_checkpoints(run_dir)):
            if self.verdicts.get(step):
                return step, path
        return None

    def non_finite_error(self, what: str, step: int, run_dir: Path) -> NonFiniteLossError:
        """The error that stops the run, naming the newest healthy checkpoint and how to resume it."""
        healthy = self.last_healthy(run_dir)
        start = -1 if healthy is None else healthy[0]
        unhealthy = [p.name for s, p in list_checkpoints(run_dir) if s > start]
        head = f"non-finite {what} at step {step}; no update was applied"
        rule = (f"healthy = losses and grad norms finite and within {self.factor:g}x their "
                f"running median over the {HEALTH_RECENT} steps up to it and the first step on its weights")
        if healthy is not None:
            later = f"; not healthy: {', '.join(unhealthy)}" if unhealthy else ""
            return NonFiniteLossError(
                f"{head}. Last healthy checkpoint: {healthy[1]} ({rule}){later}. Lower optim.lr or check the data, "
                f"then resume it with --resume step={start} (later checkpoints are moved to "
                f"checkpoints/after_step_{start:08d}/, not deleted)"
            )
        held = f" (not healthy: {', '.join(unhealthy)})" if unhealthy else ""
        return NonFiniteLossError(
            f"{head}. No checkpoint is healthy{held} ({rule}): lower optim.lr or check the data and start "
            "again in a new run folder (train.run_name)"
        )

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``health`` entry (host records only: call :meth:`sync` first)."""
        return {"history": [list(r) for r in self.history], "verdicts": dict(self.verdicts),
                "unjudged": list(self.unjudged), "factor": self.factor}

    def load_state_dict(self, health: dict[str, Any]) -> None:
        """Restore from a checkpoint's ``health`` entry ({} for checkpoints of older versions).

        The factor stays this run's ``train.healthy_factor``.
        """
        self.history = [(int(s), float(loss), float(g)) for s, loss, g in health.get("history", [])]
        self.verdicts = {int(k): bool(v) for k, v in health.get("verdicts", {}).items()}
        self.unjudged = [int(k) for k in health.get("unjudged", [])]
