"""Batch prediction on Ray Data: a corpus of texts in, labels, scores and exit layers out, one model per actor.

`predict_dataset` adds `label`, `score`, `exit_layer` and `error` columns to any Ray Dataset (a row that cannot be
classified gets null answers and an `error`, the other rows their answers). Each actor of the pool loads
the model once and hands every batch of rows to `PabeePipeline.run`, which sorts them by length and plans
padding-aware forwards, exactly as `pabee predict` does in one process.

`run_ray_predict` is `pabee predict --ray`: input files (jsonl, csv, tsv, parquet, txt; a glob or a folder) in,
one output shard per input file out. Nothing is lost and nothing written twice: a shard is written whole
(temporary file, then rename) once the last row of its input has been predicted, and a re-run of the same
command skips the inputs whose shard exists. A job killed midway loses at most the files in flight and leaves no
partial shard. That needs each file's rows in order, so the job runs with Ray Data's `preserve_order`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from ..arguments import PredictArguments
from ..errors import PabeeError
from ..folders import load_config
from ..pipeline import DEFAULT_MAX_LENGTH, Example, PabeePipeline
from ..provenance import write_atomic, write_json
from ..rules import build_criterion
from ..settings import ExitSpec, exit_spec_from
from ..texts import example_problem, replace_surrogates

__all__ = ["FORMATS", "PREDICTION_COLUMNS", "predict_dataset", "run_ray_predict"]

PREDICTION_COLUMNS = ("label", "score", "exit_layer", "error")  # error: None, or why a row was not classified
ROWS_PER_CALL = 1024  # rows an actor gets per call: enough for length-sorted batches with little padding
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "text"}
JOB_FILE = "pabee_predict.json"  # in the output folder: which job its shards belong to, and their names
LOCK_FILE = ".pabee_predict.lock"  # in the output folder: held by the job writing there


def _examples(
    batch: pd.DataFrame, text_column: str, text_pair_column: str | None
) -> tuple[list[Example], list[str | None]]:
    """The rows' examples, and per row why the model cannot take it (None when it can): a value that is not a
    string, or text that is not Unicode. Such a row costs only itself, never the other rows of its batch."""
    for name in (text_column, text_pair_column):
        if name is not None and name not in batch.columns:
            raise ValueError(f"The dataset has no column {name!r}; its columns are {', '.join(batch.columns)}.")
    texts = batch[text_column].tolist()
    pairs = batch[text_pair_column].tolist() if text_pair_column else [None] * len(texts)
    problems: list[str | None] = []
    for text, pair in zip(texts, pairs, strict=True):
        if not isinstance(text, str) or not (pair is None or isinstance(pair, str)):
            bad = text if not isinstance(text, str) else pair
            problems.append(f"the row holds {bad!r:.80} where a text (a string) belongs")
        else:
            problems.append(example_problem(text, pair))
    return list(zip(texts, pairs, strict=True)), problems


class _Predictor:
    """One per Ray actor: loads the pipeline once, then classifies every batch of rows it is handed."""

    def __init__(
        self,
        model: str,
        text_column: str,
        text_pair_column: str | None,
        threads: int | None,
        options: dict,
        keep_columns: list[str] | None,
    ) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.pipe = PabeePipeline.from_pretrained(model, threads=threads, **options)
        self.text_column, self.text_pair_column, self.keep_columns = text_column, text_pair_column, keep_columns

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        examples, problems = _examples(batch, self.text_column, self.text_pair_column)
        if self.keep_columns is not None:
            batch = batch[self.keep_columns].copy()
        good = [i for i, problem in enumerate(problems) if problem is None]
        answers = iter(self.pipe.format(*self.pipe.run([examples[i] for i in good]))) if good else iter(())
        failed = {"label": None, "score": None, "exit_layer": None}
        rows = [next(answers) if problem is None else failed for problem in problems]
        for name in ("label", "score"):
            batch[name] = [row[name] for row in rows]
        layers = [row["exit_layer"] for row in rows]
        batch["exit_layer"] = pd.array(layers, dtype="Int64") if len(good) < len(rows) else layers
        batch["error"] = problems
        return batch


def resolved_spec(model: str | Path, exit_spec: ExitSpec | None, exit_keywords: dict[str, Any]) -> ExitSpec:
    """The exit setting the actors run: keywords over `exit_spec` or the model's own, checked against the model
    here, once, so a bad one fails before any actor starts."""
    config = load_config(model)
    try:
        spec = exit_spec_from(exit_keywords, exit_spec or config.exit_spec)
        build_criterion(spec, config)
    except ValueError as error:
        raise PabeeError(str(error)) from None
    return spec


def predict_dataset(
    dataset: ray.data.Dataset,
    model: str | Path,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    batch_size: int = 32,
    rows_per_call: int = ROWS_PER_CALL,
    concurrency: int | None = None,
    threads: int = 1,
    max_length: int = DEFAULT_MAX_LENGTH,
    backend: str | None = None,
    keep_columns: Sequence[str] | None = None,
    exit_spec: ExitSpec | None = None,
    **exit_keywords: Any,
) -> ray.data.Dataset:
    """`dataset` with `label`, `score`, `exit_layer` and `error` columns added (lazily, as Ray Data does).

    Args:
        model: a saved PABEE model folder or a `pabee export` folder; every node must see it at this path.
        text_column, text_pair_column: the columns holding the text and, for pairs, the second text.
        batch_size: most examples per forward pass.
        rows_per_call: rows handed to an actor at once; they are sorted by length into forwards inside it.
        concurrency: actors in the pool (default: the cluster's CPUs / `threads`).
        threads: torch (or ONNX Runtime) threads per actor; Ray reserves as many CPUs for it.
        keep_columns: the input columns the output keeps (default: all). Chosen here rather than with
            `select_columns`, which would be a step of its own that needs a CPU the actors may all hold.
        exit_spec: the exit setting (default: the model's own); `exit_keywords` its fields over it (`patience=2`),
            as `pabee.pipeline` takes them.
    """
    if not Path(model).is_dir():
        raise PabeeError(f"model {model} is not a folder.")
    for name, value in (("batch_size", batch_size), ("rows_per_call", rows_per_call), ("threads", threads)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid; use a whole number >= 1.")
    exit_spec = resolved_spec(model, exit_spec, exit_keywords)
    _check_columns(dataset, [text_column, text_pair_column, *(keep_columns or ())], keep_columns)
    if concurrency is None:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    options = {"batch_size": batch_size, "max_length": max_length, "backend": backend, "exit_spec": exit_spec}
    return dataset.map_batches(
        _Predictor,
        fn_constructor_kwargs={
            "model": str(Path(model).resolve()),
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "threads": threads,
            "options": options,
            "keep_columns": None if keep_columns is None else list(keep_columns),
        },
        batch_size=rows_per_call,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=threads,
    )


def _check_columns(dataset: ray.data.Dataset, needed: list[str | None], keep: Sequence[str] | None) -> None:
    """Missing or clashing columns, when the schema is known without running the dataset (else the actors say)."""
    columns = dataset.columns(fetch_if_missing=False)
    if columns is None:
        return
    for name in needed:
        if name is not None and name not in columns:
            raise PabeeError(f"The dataset has no column {name!r}; its columns are {', '.join(columns)}.")
    taken = [name for name in PREDICTION_COLUMNS if name in (columns if keep is None else keep)]
    if taken:
        raise PabeeError(f"The dataset already has column(s) {', '.join(taken)}; drop or rename them first.")


def input_files(pattern: str, exclude: Path | None = None) -> list[Path]:
    """The files `--input` names: one file, a folder's files, or a glob; sorted, all of one format. Files inside
    `exclude` (the job's own output folder, when it lies inside the input) are not inputs."""
    path = Path(pattern)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FORMATS)
    else:
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if exclude is not None:
        files = [p for p in files if not p.resolve().is_relative_to(exclude.resolve())]
    if not files:
        raise PabeeError(f"--input {pattern} matches no files.")
    kinds = {FORMATS.get(p.suffix) for p in files}
    if None in kinds:
        unknown = next(p for p in files if p.suffix not in FORMATS)
        raise PabeeError(f"{unknown}: unknown input format; use {', '.join(FORMATS)}.")
    if len(kinds) > 1:
        raise PabeeError(f"--input {pattern} mixes formats ({', '.join(sorted(kinds))}); run one format at a time.")
    return [p.resolve() for p in files]


def _columns(file: Path) -> list[str]:
    """The columns of an input file, from its header or first record: no Ray job needed to check the flags."""
    kind = FORMATS[file.suffix]
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.read_schema(file).names
    if kind == "text":
        return ["text"]
    with open(file, encoding="utf-8") as f:
        first = f.readline()
    if kind == "json":
        return list(json.loads(first)) if first.strip() else []
    return first.rstrip("\r\n").split("\t") if kind == "tsv" else next(csv.reader([first]), [])


def _read(files: Sequence[Path], text_column: str, text_pair_column: str | None) -> tuple[ray.data.Dataset, list[str]]:
    """`files` as a dataset with a `path` column naming each row's file (text columns read as strings), and its
    text columns: `text_column`, and `text_pair_column` where the files have it."""
    import pyarrow as pa
    from pyarrow import csv as arrow_csv

    found = _columns(files[0])
    kind = FORMATS[files[0].suffix]
    if kind == "text":  # a line is a text
        text_column, found = "text", ["text"]
    if text_column not in found:
        raise PabeeError(f"{files[0]}: no column {text_column!r} (columns: {', '.join(found)}); set --text_column.")
    columns = [text_column] + ([text_pair_column] if text_pair_column in found else [])
    paths = [str(p) for p in files]
    # Reading takes little CPU next to the model; reserving a core for it would leave an actor's core idle (or,
    # with every core given to actors, let no read start at all).
    common = {"include_paths": True, "num_cpus": 0}
    if kind == "text":
        dataset = ray.data.read_text(paths, **common)
    elif kind == "parquet":
        dataset = ray.data.read_parquet(paths, **common)
    elif kind == "json":
        dataset = ray.data.read_json(paths, lines=True, **common)
    else:
        strings = arrow_csv.ConvertOptions(column_types={name: pa.string() for name in columns})
        tsv = arrow_csv.ParseOptions(delimiter="\t", quote_char=False)
        parse = tsv if kind == "tsv" else arrow_csv.ParseOptions()
        dataset = ray.data.read_csv(paths, parse_options=parse, convert_options=strings, **common)
    return dataset, columns


class _ShardWriter:
    """Gathers the predicted rows of each input file (they arrive in order) and writes its shard whole."""

    def __init__(self, shards: dict[str, Path], output_format: str, renames: dict[str, str]) -> None:
        self.shards, self.format, self.renames = shards, output_format, renames  # input path → its shard
        self.current: str | None = None
        self.frames: list[pd.DataFrame] = []
        self.rows = 0
        self.finished: set[str] = set()

    def add(self, batch: pd.DataFrame) -> None:
        for path, frame in batch.groupby("path", sort=False):
            path = str(path)
            if path != self.current:
                self._finish()
                if path in self.finished or path not in self.shards:
                    raise RuntimeError(f"rows of {path} arrived out of order; not writing a shard that may be partial")
                self.current = path
            frame = frame.drop(columns="path").rename(columns=self.renames)
            frame.insert(0, "row", range(self.rows, self.rows + len(frame)))
            self.rows += len(frame)
            self.frames.append(frame)

    def close(self) -> None:
        """Finish the last file, then write an empty shard for every input that had no rows."""
        self._finish()
        for path in self.shards:
            if path not in self.finished:
                self.current = path
                self._finish()

    def _finish(self) -> None:
        if self.current is None:
            return
        frame = pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame()
        write_atomic(self.shards[self.current], _encode(frame, self.format))
        self.finished.add(self.current)
        self.current, self.frames, self.rows = None, [], 0


def _encode(frame: pd.DataFrame, output_format: str) -> bytes:
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(_storable(frame), preserve_index=False), buffer)
        return buffer.getvalue()
    records = [_plain(record) for record in frame.to_dict(orient="records")]
    # A row that failed may hold text that is not Unicode: it is written with \\u escapes, which JSON allows.
    return "".join(json.dumps(r, ensure_ascii="error" in r) + "\n" for r in records).encode()


def _storable(frame: pd.DataFrame) -> pd.DataFrame:
    """Parquet strings are UTF-8: a lone surrogate (in a row that failed for it) becomes U+FFFD there."""
    if "error" not in frame.columns or frame["error"].isna().all():
        return frame
    frame = frame.copy()
    for name in frame.columns:
        if any(isinstance(value, str) for value in frame[name]):
            frame[name] = [replace_surrogates(v) if isinstance(v, str) else v for v in frame[name]]
    return frame


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars and arrays as JSON's own types (a multi-label answer's names and scores are arrays); a row
    that was classified has no `error` key, as `pabee predict` writes it."""
    out = {}
    for name, value in record.items():
        if hasattr(value, "tolist"):
            value = value.tolist()
        elif value is pd.NA or (isinstance(value, float) and math.isnan(value)):
            value = None
        if name == "error" and value is None:
            continue
        out[name] = value
    return out


def _job(args: PredictArguments, root: Path, spec: ExitSpec) -> dict[str, Any]:
    """What decides a shard's contents: a re-run with a different job must not mix its shards with these."""
    return {
        "model": str(Path(args.model).resolve()),
        "input_root": str(root),
        "output_format": args.output_format,
        "text_column": args.text_column,
        "text_pair_column": args.text_pair_column,
        "max_seq_length": args.max_seq_length,
        "exit_spec": spec.describe(with_cap=True),
        "backend": args.backend,
        "dtype": args.dtype,
    }


