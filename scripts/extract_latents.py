#!/usr/bin/env python
"""``python scripts/extract_latents.py --data DIR --out DIR``: an image folder to VAE latent shards.

The command is :mod:`shd_diffusion.commands.extract_latents` (``--help`` lists the flags).
"""

import sys

from shd_diffusion.commands.extract_latents import main

if __name__ == "__main__":
    sys.exit(main())
