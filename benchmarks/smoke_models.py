#!/usr/bin/env python
"""Run a benchmark script with every registry model shrunk to toy size (``gpu_suite.sh --smoke``).

    python benchmarks/smoke_models.py benchmarks/bench_train_step.py --student MDTv2-S/2 ...

Each registry entry keeps its family, patch size and head count (so MDTv2-B/2 -> S/2 is still a
12 -> 6 head squeeze and DiT-XL/2 -> S/2 a 16 -> 6 one) but gets head dim 8 and 4 blocks (MDTv2:
decode_layer 2, the demo student's split); then the script runs unchanged with the remaining
arguments, as ``python SCRIPT ARGS`` would. This is plumbing only: no figure from a shrunk model
says anything about the real ones.
"""

from __future__ import annotations

import runpy
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOY_DEPTH = 4  # blocks of every shrunk model
TOY_DECODE_LAYER = 2  # MDTv2: 1 encoder-in + 1 encoder-out + 2 decoder blocks
TOY_HEAD_DIM = 8


def shrink_registry() -> None:
    """Replace every ``MODEL_CONFIGS`` entry by its toy-size version, in place."""
    from shd_diffusion.models import registry

    for name, make in list(registry.MODEL_CONFIGS.items()):
        kw = dict(make.keywords, depth=TOY_DEPTH, hidden_size=TOY_HEAD_DIM * make.keywords["num_heads"])
        if "decode_layer" in kw:
            kw["decode_layer"] = TOY_DECODE_LAYER
        registry.MODEL_CONFIGS[name] = partial(make.func, **kw)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    script = sys.argv[1]
    shrink_registry()
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
