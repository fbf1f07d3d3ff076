#!/usr/bin/env python
"""``python scripts/inspect_checkpoint.py PATH``: a checkpoint's tensors and the registry config it fits.

The command is :mod:`shd_diffusion.commands.inspect_checkpoint` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.inspect_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
