"""`pabee.provenance`: atomic writes keep a file's permissions and make the rename durable; results name their
inputs portably, never by this machine's absolute paths."""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from pabee.pretrained import bundled_model_path
from pabee.provenance import portable_command, portable_path, provenance, write_atomic

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


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


# --- portable paths ------------------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path, monkeypatch) -> dict[str, Path]:
    """A repository (the current folder), a GLUE folder and a temporary folder of this test's own, apart."""
    folders = {name: tmp_path / name for name in ("repo", "glue", "temp", "elsewhere")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.chdir(folders["repo"])
    monkeypatch.setenv("GLUE_DIR", str(folders["glue"]))
    monkeypatch.setattr(tempfile, "tempdir", str(folders["temp"]))
    return folders


def test_the_bundled_model_is_named_by_its_name(roots):
    folder = bundled_model_path()
    assert portable_path(folder) == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable_path(str(folder / "1_Pooling")) == "sentence-transformers/all-MiniLM-L6-v2/1_Pooling"


def test_glue_data_is_named_under_glue_dir(roots):
    assert portable_path(roots["glue"] / "SST-2" / "dev.tsv") == "$GLUE_DIR/SST-2/dev.tsv"
    assert portable_path(str(roots["glue"])) == "$GLUE_DIR"


def test_a_relative_glue_dir_counts_from_the_current_folder(roots, monkeypatch):
    monkeypatch.setenv("GLUE_DIR", "../glue")
    assert portable_path(roots["glue"] / "MRPC" / "dev.tsv") == "$GLUE_DIR/MRPC/dev.tsv"


def test_without_glue_dir_a_glue_file_elsewhere_stays_as_it_is(roots, monkeypatch):
    monkeypatch.delenv("GLUE_DIR")
    path = str(roots["glue"] / "SST-2" / "dev.tsv")
    assert portable_path(path) == path


def test_a_path_in_the_current_folder_is_relative_to_it(roots):
    assert portable_path(roots["repo"] / "runs" / "robustness" / "SST-2" / "plain") == "runs/robustness/SST-2/plain"
    assert portable_path(roots["repo"]) == "."


def test_a_temporary_path_is_marked_temporary(roots):
    assert portable_path(roots["temp"] / "ray-bench" / "single.jsonl") == "$TMPDIR/ray-bench/single.jsonl"


def test_the_innermost_folder_names_a_path(roots, monkeypatch):
    inner_temp = roots["repo"] / ".tmp"  # a temporary folder inside the repository
    monkeypatch.setattr(tempfile, "tempdir", str(inner_temp))
    assert portable_path(inner_temp / "x.json") == "$TMPDIR/x.json"
    assert portable_path(roots["repo"] / "runs" / "x") == "runs/x"
    monkeypatch.chdir(roots["temp"])  # a repository inside the temporary folder
    monkeypatch.setattr(tempfile, "tempdir", str(roots["temp"].parent))
    assert portable_path(roots["temp"] / "runs" / "x") == "runs/x"
    assert portable_path(roots["repo"] / "y") == "$TMPDIR/repo/y"


def test_a_symlinked_folder_is_the_same_folder(roots, monkeypatch):
    link = roots["elsewhere"] / "glue-link"
    link.symlink_to(roots["glue"], target_is_directory=True)
    monkeypatch.setenv("GLUE_DIR", str(link))
    assert portable_path(roots["glue"] / "RTE" / "dev.tsv") == "$GLUE_DIR/RTE/dev.tsv"


@pytest.mark.parametrize("name", ["bert-base-uncased", "runs/mrpc", "../shared/glue/MRPC", "glue/sst2:validation", ""])
def test_a_name_or_relative_path_is_left_as_it_is(roots, name):
    assert portable_path(name) == name


def test_an_absolute_path_elsewhere_is_left_as_it_is(roots):
    path = str(roots["elsewhere"] / "mpnet" / "all-mpnet-base-v2")
    assert portable_path(path) == path
    assert portable_path("/") == "/"


def test_a_prefix_that_is_not_a_folder_boundary_does_not_match(roots):
    path = str(roots["glue"]) + "-old/SST-2/dev.tsv"  # .../glue-old is not in .../glue
    assert portable_path(path) == path


def test_a_command_names_its_paths_portably(roots):
    glue, repo, temp = (str(roots[name]) for name in ("glue", "repo", "temp"))
    command = (
        f"pabee run-glue --data_dir {glue}/MRPC --output_dir={repo}/runs/mrpc --model MRPC={repo}/runs/m "
        f"--input '{temp}/in.tsv'; see https://example.org/x and {roots['elsewhere']}/keep"
    )
    assert portable_command(command) == (
        "pabee run-glue --data_dir $GLUE_DIR/MRPC --output_dir=runs/mrpc --model MRPC=runs/m "
        f"--input '$TMPDIR/in.tsv'; see https://example.org/x and {roots['elsewhere']}/keep"
    )


def test_provenance_records_a_portable_command(roots, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/script.py", "--glue_dir", str(roots["glue"]), "--x", "1"])
    assert provenance(model="m")["command"] == "script.py --glue_dir $GLUE_DIR --x 1"
    given = f"pabee bench --data_dir {roots['glue']}/SST-2"
    assert provenance(given)["command"] == "pabee bench --data_dir $GLUE_DIR/SST-2"


LOCAL_PATH = re.compile(r"""(?<![^\s='"`(])/(?:work|tmp|root|home)/[^\s'"`;,)]*""")


def _strings(value):
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, str):
        yield value


def test_no_committed_result_holds_a_local_absolute_path():
    files = sorted(RESULTS.rglob("*.json"))
    assert len(files) > 20
    found = [
        f"{path.relative_to(RESULTS)}: {match}"
        for path in files
        for text in _strings(json.loads(path.read_text()))
        for match in LOCAL_PATH.findall(text)
    ]
    assert not found, "results must name inputs portably (pabee.provenance.portable_path):\n" + "\n".join(found[:20])