def _output_folder(args: PredictArguments) -> Path:
    if not args.output:
        raise PabeeError("--ray writes shards to a folder: give it as --output DIR.")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise PabeeError(f"--output {out} is a file; with --ray, --output is a folder of shards.")
    return out


class _OutputLock:
    """An exclusive lock on the output folder for one job's lifetime (`flock`: the kernel drops it when the job
    dies, so a killed job never leaves the folder locked). A second job on the folder gets a clear error instead of
    the two writing, and deleting, each other's files."""

    def __init__(self, out: Path) -> None:
        self.path, self.file = out / LOCK_FILE, None

    def __enter__(self) -> _OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")  # noqa: SIM115 (held until __exit__)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise PabeeError(
                f"--output {self.path.parent} is in use by another pabee predict --ray job (process {holder}); "
                "wait for it to finish, or use another folder."
            ) from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # releases the lock


def _shards(args: PredictArguments, out: Path, files: Sequence[Path], spec: ExitSpec) -> dict[str, Path]:
    """Every input's shard path in `out`, after checking the folder's job and tidying what this job's earlier
    runs left: their temporary files, and with `--overwrite` the old job's shards. Run under `_OutputLock`."""
    root = _common_parent(files)
    job, recorded = _job(args, root, spec), out / JOB_FILE
    previous = json.loads(recorded.read_text()) if recorded.is_file() else None
    if previous is not None and not args.overwrite and previous.get("job") != job:
        raise PabeeError(
            f"--output {out} holds shards of a different job (model, options or inputs); "
            "use another folder, or --overwrite to redo every input."
        )
    suffix = ".predictions." + args.output_format
    shards = {str(p): out / p.relative_to(root).with_name(p.name + suffix) for p in files}
    if previous is not None and args.overwrite:
        _remove_shards(out, previous)
    for shard in [*shards.values(), recorded]:  # left by a killed run of this job: ours alone to remove
        for stale in shard.parent.glob(f".{glob.escape(shard.name)}.*.tmp") if shard.parent.is_dir() else ():
            stale.unlink()
    written = [str(shard.relative_to(out)) for shard in shards.values()]
    write_json(recorded, {"job": job, "command": "pabee predict --ray", "shards": written})
    return shards


