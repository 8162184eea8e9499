"""What every results file carries and how it is written: provenance (command, versions, hardware) and atomic writes.

Every number we publish is written with what produced it, and files are replaced atomically so an interrupted
run never leaves half a results file behind. The inputs a result names are named portably (`portable_path`), so
the result reads the same on another machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import shlex
import stat
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "file_digest",
    "file_identity",
    "fsync_folder",
    "hardware",
    "make_temp_folder",
    "portable_command",
    "portable_path",
    "provenance",
    "versions",
    "write_atomic",
    "write_json",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The vector instructions that decide CPU speed (AVX2, AVX-512, VNNI, AMX, bf16); results differ with them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or "vnni" in f or "bf16" in f)
    except OSError:
        pass
    return []


def hardware() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("pabee", "torch", "transformers", "datasets", "accelerate", "tokenizers", "scikit-learn"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def _bundled_model() -> tuple[str, str] | None:
    """The bundled MiniLM's name and folder, or None when it is not installed (`pretrained` is imported only here:
    it loads transformers, which this module's writers do not need)."""
    from .pretrained import BUNDLED_MODEL_NAME, bundled_model_path

    try:
        return BUNDLED_MODEL_NAME, str(bundled_model_path())
    except (ImportError, FileNotFoundError):
        return None


def _below(path: str, root: str) -> list[str] | None:
    """The parts of `path` below `root` ([] for `root` itself), or None when `path` is not in it. Compared as
    written and with symlinks resolved, so /tmp and its real folder (/private/tmp on macOS) count as one."""
    for folder in dict.fromkeys((os.path.normpath(root), os.path.realpath(root))):
        if folder == os.sep:  # the filesystem root anchors nothing
            continue
        for candidate in dict.fromkeys((os.path.normpath(path), os.path.realpath(path))):
            if candidate == folder:
                return []
            if candidate.startswith(folder + os.sep):
                return candidate[len(folder) + 1 :].split(os.sep)
    return None


def portable_path(path: str | os.PathLike[str]) -> str:
    """How a result names an input: the same on every machine, never this machine's absolute path.

    - the bundled MiniLM's folder (or a file in it): the model's name, `sentence-transformers/all-MiniLM-L6-v2`
      (`.../1_Pooling` after it for a path inside);
    - in `$GLUE_DIR` (when set): `$GLUE_DIR/<rest>`;
    - in the current folder (the repository, when a script runs from its root): relative to it (`runs/mrpc`);
    - in the system's temporary folder: `$TMPDIR/<rest>`, marked as a place that does not last.

    When several folders hold the path, the innermost wins. Anything else is returned as it is: a relative
    path (already portable), a hub name such as `bert-base-uncased`, an absolute path elsewhere.
    """
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    bundled = _bundled_model()
    if bundled is not None and (rest := _below(text, bundled[1])) is not None:
        return "/".join([bundled[0], *rest])
    glue = os.environ.get("GLUE_DIR")
    roots = [("$GLUE_DIR", os.path.abspath(glue))] if glue else []
    roots += [("", os.getcwd()), ("$TMPDIR", tempfile.gettempdir())]
    found = [(rest, name) for name, root in roots if (rest := _below(text, root)) is not None]
    if not found:
        return text
    rest, name = min(found, key=lambda item: len(item[0]))  # stable: on a tie the earlier root ($GLUE_DIR) wins
    return "/".join([name, *rest]) if name else "/".join(rest) or "."


_ABSOLUTE_PATH = re.compile(r"""(?<![^\s='"`(])/[^\s'"`;,)]+""")  # at the start, or after a space, =, quote or (


def portable_command(text: str) -> str:
    """`text` (a command line, a label) with every absolute path in it made portable by `portable_path`."""
    return _ABSOLUTE_PATH.sub(lambda match: portable_path(match.group()), text)


def provenance(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """Command line, date, versions and hardware, plus whatever the caller adds (model, data files, ...). The
    command's absolute paths are made portable (`portable_command`); the caller makes its own values portable."""
    return {
        "command": portable_command(command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "versions": versions(),
        "hardware": hardware(),
    }


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file: what a cache key or an export manifest records about it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: Path) -> dict[str, Any]:
    """A file by content, so a record can tell when an input changed: its path, size and SHA-256 (a file changed in
    place, under the same path, is a different file), or that it is missing."""
    if not path.is_file():
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_digest(path)}


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`, so readers see the old or the new file whole.

    The file keeps the mode an existing file had, and a new one gets the mode the umask gives (not the 0600 of
    `tempfile`), so a results file or shard stays readable by whoever could read it before. The folder is fsynced
    after the rename, so the new name survives a power cut along with the contents.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    fd, tmp = _new_temp_file(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _new_temp_file(folder: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new file opened for writing, created with mode 0666 so the kernel applies the umask (`mkstemp` uses 0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return _create_fresh(folder, prefix, suffix, lambda path: os.open(path, flags, 0o666))


def make_temp_folder(parent: str | Path, prefix: str) -> Path:
    """A new folder to build something in before renaming it into place, with the mode the umask gives (0755 for
    the usual 022), not `mkdtemp`'s 0700, which the folder would keep after the rename."""
    return _create_fresh(Path(parent), prefix, "", lambda path: path.mkdir(mode=0o777))[1]


def _create_fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], Any]) -> tuple[Any, Path]:
    """`create` on a new random name in `parent` (it must raise `FileExistsError` when the name is taken); what
    it returned and the name."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return create(candidate), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in `folder` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
