#!/usr/bin/env python
"""``python scripts/convert_inception.py --out PATH``: offline FID Inception weights for torch-fidelity.

The command is :mod:`shd_diffusion.commands.convert_inception` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.convert_inception import main

if __name__ == "__main__":
    sys.exit(main())
