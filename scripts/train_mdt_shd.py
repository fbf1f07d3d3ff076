#!/usr/bin/env python
"""``accelerate launch scripts/train_mdt_shd.py --config ...``: train a student with KD / SHD.

The command is :mod:`shd_diffusion.training.cli` (``--help`` lists the flags); it moves to
``shd_diffusion.commands.train`` in the same shape.
"""

import sys

from shd_diffusion.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
