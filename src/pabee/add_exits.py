"""`pabee add-exits`: exits for the classifier a user already has, its full-depth answers unchanged.

The classifier (any `*ForSequenceClassification` of a family with an adapter) is wrapped as it is, its own head
answering at full depth (`PabeeForSequenceClassification.from_classifier`); an exit is added after every other layer
and trained to agree with the classifier's answers on the user's texts (`pabee.exit_training`); with
`--max_disagreement`, `pabee.calibrate` then certifies on held-out texts how many answers the chosen setting may
change and writes it into the folder. The folder is a PABEE model like any other (predict, serve, export, Ray).

A run records what it is (`add_exits_run.json`) and keeps the cached states and Trainer's checkpoints in its folder
until it finishes, so running the same command again resumes it; any other folder that is not empty is refused.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments, set_seed

from .arguments import ADD_EXITS_CRITERIA, AddExitsArguments
from .calibrate import Calibration, calibrate, summary_line
from .checkpoints import checkpoint_folders, complete_checkpoints
from .errors import PabeeError
from .exit_training import ExitCache, cache_exit_inputs, train_exits
from .folders import load_tokenizer
from .glue import TaskSpec, get_task
from .modeling import PabeeForSequenceClassification
from .pipeline import PabeePipeline
from .provenance import file_identity, portable_path, provenance, write_json
from .rules import CRITERIA
from .settings import ExitSweep

__all__ = ["RECORD_FILE", "RUN_FILE", "run_add_exits"]

RUN_FILE = "add_exits_run.json"  # what an unfinished run in this folder is, so running it again resumes it
RECORD_FILE = "add_exits.json"  # what the finished folder was made from, how, and how long it took
CACHE_FILE = "exit_cache.safetensors"

# Flags that change what the exits become (a resumed run must have the same).
RESULT_FLAGS = ("model", "task_name", "train_file", "input_file", "max_examples", "pooling",
                "per_device_train_batch_size", "learning_rate", "seed", "distillation_temperature", "label_weight",
                "max_seq_length")  # fmt: skip


def _training_texts(args: AddExitsArguments, config) -> tuple[list, list | None, dict[str, Any]]:
    """The texts the exits learn from, their labels (None for --input_file) and where they came from."""
    from .data import load_glue, load_user_files, read_text_file

    if args.input_file is not None:
        rows = read_text_file(args.input_file)
        examples, labels, path = [(row.text, row.text_pair) for row in rows], None, Path(args.input_file)
    else:
        names = None if config.is_regression else tuple(config.id2label[i] for i in range(config.num_labels))
        if args.task_name is not None:
            data = load_glue(get_task(args.task_name), args.data_dir, train=True, evaluate=False, test=False)
        else:
            data = load_user_files(args.train_file, None, "auto", labels=names)
        if data.task.num_labels != config.num_labels:
            raise PabeeError(
                f"{data.task.name} has {data.task.num_labels} labels; the classifier has {config.num_labels}."
            )
        examples = [(row["text"], row.get("text_pair")) for row in data.train]
        labels, path = list(data.train["label"]), Path(data.sources["train"])
    if args.max_examples is not None:
        examples = examples[: args.max_examples]
        labels = None if labels is None else labels[: args.max_examples]
    source = {
        **file_identity(path),
        "path": portable_path(path),  # over file_identity's absolute one
        "examples": len(examples),
        "labelled": labels is not None,
    }
    return examples, labels, source


def _calibration_rows(args: AddExitsArguments, config) -> tuple[TaskSpec, list[dict[str, Any]]]:
    """Held-out texts to certify on: --calibration_file, else the GLUE task's dev set."""
    from .data import load_glue, read_text_file

    if args.calibration_file is not None:
        rows = [{"text": r.text, "text_pair": r.text_pair} for r in read_text_file(args.calibration_file)]
        names = None if config.is_regression else tuple(config.id2label[i] for i in range(config.num_labels))
        return TaskSpec(name=Path(args.calibration_file).stem, labels=names, metrics=(), main_metric=""), rows
    data = load_glue(get_task(args.task_name), args.data_dir, train=False, evaluate=True, test=False)
    return data.task, list(next(iter(data.eval.values())))


