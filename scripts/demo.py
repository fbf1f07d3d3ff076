#!/usr/bin/env python
"""``python scripts/demo.py``: the embedded SHD demo and its studies.

The command is :mod:`shd_diffusion.commands.demo` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
