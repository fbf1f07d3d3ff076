#!/usr/bin/env python
"""``python -m sampling.sample``: class-conditional images from a checkpoint into an ADM .npz.

The command is :mod:`shd_diffusion.commands.sample` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.sample import main

if __name__ == "__main__":
    sys.exit(main())
