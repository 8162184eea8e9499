"""From task files to tokenized `datasets`: GLUE (TSV folders or the hub) and the user's own csv/tsv/jsonl files.

Every split becomes a `datasets.Dataset` with columns `text`, optional `text_pair`, `label` and `idx`, then is
tokenized once with `Dataset.map` into an on-disk cache keyed by the file's content, the tokenizer and the
maximum length. Padding happens per batch in the collator, never to `max_seq_length`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets

from .errors import DataError, PabeeError
from .glue import GlueTask, TaskSpec, read_glue_tsv, task_dir
from .provenance import file_digest
from .texts import example_problem
from .version import __version__

__all__ = [
    "HUB_DATASET",
    "InputRow",
    "TEXT_FORMATS",
    "TaskData",
    "infer_task",
    "load_glue",
    "load_user_files",
    "read_examples_file",
    "read_jsonl_records",
    "read_text_file",
    "tokenize",
]

HUB_DATASET = "nyu-mll/glue"
csv.field_size_limit(sys.maxsize)  # a long text in one csv cell is an example, not an error


@dataclass
class TaskData:
    """A task's splits, untokenized, with where each came from (for the results' provenance)."""

    task: TaskSpec
    train: datasets.Dataset | None = None
    eval: dict[str, datasets.Dataset] = field(default_factory=dict)
    test: dict[str, datasets.Dataset] = field(default_factory=dict)
    calibration: datasets.Dataset | None = None  # held out of train to choose the exit setting on
    sources: dict[str, str] = field(default_factory=dict)
    cache_keys: dict[str, str] = field(default_factory=dict)


def load_glue(task: GlueTask, data_dir: str | Path | None, *, train: bool, evaluate: bool, test: bool) -> TaskData:
    """Load the requested splits of a GLUE task from its TSV folder, or from the hub when `data_dir` is None."""
    data = TaskData(task)
    if data_dir is None:
        return _load_glue_from_hub(data, task, train=train, evaluate=evaluate, test=test)
    folder = task_dir(task, data_dir)
    wanted: list[tuple[str, str, bool]] = []
    if train:
        wanted.append(("train", "train.tsv", False))
    if evaluate:
        wanted += [(s.name, s.filename, False) for s in task.eval_splits]
    if test:
        wanted += [(s.name, s.filename, True) for s in task.test_splits]
    for name, filename, is_test in wanted:
        path = folder / filename
        examples = read_glue_tsv(task, path, test=is_test)
        if is_test:
            examples = [{k: v for k, v in e.items() if k != "label"} for e in examples]
        dataset = datasets.Dataset.from_list(examples)
        data.sources[name] = str(path.resolve())
        data.cache_keys[name] = file_digest(path)
        if name == "train":
            data.train = dataset
        elif is_test:
            data.test[name] = dataset
        else:
            data.eval[name] = dataset
    return data


def _load_glue_from_hub(data: TaskData, task: GlueTask, *, train: bool, evaluate: bool, test: bool) -> TaskData:
    try:
        hub = datasets.load_dataset(HUB_DATASET, task.hub_config)
    except Exception as error:  # offline, unknown host, rate limit: all mean "use local files"
        raise DataError(
            f"Could not load {HUB_DATASET} ({task.hub_config}) from the Hugging Face hub: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            f"Offline? Pass --data_dir with the original GLUE TSV folder (e.g. --data_dir $GLUE_DIR/{task.folder})."
        ) from None
    renames = {column: new for column, new in zip(task.hub_columns, ("text", "text_pair"), strict=False)}

    def take(split: str) -> datasets.Dataset:
        dataset = hub[split].rename_columns(renames)
        data.sources[split] = f"{HUB_DATASET}/{task.hub_config}:{split}"
        return dataset

    if train:
        data.train = take("train")
    if evaluate:
        data.eval = {s.name: take(s.hub_split) for s in task.eval_splits}
    if test:
        data.test = {s.name: take(s.hub_split).remove_columns("label") for s in task.test_splits}
    return data


def read_jsonl_records(path: Path, expected: str = "a JSON object") -> list[tuple[int, dict]]:
    """`(line number, object)` for each non-blank line of a JSON-lines file; a bad line names file and line."""
    records = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({error.msg}).") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {line_no}: expected {expected}.")
            records.append((line_no, record))
    return records


@dataclass
class InputRow:
    """One example of a user's file: its line number (for messages and joins), text, text pair and record."""

    line: int
    text: str
    text_pair: str | None = None
    record: dict = field(default_factory=dict)  # every column/field of the line (e.g. `label`)


