#!/usr/bin/env python
"""``python -m sampling.score SAMPLES --ref REF``: FID / sFID / IS / precision / recall / KID of a .npz.

The command is :mod:`shd_diffusion.commands.score` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.score import main

if __name__ == "__main__":
    sys.exit(main())
