"""What a model folder holds, how to tell the two kinds apart, and how to load a runtime and tokenizer from one.

- A **saved model** (`run-glue --output_dir`, `save_pretrained`): `config.json` of model type `pabee`, the weights
  (safetensors) and the tokenizer. It runs on torch.
- An **export** (`pabee export`): the ONNX graph, `config.json`, the tokenizer and the manifest `pabee_onnx.json`
  (format, precision, the layer boundaries named inside the graph, the SHA-256 of every file). It runs on ONNX Runtime,
  after every file has been checked against the manifest.

Everything that loads a model from a folder (the pipeline, `pabee export`, the benchmarks) comes through here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from .configuration import PabeeConfig
from .errors import PabeeError
from .modeling import PabeeForSequenceClassification, Runtime
from .onnx_model import OnnxPabeeModel
from .provenance import file_digest
from .settings import ExitSpec

__all__ = [
    "ATTENTION_KERNELS",
    "BACKENDS",
    "DTYPES",
    "FORMAT_VERSION",
    "MANIFEST",
    "is_onnx_folder",
    "load_config",
    "load_model_folder",
    "load_runtime",
    "load_tokenizer",
    "read_manifest",
    "resolve_backend",
]

MANIFEST = "pabee_onnx.json"
FORMAT_VERSION = 3  # bumped when the export's layout or its graph's names change
BACKENDS = ("torch", "onnxruntime")
DTYPES = ("float32", "bfloat16", "float16")  # what a saved model may be loaded as; it is saved in float32
ATTENTION_KERNELS = ("sdpa", "eager")


def is_onnx_folder(folder: str | Path) -> bool:
    """True for a folder written by `pabee export` (it holds the manifest)."""
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of an export, after checking its format, that it confines the export to the folder (always)
    and (with `verify`) every file's SHA-256.

    Confined: every file the manifest references (graphs, `config.json`) is listed with its hash, each name is a
    plain file name inside the folder (no `..`, no path, nothing absolute), and no graph in the folder is
    unlisted. A folder someone else wrote cannot make ONNX Runtime open a file elsewhere, nor slip a graph in.
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PabeeError(f"{folder / MANIFEST} cannot be read: {error}") from None
    if not isinstance(manifest, dict):
        raise PabeeError(f"{folder / MANIFEST} is not a pabee manifest (not a JSON object); export the model again.")
    if manifest.get("format") != FORMAT_VERSION:
        made_by = manifest.get("versions", {}).get("pabee", "an unknown version")
        raise PabeeError(
            f"{folder} was exported by pabee {made_by} in format {manifest.get('format')!r}; this pabee reads format "
            f"{FORMAT_VERSION}. Export the model again with this version (pabee export)."
        )
    files = _listed_files(folder, manifest)
    for name, digest in files.items() if verify else ():
        path = folder / name
        if not path.is_file():
            raise PabeeError(f"{folder} is incomplete: {name} is missing; export the model again.")
        if file_digest(path) != digest:
            raise PabeeError(f"{path} differs from the file that was exported (SHA-256 mismatch); export again.")
    return manifest


_SHA256 = re.compile(r"[0-9a-f]{64}")
GRAPH_SUFFIXES = (".onnx", ".ort", ".data")  # what ONNX Runtime loads: graphs and their external weights


def _listed_files(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest's `files` (name → SHA-256), checked to confine the export to `folder` (see `read_manifest`)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise PabeeError(f"{folder / MANIFEST} lists no file hashes, so nothing can be verified; export again.")
    for name, digest in files.items():
        _check_plain_name(folder, name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise PabeeError(f"{folder / MANIFEST} has no SHA-256 for {name}; export the model again.")
    for name in _referenced_files(folder, manifest):
        _check_plain_name(folder, name)
        if name not in files:
            raise PabeeError(f"{folder / MANIFEST} references {name} but lists no hash for it; export again.")
    unlisted = sorted(p.name for p in folder.iterdir() if p.name.endswith(GRAPH_SUFFIXES) and p.name not in files)
    if unlisted:
        raise PabeeError(
            f"{folder} holds graph file(s) its manifest does not list ({', '.join(unlisted)}); remove them or export "
            "again."
        )
    return files


def _referenced_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Every file name the runtime will open: `config.json` and the graph."""
    try:
        names = [manifest["graph"]]
    except (KeyError, TypeError) as error:
        raise PabeeError(f"{folder / MANIFEST} is malformed (no {error}); export the model again.") from None
    return ["config.json", *names]


