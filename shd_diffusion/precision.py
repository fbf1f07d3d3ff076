"""The one precision rule for what this package computes beside the model's own layers.

Timestep features, guidance, attention maps and SHD's solves run in float32 for float32, bf16
and fp16 inputs (float32 is the floor: bf16 would round a guidance scale of 3.8 to 3.797), and in
float64 when an input is float64, so a model moved with ``model.double()`` computes in float64
throughout. Sharp parity with reference outputs needs exactly that: float32 results differ
between CPUs by a few 1e-6 of the output (``exp`` is not correctly rounded everywhere).
"""

from __future__ import annotations

import torch

__all__ = ["compute_dtype"]


def compute_dtype(*inputs: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 if any input (a tensor or a dtype) is float64, else float32."""
    dtypes = [x if isinstance(x, torch.dtype) else x.dtype for x in inputs]
    return torch.float64 if torch.float64 in dtypes else torch.float32
