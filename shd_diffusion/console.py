"""The one way the package talks to the user: a line from the main process only.

Every command (training, sampling, scoring, the demo) prints through :func:`say`, so a multi-GPU
job prints each line once, and diagnostics can go to stderr where stdout carries a result
(``python -m sampling.score --json -``).
"""

from __future__ import annotations

import sys

__all__ = ["is_main_process", "say"]


def is_main_process() -> bool:
    """True on rank 0 of an ``accelerate launch`` / ``torchrun`` job, and in a plain process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from accelerate import PartialState

    return PartialState().is_main_process


def say(msg: str, tag: str | None = None, *, err: bool = False) -> None:
    """Print ``msg`` (prefixed ``[tag]``) on the main process, flushed so it interleaves with tqdm.

    ``err=True`` writes to stderr (for commands whose stdout is their result).
    """
    if not is_main_process():
        return
    print(f"[{tag}] {msg}" if tag else msg, file=sys.stderr if err else sys.stdout, flush=True)