def _check_plain_name(folder: Path, name: Any) -> None:
    """A name the manifest gives must be a file name in `folder` itself, never a path out of it."""
    plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
    if not plain or "\0" in name or Path(name).is_absolute():
        raise PabeeError(f"{folder / MANIFEST} names {name!r}, which is not a plain file name in the folder.")


def resolve_backend(folder: str | Path, backend: str | None) -> str:
    """The backend asked for, or the one the folder is for; a backend the folder cannot run is a `PabeeError`."""
    exported = is_onnx_folder(folder)
    if backend not in (None, *BACKENDS):
        raise PabeeError(f"backend {backend!r} is unknown; use {' or '.join(BACKENDS)}.")
    if backend == "onnxruntime" and not exported:
        raise PabeeError(f"{folder} is not an ONNX export (no {MANIFEST}); make one with: pabee export --model DIR.")
    if backend == "torch" and exported:
        raise PabeeError(f"{folder} holds ONNX graphs; use the onnxruntime backend, or the original model folder.")
    return backend or ("onnxruntime" if exported else "torch")


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved beside the model (both kinds of folder hold one)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot load a tokenizer from {folder}: {error}") from None


def load_config(folder: str | Path) -> PabeeConfig:
    """The PABEE config a saved model or an export holds; a folder without one is a `PabeeError`."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PabeeError(f"{folder} is not a model folder (no config.json); give a folder saved by run-glue.")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot read the model config in {folder}: {error}") from None
    if config.model_type != "pabee":
        raise PabeeError(f"{folder} holds a {config.model_type!r} model, not a PABEE model.")
    return config


def exit_setting_note(folder: str | Path, spec: ExitSpec, own: ExitSpec) -> str:
    """What `predict` and `serve` say about the exit setting they answer with: which one, where it came from, and
    how to get a faster one that can be trusted (a saved setting not chosen on data may be a sweep's worst)."""
    if spec != own:
        return f"{spec.title} (set by the flags; the model's own: {own.title})"
    if spec.is_full_model:
        return (
            f"full model, the model's default; for fewer layers with a guarantee, choose a setting on data: "
            f"`pabee calibrate --model {folder} --task_name TASK --data_dir DIR` (or --input_file TEXTS)"
        )
    report = Path(folder) / "calibration.md"
    if report.is_file():
        return f"{spec.title}, the model's default, chosen by `pabee calibrate` ({report})"
    return (
        f"{spec.title}, the model's default, not chosen on data here: check it with `pabee calibrate --model "
        f"{folder} ... --dry_run`, or pass --patience 0 for the full model"
    )


def load_model_folder(
    folder: str | Path,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    config: PabeeConfig | None = None,
) -> PabeeForSequenceClassification:
    """A saved PABEE model in eval mode, quietly; a folder that is not one is a `PabeeError`. `config`: the
    folder's, when the caller has read it already (a folder is read once per load)."""
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    config = config or load_config(folder)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar is noise in a command's or server's output
    try:
        extra = {"config": config, "dtype": dtype, "attn_implementation": attn_implementation}
        extra = {name: value for name, value in extra.items() if value is not None}
        return PabeeForSequenceClassification.from_pretrained(folder, **extra).eval()
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot load the model in {folder}: {error}") from None
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_runtime(
    folder: str | Path,
    backend: str | None = None,
    *,
    threads: int | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Runtime:
    """The runtime a folder holds: the torch model (`dtype`, `attn_implementation` as transformers'
    `from_pretrained` takes them) or the verified export on ONNX Runtime (`threads` per session)."""
    folder = Path(folder)
    if resolve_backend(folder, backend) == "torch":
        return load_model_folder(folder, dtype, attn_implementation)
    if dtype is not None or attn_implementation is not None:
        raise PabeeError("dtype and attn_implementation apply to the torch backend; export with --quantize.")
    return OnnxPabeeModel(folder, read_manifest(folder), threads=threads, config=load_config(folder))