TEXT_FORMATS = (".txt", ".tsv", ".csv", ".jsonl")


def _read_plain_lines(path: Path) -> list[InputRow]:
    rows = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise DataError(f"{path}, line {line_no}: {len(parts)} tab-separated fields; use 1 or 2 (a pair).")
            rows.append(InputRow(line_no, parts[0], parts[1] if len(parts) == 2 else None))
    return rows


def _read_table(path: Path, text_column: str) -> list[tuple[int, dict]]:
    """A csv (standard quoting) or tsv (no quoting, as the GLUE files) with a header row."""
    tsv = path.suffix.lower() == ".tsv"
    records = []
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(
            f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
        )
        if reader.fieldnames is None or text_column not in reader.fieldnames:
            raise DataError(
                f"{path}: the header must name a {text_column!r} column (found {reader.fieldnames}); "
                "choose it with --text_column."
            )
        for record in reader:
            if None in record or None in record.values():
                raise DataError(f"{path}, line {reader.line_num}: the number of columns differs from the header.")
            records.append((reader.line_num, record))
    return records


def read_text_file(
    path: str | Path,
    text_column: str = "text",
    text_pair_column: str = "text_pair",
    formats: tuple[str, ...] = TEXT_FORMATS,
) -> list[InputRow]:
    """The one reader of users' text files (`predict`, `bench --input_file`, run-glue's own data).

    By suffix: `.txt` (or none) one example per line, a tab splitting a pair, blank lines skipped; `.tsv` and
    `.csv` a header naming the columns; `.jsonl` one object per line. A `DataError` names the file and line.
    Bytes that are not UTF-8 are kept as lone surrogates (`surrogateescape`) rather than failing the whole file:
    `pabee.texts.example_problem` names such a line, and each caller decides (predict skips it, training refuses).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing input file {path}.")
    suffix = path.suffix.lower() or ".txt"
    if suffix not in formats:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use {', '.join(formats)}.")
    if suffix == ".txt":
        rows = _read_plain_lines(path)
    else:
        records = read_jsonl_records(path) if suffix in (".jsonl", ".json") else _read_table(path, text_column)
        rows = []
        for line_no, record in records:
            text, pair = record.get(text_column), record.get(text_pair_column)
            if not isinstance(text, str):
                raise DataError(f"{path}, line {line_no}: {text_column!r} is missing or not a string.")
            if pair is not None and not isinstance(pair, str):
                raise DataError(f"{path}, line {line_no}: {text_pair_column!r} is not a string.")
            rows.append(InputRow(line_no, text, pair, record))
    if not rows:
        raise DataError(f"{path} holds no examples.")
    return rows


def read_examples_file(path: str | Path) -> list[dict]:
    """A user's labelled csv, tsv or jsonl file (columns `text`, optional `text_pair`, `label`) as run-glue reads
    it: `{"text", "label", "_line"}` plus `text_pair` where the file has that column."""
    rows = read_text_file(path, formats=(".csv", ".tsv", ".jsonl", ".json"))
    examples = []
    for row in rows:
        if problem := example_problem(row.text, row.text_pair):
            raise DataError(f"{path}, line {row.line}: {problem}; fix or remove the line.")
        example = {"text": row.text, "label": row.record.get("label"), "_line": row.line}
        if "text_pair" in row.record:
            example["text_pair"] = row.text_pair
        examples.append(example)
    return examples


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def infer_task(name: str, examples: list[dict], task_type: str = "auto") -> TaskSpec:
    """Build a `TaskSpec` for user data: classification over the labels seen, or regression on numbers.

    `task_type="auto"` picks regression when every label is a number and at least one is not a whole number.
    """
    if task_type not in ("auto", "classification", "regression"):
        raise PabeeError(f"--task_type {task_type!r} is invalid; use auto, classification or regression.")
    values = [e["label"] for e in examples]
    if any(v is None or v == "" for v in values):
        line = next(e["_line"] for e in examples if e["label"] is None or e["label"] == "")
        raise DataError(f"line {line}: the example has no 'label'.")
    numeric = all(_is_number(v) for v in values)
    if task_type == "auto":
        task_type = "regression" if numeric and any(float(v) != int(float(v)) for v in values) else "classification"
    if task_type == "regression":
        if not numeric:
            bad = next(e for e in examples if not _is_number(e["label"]))
            raise DataError(f"line {bad['_line']}: regression label {bad['label']!r} is not a number.")
        return TaskSpec(name=name, labels=None, metrics=("pearson", "spearman"), main_metric="spearman", is_pair=False)
    labels = sorted({str(v) for v in values}, key=lambda v: (not _is_number(v), float(v) if _is_number(v) else 0, v))
    return TaskSpec(name=name, labels=tuple(labels), metrics=("accuracy", "macro_f1"), main_metric="accuracy")


def load_user_files(
    train_file: str | None, validation_file: str | None, task_type: str = "auto", labels: tuple[str, ...] | None = None
) -> TaskData:
    """Load the user's own train/validation files as a non-GLUE task."""
    if train_file is None and validation_file is None:
        raise PabeeError("Give --task_name for GLUE, or --train_file / --validation_file for your own data.")
    read = {
        split: read_examples_file(path) for split, path in (("train", train_file), ("dev", validation_file)) if path
    }
    pair_splits = {split for split, examples in read.items() if all("text_pair" in e for e in examples)}
    if pair_splits and pair_splits != set(read):
        raise DataError("Either every file gives a 'text_pair' for every example, or none does.")
    task = infer_task(Path(train_file or validation_file).stem, read.get("train") or read["dev"], task_type)
    if labels is not None and task.labels is not None:
        task = replace(task, labels=tuple(labels))
    task = replace(task, is_pair=bool(pair_splits))
    data = TaskData(task)
    for split, examples in read.items():
        path = Path(train_file if split == "train" else validation_file)
        rows = []
        for e in examples:
            row = {"text": e["text"], "label": _user_label(task, e, path)}
            if task.is_pair:
                row["text_pair"] = str(e["text_pair"])
            rows.append(row)
        dataset = datasets.Dataset.from_list(rows)
        data.sources[split] = str(path.resolve())
        data.cache_keys[split] = file_digest(path)
        if split == "train":
            data.train = dataset
        else:
            data.eval["dev"] = dataset
    return data


