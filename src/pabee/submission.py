"""GLUE test-set predictions as the GLUE server takes them: one `<TASK>.tsv` per test set.

Each file has a header `index<TAB>prediction` and one row per test example, with the example's own index and
the label as GLUE writes it (`0`/`1`, `entailment`, ...; STS-B: a score clipped to [0, 5]). MNLI's two test sets
become `MNLI-m.tsv` and `MNLI-mm.tsv`. Zip the folder's `.tsv` files to submit.

Predictions come from real batched early exit (`PabeePipeline`) at the model's configured patience.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, PabeeError
from .glue import GlueTask, task_dir
from .pipeline import PabeePipeline
from .provenance import portable_path, write_atomic, write_json

__all__ = [
    "SUBMISSION_DIR",
    "check_predict_setup",
    "format_predictions",
    "predict_glue_test",
    "submission_filename",
    "write_submission_file",
]

SUBMISSION_DIR = "glue_submission"
_SPLIT_FILES = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}


def submission_filename(task: GlueTask, split: str) -> str:
    """`SST-2.tsv`, `MNLI-m.tsv`, ...: the names the GLUE server looks for."""
    return f"{_SPLIT_FILES.get(split, task.name)}.tsv"


def format_predictions(task: GlueTask, logits: torch.Tensor) -> list[str]:
    """Logits `[N, num_labels]` → the label strings GLUE expects (the task's raw label values)."""
    if task.is_regression:
        return [f"{min(max(v, 0.0), 5.0):.3f}" for v in logits[:, 0].tolist()]
    return [task.labels[i] for i in logits.argmax(dim=-1).tolist()]


def write_submission_file(path: str | Path, indices: Sequence[Any], predictions: Sequence[str]) -> None:
    """`index<TAB>prediction` rows under a header, written atomically."""
    if len(indices) != len(predictions):
        raise ValueError(f"{len(indices)} indices but {len(predictions)} predictions.")
    lines = ["index\tprediction", *(f"{i}\t{p}" for i, p in zip(indices, predictions, strict=True))]
    write_atomic(path, "\n".join(lines) + "\n")


def check_predict_setup(task: GlueTask | None, data_dir: str | None, output_dir: str | Path, overwrite: bool) -> None:
    """Fail before any training when `--do_predict` cannot work: no GLUE task (`task` None: your own files), a
    missing test file, or a submission folder from an earlier run that `--overwrite_output_dir` does not allow to
    replace."""
    if task is None:
        raise PabeeError("--do_predict writes GLUE test-set submission files; it needs --task_name.")
    if data_dir is not None:
        folder = task_dir(task, data_dir)
        for split in task.test_splits:
            if not (folder / split.filename).is_file():
                raise DataError(f"--do_predict needs the test file {folder / split.filename}, which is missing.")
    out = Path(output_dir) / SUBMISSION_DIR
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PabeeError(f"{out} already holds submission files; pass --overwrite_output_dir to replace them.")


def predict_glue_test(
    model,
    tokenizer,
    task: GlueTask,
    data_dir: str | None,
    output_dir: str | Path,
    *,
    max_length: int = 128,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Predict every test set of a GLUE task and write the submission files into `output_dir/glue_submission/`.

    Uses the model's configured patience (for run-glue, the first non-zero `--patience`). Returns, per file, the
    number of examples and the average exit layer (also written to `glue_submission.json` beside the folder).
    """
    from .data import load_glue

    if model.config.num_labels != task.num_labels:
        raise PabeeError(f"The model has {model.config.num_labels} labels but {task.name} has {task.num_labels}.")
    data = load_glue(task, data_dir, train=False, evaluate=False, test=True)
    pipe = PabeePipeline(model, tokenizer, batch_size=batch_size, max_length=max_length)
    folder = Path(output_dir) / SUBMISSION_DIR
    spec = model.config.exit_spec  # the model's own setting: the full model unless one was chosen on data
    summary: dict[str, Any] = {"task": task.name, "exit_setting": spec.describe(with_cap=True), "files": {}}
    for split, dataset in data.test.items():
        pairs = dataset["text_pair"] if "text_pair" in dataset.column_names else [None] * len(dataset)
        logits, exit_layers = pipe.run(list(zip(dataset["text"], pairs, strict=True)), progress=True)
        name = submission_filename(task, split)
        write_submission_file(folder / name, dataset["idx"], format_predictions(task, logits))
        summary["files"][name] = {
            "split": split,
            "source": portable_path(data.sources[split]) if split in data.sources else None,
            "examples": len(dataset),
            "avg_exit_layer": float(exit_layers.float().mean()),
        }
        print(
            f"{task.name} {split}: {len(dataset)} predictions ({spec.title}, average exit layer "
            f"{summary['files'][name]['avg_exit_layer']:.2f}) -> {folder / name}"
        )
    write_json(Path(output_dir) / "glue_submission.json", summary)
    return summary
