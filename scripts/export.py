#!/usr/bin/env python
"""``python scripts/export.py CHECKPOINT --out DIR``: a trained student to diffusers folders (and the Hub).

The command is :mod:`shd_diffusion.commands.export` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.export import main

if __name__ == "__main__":
    sys.exit(main())
