"""Measuring memory on the CPU, where there is no ``torch.cuda.max_memory_allocated``."""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the CPU allocator's live bytes while ``fn`` runs, above what was live before.

    Replays torch.profiler's memory events (allocations positive, frees negative) in time order;
    unlike RSS it is not inflated by glibc keeping freed blocks.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak
