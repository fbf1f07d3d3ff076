"""The numerically sensitive tests, rerun on the CPU's other vector paths.

CI runs on whatever CPU it is given (Intel with AVX2, AMD EPYC with AVX-512), and torch's
kernels round differently on each (``exp``, reductions). A test that holds only on one path's
last bits turns CI red on another machine. The tests marked ``numerics`` (official parity, chunked
vs whole maps, alpha oracles, diffusion, determinism, attention paths) run once in the ordinary
suite on the machine's own path, and again here in a subprocess under ``ATEN_CPU_CAPABILITY``
set to ``default`` (no vector extensions) and ``avx2``: about 20 s each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CAPABILITY = "ATEN_CPU_CAPABILITY"
TESTS = Path(__file__).resolve().parent


@pytest.mark.numerics
def test_torch_runs_on_the_vector_path_asked_for() -> None:
    """Inside the reruns: the variable took effect (else the reruns would test nothing new)."""
    asked = os.environ.get(CAPABILITY)
    if asked is None:
        pytest.skip(f"{CAPABILITY} not set: this process runs on the machine's own vector path")
    got = torch.backends.cpu.get_cpu_capability()
    if got == "DEFAULT" and asked.lower() != "default":
        pytest.skip(f"this CPU lacks {asked}; torch fell back to the default path")
    assert got.lower() == asked.lower()


@pytest.mark.skipif(CAPABILITY in os.environ, reason=f"{CAPABILITY} is set: this is a rerun already")
@pytest.mark.parametrize("capability", ["default", "avx2"])
@pytest.mark.slow
def test_numerics_hold_on_other_vector_paths(capability: str) -> None:
    env = {**os.environ, CAPABILITY: capability}
    command = [sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider", str(TESTS)]
    proc = subprocess.run(command, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{CAPABILITY}={capability}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
