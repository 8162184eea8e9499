"""`pabee.provenance`: atomic writes keep a file's permissions and make the rename durable."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest

from pabee.provenance import write_atomic


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("existing", [0o644, 0o640, 0o664, 0o600])
def test_an_atomic_write_keeps_the_mode_the_file_had(tmp_path, existing):
    path = tmp_path / "results.json"
    path.write_text("old")
    path.chmod(existing)
    with umask(0o077):  # the umask does not decide for an existing file
        write_atomic(path, "new")
    assert path.read_text() == "new" and mode(path) == existing


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umasks_mode_not_0600(tmp_path, mask, expected):
    with umask(mask):
        write_atomic(tmp_path / "new.md", b"text")
    assert mode(tmp_path / "new.md") == expected
    assert [p.name for p in tmp_path.iterdir()] == ["new.md"]


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_a_temporary_folder_gets_the_umasks_mode_not_0700(tmp_path, mask):
    from pabee.provenance import make_temp_folder

    with umask(mask):
        folder = make_temp_folder(tmp_path, ".export.")
    assert mode(folder) == 0o777 & ~mask and folder.name.startswith(".export.")


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", (tmp_path / "a.txt").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (synced.append(("replace", None)), real_replace(a, b))[1])
    write_atomic(tmp_path / "a.txt", "x")
    assert synced == [("file", False), ("replace", None), ("dir", True)]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.json"
    path.write_text("old")
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