def _remove_shards(out: Path, previous: dict[str, Any]) -> None:
    """The shards an earlier job recorded in `out` (a job file without the list: files named as shards are)."""
    names = previous.get("shards")
    if names is None:
        found = [*out.rglob("*.predictions.jsonl"), *out.rglob("*.predictions.parquet")]
        names = [str(p.relative_to(out)) for p in found]
    for name in names:
        shard = (out / name).resolve()
        if shard.is_relative_to(out.resolve()) and shard.is_file():
            shard.unlink()


def _common_parent(files: Sequence[Path]) -> Path:
    parts = [p.parent.parts for p in files]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return Path(*common)


def connect(address: str | None) -> None:
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, include_dashboard=False)


def run_ray_predict(args: PredictArguments) -> dict[str, Any]:
    """`pabee predict --ray`: classify every row of the inputs into one shard per input file (see module doc)."""
    out = _output_folder(args)
    files = input_files(args.input, exclude=out)
    spec = resolved_spec(args.model, None, args.exit_keywords)
    with _OutputLock(out):
        return _run_locked(args, out, files, spec)


def _run_locked(args: PredictArguments, out: Path, files: list[Path], spec: ExitSpec) -> dict[str, Any]:
    """`run_ray_predict` once the output folder is this job's."""
    shards = _shards(args, out, files, spec)
    pending = {path: shard for path, shard in shards.items() if args.overwrite or not shard.is_file()}
    start = time.perf_counter()
    counts = {"examples": 0, "layers": 0, "errors": 0}
    if pending:
        connect(args.ray_address)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        dataset, columns = _read([Path(p) for p in pending], args.text_column, args.text_pair_column)
        dataset = predict_dataset(
            dataset,
            args.model,
            text_column=columns[0],
            text_pair_column=columns[1] if len(columns) > 1 else None,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            threads=args.threads or 1,
            max_length=args.max_seq_length,
            backend=args.backend,
            keep_columns=[*columns, "path"],
            exit_spec=spec,
        )
        # the text columns are called `text` and `text_pair` in the output, as `pabee predict` writes them
        writer = _ShardWriter(pending, args.output_format, dict(zip(columns, ("text", "text_pair"), strict=False)))
        try:
            for batch in dataset.iter_batches(batch_format="pandas", batch_size=None):
                counts["errors"] += int(batch["error"].notna().sum())
                counts["examples"] += len(batch) - int(batch["error"].notna().sum())
                counts["layers"] += int(batch["exit_layer"].sum())
                writer.add(batch)
        except ray.exceptions.RayTaskError as error:
            raise PabeeError(f"a Ray task failed: {_root_cause(error)}") from None
        writer.close()
    seconds = time.perf_counter() - start
    return _summary(counts, seconds, len(shards) - len(pending), len(shards), out)


def _root_cause(error: BaseException) -> str:
    """The error the user's data or model raised inside a Ray task, as one line (Ray hands the driver its text)."""
    lines = re.findall(r"^(\w+(?:Error|Exception): .+)$", str(error), flags=re.MULTILINE)
    ours = [line for line in lines if not line.startswith(("RayTaskError", "UserCodeException"))]
    return (ours or lines or [str(error).strip().splitlines()[-1]])[0]


def _summary(counts: dict[str, int], seconds: float, skipped: int, total: int, out: Path) -> dict[str, Any]:
    n = counts["examples"]
    line = f"{n} examples in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} examples/s)"
    if n:
        line += f"; average exit layer {counts['layers'] / n:.2f}"
    if counts["errors"]:
        line += f'; {counts["errors"]} row(s) not classified, marked "error" in the shards'
    line += f"; {total - skipped} of {total} input files written"
    if skipped:
        line += f" ({skipped} done before, skipped)"
    return {
        "examples": n,
        "errors": counts["errors"],
        "seconds": seconds,
        "examples_per_s": n / max(seconds, 1e-9),
        "avg_exit_layer": counts["layers"] / n if n else None,
        "summary": line,
    }
