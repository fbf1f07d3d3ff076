"""``python -m shd_diffusion.demo``: the same command as ``python scripts/demo.py``."""

import sys

from .cli import main

sys.exit(main())
