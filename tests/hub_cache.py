"""A fake Hugging Face Hub cache for the tests that load Hub ids offline (the real loading code runs)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

HUB_REV = "89abcdef0123456789abcdef0123456789abcdef"  # a snapshot's commit hash


def offline_hub_cache(root: Path, monkeypatch) -> Callable[..., Path]:
    """An empty offline cache under ``root``: HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE set in the
    environment and in huggingface_hub's constants (read at its import); monkeypatch restores them.

    Returns ``add(repo_id, folder, revision=HUB_REV, under="")``, which caches ``folder``'s files as
    the repo's snapshot at ``revision`` (inside ``under`` when given), points ``refs/main`` at it and
    returns the snapshot folder.
    """
    import huggingface_hub.constants as constants

    cache = Path(root) / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, folder: Path, revision: str = HUB_REV, under: str = "") -> Path:
        repo = cache / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / revision
        shutil.copytree(folder, snapshot / under if under else snapshot)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
        return snapshot

    return add
