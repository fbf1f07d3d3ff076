#!/usr/bin/env python
"""The embedded SHD demo in one command (``--help`` for the options); the code is shd_diffusion/demo/."""

from __future__ import annotations

import sys

from shd_diffusion.demo.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
