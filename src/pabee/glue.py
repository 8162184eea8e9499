"""The nine GLUE tasks: one table row per task (files, columns, labels, metrics) and a strict TSV reader.

The TSV layout is the original GLUE one (`download_glue_data.py`), which the research code's `--data_dir`
points at. Labels are numbered in the order the `nyu-mll/glue` hub dataset uses, so a model fine-tuned from
either source means the same thing by label 0.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError, PabeeError

__all__ = ["EvalSplit", "GLUE_TASKS", "GlueTask", "TaskSpec", "get_task", "read_glue_tsv", "task_dir"]

csv.field_size_limit(sys.maxsize)  # a few GLUE rows are longer than csv's default limit


@dataclass(frozen=True)
class TaskSpec:
    """What any sequence-classification task needs: its labels and how it is scored.

    `labels` are the raw label values as written in the data; `None` means regression.
    """

    name: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    is_pair: bool = False
    label_names: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def id2label(self) -> dict[int, str] | None:
        if self.labels is None:
            return None
        return dict(enumerate(self.label_names or self.labels))


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation set of a task: its name in results, its TSV file and its split on the hub."""

    name: str
    filename: str
    hub_split: str


@dataclass(frozen=True)
class GlueTask(TaskSpec):
    """A GLUE task: a `TaskSpec` plus the layout of its TSV files and its `nyu-mll/glue` config."""

    folder: str = ""
    hub_config: str = ""
    hub_columns: tuple[str, ...] = ()
    text_columns: tuple[int, ...] = ()
    label_column: int = -1
    test_text_columns: tuple[int, ...] = ()
    train_has_header: bool = True
    eval_splits: tuple[EvalSplit, ...] = (EvalSplit("dev", "dev.tsv", "validation"),)
    test_splits: tuple[EvalSplit, ...] = (EvalSplit("test", "test.tsv", "test"),)
    aliases: tuple[str, ...] = field(default=())


_BINARY = ("0", "1")

