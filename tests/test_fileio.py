"""The one atomic-write helper: complete files or nothing, normal permissions, format suffix kept."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
import stat

import pytest
import torch

from shd_diffusion.fileio import atomic_dir, atomic_path, atomic_write_text, remove_stale_temps, stale_temps
from shd_diffusion.latents import _write_atomic

REPO = Path(__file__).resolve().parents[1]


def test_a_crash_mid_write_leaves_neither_target_nor_temp(tmp_path):
    final = tmp_path / "x.json"
    final.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert final.read_text() == "old"  # the previous version is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_success_replaces_the_target_with_a_normal_mode(tmp_path):
    final = tmp_path / "grid.png"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.endswith(".tmp.png")  # same folder, same suffix
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    atomic_write_text(final, "text")
    assert final.read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_atomic_dir_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary folder
    final.mkdir()  # an empty target folder is replaced
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and not final.joinpath("a.txt").exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("done")
    assert (final / "sub" / "a.txt").read_text() == "done"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with pytest.raises(OSError):  # a non-empty folder is never replaced
        with atomic_dir(final) as tmp:
            (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in final.rglob("*")) == ["a.txt", "sub"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_atomic_dir_replace_swaps_out_a_full_folder_or_leaves_it(tmp_path, monkeypatch):
    final = tmp_path / "asset"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):  # a failed write: the old folder stays as it was
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    real_replace = os.replace

    def fail_second_rename(src, dst):  # the swap's second rename fails: the old folder is put back
        if Path(src).name.endswith(".tmp"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    with atomic_dir(final, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asset"]  # the old folder is removed


def test_stale_temps_finds_the_temp_of_a_killed_writer(tmp_path):
    final = tmp_path / "shard_[1].npz"  # glob characters in the name are taken literally
    (tmp_path / ".shard_[1].npz.old1.tmp").write_bytes(b"")  # the name before the suffix was kept
    (tmp_path / ".other.npz.x.tmp.npz").write_bytes(b"")  # another file's temp
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        # While the writer runs its temp is exactly what a killed writer would leave.
        assert stale_temps(final) == sorted([tmp, tmp_path / ".shard_[1].npz.old1.tmp"])
    assert stale_temps(final) == [tmp_path / ".shard_[1].npz.old1.tmp"]


def test_remove_stale_temps_removes_a_killed_writers_files_and_folders_only(tmp_path):
    final = tmp_path / "export"
    folder = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".export.", suffix=".tmp"))  # atomic_dir's name
    (folder / "sub").mkdir()
    (folder / "sub" / "w.safetensors").write_bytes(b"half")
    fd, file = tempfile.mkstemp(dir=tmp_path, prefix=".export.", suffix=".tmp")  # atomic_path's name
    os.close(fd)
    keep = [tmp_path / ".export2.abc.tmp", tmp_path / "export.tmp", tmp_path / ".export.json"]
    for path in keep:
        path.write_text("not ours")
    assert sorted(remove_stale_temps(final)) == sorted([folder, Path(file)])
    assert sorted(tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_latent_shards_get_the_mode_of_every_other_output(tmp_path, umask):
    """safetensors writes its own temporary file (mode 0600) and renames it over atomic_path's."""
    old = os.umask(umask)
    try:
        _write_atomic(tmp_path / "shard.safetensors", {"x": torch.zeros(3)}, {"k": "v"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shard.safetensors").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["shard.safetensors"]


def test_a_failed_safetensors_write_is_the_os_error_it_wraps(tmp_path):
    """A real I/O failure inside safetensors (a file-size limit: EFBIG, as ENOSPC would be) comes
    out as an OSError naming the shard, and leaves no file; run in a child for the limit."""
    code = f"""
import json, resource, signal, sys, torch
from shd_diffusion.latents import _write_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    _write_atomic(sys.argv[1], {{"x": torch.zeros(100000)}}, {{}})
except OSError as err:
    print(json.dumps([err.errno, err.filename]))
"""
    path = tmp_path / "shard.safetensors"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [errno.EFBIG, str(path)]
    assert list(tmp_path.iterdir()) == []