def _user_label(task: TaskSpec, example: dict, path: Path) -> int | float:
    value = example["label"]
    if task.labels is None:
        if not _is_number(value):
            raise DataError(f"{path}, line {example['_line']}: regression label {value!r} is not a number.")
        return float(value)
    if str(value) not in task.labels:
        raise DataError(
            f"{path}, line {example['_line']}: label {value!r} was not seen in training ({', '.join(task.labels)})."
        )
    return task.labels.index(str(value))


def tokenize(
    dataset: datasets.Dataset,
    tokenizer,
    max_seq_length: int,
    *,
    split: str,
    cache_key: str | None = None,
    overwrite_cache: bool = False,
) -> datasets.Dataset:
    """Tokenize once (truncating to `max_seq_length`, no padding), cached on disk when `cache_key` is given."""
    has_pair = "text_pair" in dataset.column_names

    def encode(batch: dict) -> dict:
        return tokenizer(
            batch["text"], batch["text_pair"] if has_pair else None, truncation=True, max_length=max_seq_length
        )

    cache_file = None
    if cache_key is not None:
        ident = json.dumps(
            [
                __version__,
                cache_key,
                len(dataset),
                tokenizer.name_or_path,
                type(tokenizer).__name__,
                len(tokenizer),
                max_seq_length,
            ]
        )
        folder = Path(datasets.config.HF_DATASETS_CACHE) / "pabee"
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"{split}-{hashlib.sha256(ident.encode()).hexdigest()[:24]}.arrow")
    return dataset.map(
        encode,
        batched=True,
        desc=f"Tokenizing {split}",
        cache_file_name=cache_file,
        load_from_cache_file=not overwrite_cache,
    )