GLUE_TASKS: dict[str, GlueTask] = {
    task.hub_config: task
    for task in (
        GlueTask(
            name="CoLA",
            folder="CoLA",
            hub_config="cola",
            hub_columns=("sentence",),
            labels=_BINARY,
            label_names=("unacceptable", "acceptable"),
            metrics=("mcc",),
            main_metric="mcc",
            text_columns=(3,),
            label_column=1,
            test_text_columns=(1,),
            train_has_header=False,
        ),
        GlueTask(
            name="SST-2",
            folder="SST-2",
            hub_config="sst2",
            hub_columns=("sentence",),
            labels=_BINARY,
            label_names=("negative", "positive"),
            metrics=("accuracy",),
            main_metric="accuracy",
            text_columns=(0,),
            label_column=1,
            test_text_columns=(1,),
        ),
        GlueTask(
            name="MRPC",
            folder="MRPC",
            hub_config="mrpc",
            hub_columns=("sentence1", "sentence2"),
            labels=_BINARY,
            label_names=("not_equivalent", "equivalent"),
            metrics=("accuracy", "f1"),
            main_metric="f1",
            is_pair=True,
            text_columns=(3, 4),
            label_column=0,
            test_text_columns=(3, 4),
        ),
        GlueTask(
            name="STS-B",
            folder="STS-B",
            hub_config="stsb",
            hub_columns=("sentence1", "sentence2"),
            labels=None,
            metrics=("pearson", "spearman"),
            main_metric="spearman",
            is_pair=True,
            text_columns=(7, 8),
            label_column=9,
            test_text_columns=(7, 8),
        ),
        GlueTask(
            name="QQP",
            folder="QQP",
            hub_config="qqp",
            hub_columns=("question1", "question2"),
            labels=_BINARY,
            label_names=("not_duplicate", "duplicate"),
            metrics=("accuracy", "f1"),
            main_metric="f1",
            is_pair=True,
            text_columns=(3, 4),
            label_column=5,
            test_text_columns=(1, 2),
        ),
        GlueTask(
            name="MNLI",
            folder="MNLI",
            hub_config="mnli",
            hub_columns=("premise", "hypothesis"),
            labels=("entailment", "neutral", "contradiction"),
            metrics=("accuracy",),
            main_metric="accuracy",
            is_pair=True,
            text_columns=(8, 9),
            label_column=-1,
            test_text_columns=(8, 9),
            eval_splits=(
                EvalSplit("dev_matched", "dev_matched.tsv", "validation_matched"),
                EvalSplit("dev_mismatched", "dev_mismatched.tsv", "validation_mismatched"),
            ),
            test_splits=(
                EvalSplit("test_matched", "test_matched.tsv", "test_matched"),
                EvalSplit("test_mismatched", "test_mismatched.tsv", "test_mismatched"),
            ),
        ),
        GlueTask(
            name="QNLI",
            folder="QNLI",
            hub_config="qnli",
            hub_columns=("question", "sentence"),
            labels=("entailment", "not_entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
            is_pair=True,
            text_columns=(1, 2),
            label_column=-1,
            test_text_columns=(1, 2),
        ),
        GlueTask(
            name="RTE",
            folder="RTE",
            hub_config="rte",
            hub_columns=("sentence1", "sentence2"),
            labels=("entailment", "not_entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
            is_pair=True,
            text_columns=(1, 2),
            label_column=-1,
            test_text_columns=(1, 2),
        ),
        GlueTask(
            name="WNLI",
            folder="WNLI",
            hub_config="wnli",
            hub_columns=("sentence1", "sentence2"),
            labels=_BINARY,
            label_names=("not_entailment", "entailment"),
            metrics=("accuracy",),
            main_metric="accuracy",
            is_pair=True,
            text_columns=(1, 2),
            label_column=-1,
            test_text_columns=(1, 2),
        ),
    )
}


def _normalise(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def get_task(name: str) -> GlueTask:
    """Look a GLUE task up by name, case- and dash-insensitively (`SST-2`, `sst-2`, `sst2`)."""
    task = GLUE_TASKS.get(_normalise(name))
    if task is None:
        valid = ", ".join(t.name for t in GLUE_TASKS.values())
        raise PabeeError(f"Unknown GLUE task {name!r}. Valid tasks: {valid} (case-insensitive).")
    return task


def task_dir(task: GlueTask, data_dir: str | Path) -> Path:
    """The folder holding the task's TSV files: `data_dir` itself, or `data_dir/<TASK>` for a GLUE root."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir} does not exist or is not a folder.")
    nested = data_dir / task.folder
    if not any((data_dir / s.filename).is_file() for s in task.eval_splits) and nested.is_dir():
        return nested
    return data_dir


def read_glue_tsv(task: GlueTask, path: str | Path, *, test: bool = False) -> list[dict]:
    """Read one GLUE TSV file into examples `{"text", ["text_pair"], "label", "idx"}`.

    Every row must have as many columns as the header (or as the first row, for CoLA train/dev) and a label
    from the task's label set (a number, for STS-B); anything else raises a `DataError` naming file and line.
    Test files have no labels (`label` is None); `idx` is then the file's own index column.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing data file {path} (expected the original GLUE layout, {task.folder}/{path.name}).")
    has_header = test or task.train_has_header
    columns = task.test_text_columns if test else task.text_columns
    examples: list[dict] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        width = None
        for row in reader:
            line = reader.line_num
            if width is None:
                width = len(row)
                if has_header:
                    continue
            if not row or row == [""]:
                continue
            if len(row) != width:
                raise DataError(f"{path}, line {line}: expected {width} tab-separated columns, found {len(row)}.")
            example = {"text": row[columns[0]]}
            if task.is_pair:
                example["text_pair"] = row[columns[1]]
            example["label"] = None if test else _parse_label(task, row[task.label_column], path, line)
            example["idx"] = row[0] if test else len(examples)
            examples.append(example)
    if width is None:
        raise DataError(f"{path} is empty.")
    return examples


def _parse_label(task: TaskSpec, value: str, path: Path, line: int) -> int | float:
    value = value.strip()
    if task.labels is None:
        try:
            score = float(value)
        except ValueError:
            raise DataError(f"{path}, line {line}: {task.name} score {value!r} is not a number.") from None
        if score != score or score in (float("inf"), float("-inf")):
            raise DataError(f"{path}, line {line}: {task.name} score {value!r} is not a finite number.")
        return score
    try:
        return task.labels.index(value)
    except ValueError:
        allowed = ", ".join(task.labels)
        raise DataError(f"{path}, line {line}: label {value!r} is not a {task.name} label ({allowed}).") from None
