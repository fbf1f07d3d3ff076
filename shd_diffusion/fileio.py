"""Atomic file writes: a path exists only when its content is complete and on disk.

The one implementation every writer uses (checkpoints, latent shards, sample shards, caches,
reports): write to a unique temporary name in the same folder, fsync it, ``os.replace`` it over
the target (a rename within one filesystem is atomic), then fsync the folder so that the rename
itself survives a crash. On any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (folders: best effort, some filesystems refuse)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it becomes ``final`` atomically.

    The caller writes the whole file to the yielded path (with any writer: ``torch.save``,
    safetensors, ``np.savez``, PIL). The temporary name ends in ``.tmp`` plus the final suffix, so
    writers that pick a format by extension still do. Concurrent writers never share a name.
    """
    final = Path(final)
    fd, tmp_name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file a normal new file's mode
    try:
        yield tmp
        fsync_path(tmp)  # data on disk before the rename makes it visible
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final.parent)  # the rename itself survives a crash


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))
