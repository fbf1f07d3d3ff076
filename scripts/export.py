"""Export a trained DiT / MDTv2 student to diffusers folders (and the Hub); see shd_diffusion.export.

    python scripts/export.py runs/s2_from_b2/checkpoints/step_00400000.pt --out exports/s2_from_b2 \
        --metrics samples/s2_from_b2/metrics.json [--weights raw] [--push-to-hub org/name]
"""

import sys

from shd_diffusion.export import main

if __name__ == "__main__":
    sys.exit(main())
