#!/usr/bin/env python
"""Train a student with KD / SHD: ``accelerate launch scripts/train_mdt_shd.py --config ...``.

The command line lives in :mod:`shd_diffusion.training.cli` (also the ``shd-train`` command);
``--help`` lists the flags.
"""

import sys

from shd_diffusion.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
