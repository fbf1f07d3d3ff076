#!/usr/bin/env python
"""``accelerate launch scripts/train_mdt_shd.py --config ...``: train a student with KD / SHD.

The command is :mod:`shd_diffusion.commands.train` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