def _prepare_output(out: Path, identity: dict[str, Any]) -> bool:
    """True when `out` holds an unfinished run of this same command (it resumes); a new folder is fine; anything
    else is refused before any work."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    run = out / RUN_FILE
    if out.is_dir() and run.is_file() and not (out / "config.json").exists():
        recorded = json.loads(run.read_text(encoding="utf-8"))
        if recorded == identity:
            return True
        changed = sorted(k for k in identity if recorded.get(k) != identity[k])
        raise PabeeError(f"{out} holds an unfinished add-exits run with other settings ({', '.join(changed)}).")
    raise PabeeError(f"{out} exists and is not empty; choose a new --output_dir.")


def _training_arguments(args: AddExitsArguments, out: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        save_strategy="epoch",
        save_total_limit=1,
        logging_steps=100,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )


def _exits(args: AddExitsArguments, out: Path, command: str) -> tuple[PabeeForSequenceClassification, Any, dict]:
    """Wrap the classifier, cache its states (or read the cache of the run being resumed) and train the exits."""
    set_seed(args.seed)
    try:
        model = PabeeForSequenceClassification.from_classifier(args.model, pooling=args.pooling)
    except ValueError as error:
        raise PabeeError(str(error)) from None
    tokenizer = load_tokenizer(args.model)
    examples, labels, source = _training_texts(args, model.config)
    identity = {name: getattr(args, name) for name in RESULT_FLAGS} | {"data": source}
    resuming = _prepare_output(out, identity)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RUN_FILE, identity)
    started = time.perf_counter()
    if resuming and (out / CACHE_FILE).is_file():
        cache = ExitCache.load(out / CACHE_FILE)
    else:
        cache = cache_exit_inputs(model, tokenizer, examples, labels, args.batch_size, args.max_seq_length)
        cache.save(out / CACHE_FILE)
    cached = time.perf_counter()
    checkpoints = complete_checkpoints(out, remove_incomplete=True) if resuming else []
    metrics = train_exits(
        model,
        cache,
        _training_arguments(args, out),
        args.distillation_temperature,
        args.label_weight,
        resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None,
    )
    record = {
        "provenance": provenance(
            command, model=portable_path(args.model) if Path(args.model).exists() else args.model
        ),
        "data": source,
        "seconds": {"states": round(cached - started, 1), "training": round(time.perf_counter() - cached, 1)},
        "train_loss": metrics.get("train_loss"),
        "resumed": resuming,
    }
    return model, tokenizer, record


def _sweep(args: AddExitsArguments, config) -> ExitSweep:
    """The settings to certify among: the flags', less the default's rules that need classes for regression."""
    sweep = args.sweep
    if config.is_regression and args.exit_criterion == ADD_EXITS_CRITERIA:
        sweep = replace(sweep, criteria=tuple(c for c in sweep.criteria if CRITERIA[c].supports_regression))
    return sweep


def run_add_exits(args: AddExitsArguments, command: str) -> dict[str, Any]:
    """`pabee add-exits`: the model with exits in `--output_dir`, then (with `--max_disagreement`) its certified
    setting. Returns the record written as `add_exits.json`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    model, tokenizer, record = _exits(args, out, command)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for checkpoint in checkpoint_folders(out):
        shutil.rmtree(checkpoint, ignore_errors=True)
    (out / CACHE_FILE).unlink(missing_ok=True)
    (out / RUN_FILE).unlink(missing_ok=True)
    if args.max_disagreement is not None:
        pipe = PabeePipeline.from_pretrained(
            out, backend="torch", batch_size=args.batch_size, max_length=args.max_seq_length
        )
        task, rows = _calibration_rows(args, model.config)
        settings = Calibration(_sweep(args, model.config), max_drop=0.0, seed=args.seed, guarantee=args.guarantee())
        report = calibrate(pipe, task, rows, settings, out, command)
        record["calibration"] = summary_line(report, out)
    write_json(out / RECORD_FILE, record)
    return record
