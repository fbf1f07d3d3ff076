"""Shared test helpers."""

from __future__ import annotations

import pytest


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state, so the next Accelerator may use other settings."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny tensors (threads only contend on a shared CPU)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate():
    """A clean accelerate state before and after the test (tests build Accelerators)."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()
