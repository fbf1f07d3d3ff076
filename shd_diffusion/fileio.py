"""Atomic file writes: a path exists only when its content is complete and on disk.

The one implementation every writer uses (checkpoints, latent shards, sample shards, caches,
reports): write to a unique temporary name in the same folder, fsync it, ``os.replace`` it over
the target (a rename within one filesystem is atomic), then fsync the folder so that the rename
itself survives a crash. On any error the temporary file is removed and the target is untouched.
:func:`atomic_dir` does the same for a whole folder (exports: a folder of several files).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
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


def _new_file_mode(path: Path, mode: int) -> None:
    """Give ``path`` the mode a plain new file/folder gets (``mode`` less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


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
    try:
        yield tmp
        _new_file_mode(tmp, 0o666)  # mkstemp makes 0600, and so do writers that replace the file (safetensors)
        fsync_path(tmp)  # data on disk before the rename makes it visible
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(final.parent)  # the rename itself survives a crash


def temp_globs(name_glob: str) -> tuple[str, str]:
    """Glob patterns (relative to the folder) of :func:`atomic_path`'s temporary files for finals
    whose names match ``name_glob``: ``.NAME.<random>.tmp`` plus the final suffix, and the same
    without the suffix, as written before it was kept."""
    suffix = Path(name_glob).suffix
    return f".{name_glob}.*.tmp", f".{name_glob}.*.tmp{suffix}"


def stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Temporary files :func:`atomic_path` left beside ``final`` when its writer was killed.

    Delete them only where nothing else may be writing ``final`` at the moment (e.g. the rank
    that owns the file).
    """
    final = Path(final)
    found = (p for pattern in temp_globs(glob.escape(final.name)) for p in final.parent.glob(pattern))
    return sorted(set(found))


def remove_stale_temps(final: str | os.PathLike[str]) -> list[Path]:
    """Delete what :func:`atomic_path` or :func:`atomic_dir` left beside ``final`` when its writer
    was killed (temporary files and folders; see :func:`stale_temps` for when that is safe).

    Returns:
        The removed paths.
    """
    found = stale_temps(final)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def os_errors_of_safetensors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise a safetensors writer's I/O failure as the ``OSError`` it wraps, naming ``path``.

    safetensors reports a full disk as ``SafetensorError("Error while serializing: I/O error: No
    space left on device (os error 28)")``; as an OSError it becomes the entry points' one
    ``error:`` line (:func:`shd_diffusion.cli.run_main`).
    """
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from err


def atomic_write_bytes(final: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically."""
    atomic_write_bytes(final, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it becomes ``final`` atomically.

    ``final`` must be absent or an empty folder (a rename replaces nothing else), unless
    ``replace``: then an existing ``final`` is first renamed aside and removed after the swap
    (POSIX has no portable folder exchange, so a crash between the two renames leaves it as
    ``.NAME.old-*``). Every file written into the yielded folder gets a plain new file's mode
    (0644 under umask 022) and is fsynced before the rename. On any error the temporary folder is
    removed and ``final`` is as it was; a killed writer's folder is found by :func:`stale_temps`.
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    _new_file_mode(tmp, 0o777)  # mkdtemp makes 0700
    old: Path | None = None
    try:
        yield tmp
        for folder, _, files in os.walk(tmp):
            for name in files:
                _new_file_mode(Path(folder, name), 0o666)  # writers like safetensors make 0600
                fsync_path(os.path.join(folder, name))
            _new_file_mode(Path(folder), 0o777)
            fsync_path(folder)
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            os.replace(final, old)  # onto the empty placeholder folder
        try:
            os.replace(tmp, final)  # POSIX rename: replaces an empty folder, refuses a non-empty one
        except BaseException:
            if old is not None:
                os.replace(old, final)  # put the old folder back
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read in 1 MiB chunks (what a result depends on, not its path)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
