"""The demo's small file helpers: atomic text/JSON writes, short content hashes, relative paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text

__all__ = ["relative", "short_hash", "write_json", "write_text"]


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically, creating the parent folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def short_hash(obj: Any) -> str:
    """8 hex digits of the sha256 of ``obj`` as sorted JSON: names run, sample and score folders."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, else to the working directory (the committed teacher from the
    repository root), else absolute: what the reports show, so they carry no machine's paths."""
    resolved = Path(path).resolve()
    for base in (Path(root), Path.cwd()):
        try:
            return str(resolved.relative_to(base.resolve()))
        except ValueError:
            continue
    return str(resolved)
