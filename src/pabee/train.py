"""`pabee run-glue`: Trainer-based fine-tuning of a PABEE model and evaluation across patiences.

Evaluation makes one pass over the data that keeps every layer's logits, then reads every patience off those
logits with the same exit rule real inference uses (`sweep_exit_layers`), so a whole patience list costs one
full forward pass.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from .backbones import ADAPTERS
from .data import TaskData, load_glue, load_user_files, tokenize
from .errors import PabeeError
from .exit_settings import ExitArguments, ExitSetting, check_settings, exit_settings, parse_criteria, parse_thresholds
from .exits import check_regression_threshold, logits_at_exit, sweep_exit_layers
from .glue import TaskSpec, get_task
from .metrics import METRIC_LABELS, compute_metrics, exit_statistics, predictions_from_logits
from .modeling import PabeeForSequenceClassification
from .pretrained import bundled_model_path
from .results import (
    best_tradeoff,
    layer_table,
    patience_table,
    plot_exit_histograms,
    plot_patience_curves,
    provenance,
    settings_table,
    write_atomic,
    write_json,
)

RESULT_FILES = ("eval_results.json", "eval_results.md", "patience_curve.png", "exit_histograms.png")
RUN_FILE = "pabee_run.json"  # what a training run in this folder is, so a resume cannot mix two runs


@dataclass
class RunGlueArguments(ExitArguments):
    """Flags of `pabee run-glue` beyond `TrainingArguments`; the research script's names are kept verbatim."""

    task_name: str | None = field(
        default=None, metadata={"help": "GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "GLUE TSV folder of the task (or the GLUE root). Omitted: load nyu-mll/glue from the hub."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Encoder checkpoint or fine-tuned PABEE folder. Default: the bundled MiniLM."}
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Encoder type; inferred from the checkpoint.", "choices": sorted(ADAPTERS)},
    )
    patience: str = field(
        default="1,2,3,4,5",
        metadata={
            "help": "Comma-separated patiences to evaluate (0 = full model, always included). The first non-zero "
            "one becomes the saved model's default patience."
        },
    )
    regression_threshold: float = field(default=0.1, metadata={"help": "Agreement threshold for regression."})
    pooling: str = field(
        default="auto",
        metadata={"help": "What the classifiers read.", "choices": ["auto", "pooler", "cls", "mean"]},
    )
    max_seq_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    do_lower_case: bool = field(
        default=False, metadata={"help": "Accepted for compatibility; the tokenizer's own setting decides."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Reuse a non-empty --output_dir: its checkpoints and results are replaced, nothing else."},
    )
    eval_all_checkpoints: bool = field(
        default=False, metadata={"help": "Evaluate every checkpoint-* folder in --output_dir and the final model."}
    )
    evaluate_during_training: bool = field(
        default=False, metadata={"help": "Research-script spelling of --eval_strategy steps."}
    )
    per_gpu_train_batch_size: int | None = field(
        default=None, metadata={"help": "Research-script spelling of --per_device_train_batch_size."}
    )
    per_gpu_eval_batch_size: int | None = field(
        default=None, metadata={"help": "Research-script spelling of --per_device_eval_batch_size."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Your own training data (csv, tsv or jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Your own evaluation data."})
    task_type: str = field(
        default="auto",
        metadata={"help": "For your own data.", "choices": ["auto", "classification", "regression"]},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again instead of using the cache."})


def parse_patience_list(value: str) -> list[int]:
    """`"3,4,5"` → `[0, 3, 4, 5]`: whole numbers >= 0, in the given order, the full model (0) first."""
    patiences = []
    for part in str(value).split(","):
        part = part.strip()
        if not re.fullmatch(r"\d+", part):
            raise PabeeError(
                f"--patience {value!r} is invalid: {part!r} is not a whole number >= 0 (use e.g. --patience 3,4,5)."
            )
        if int(part) not in patiences:
            patiences.append(int(part))
    return [0, *(p for p in patiences if p != 0)]


def _non_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _run_identity(args: RunGlueArguments, name_or_path: str) -> dict[str, Any]:
    return {
        "task": get_task(args.task_name).name if args.task_name else None,
        "train_file": str(Path(args.train_file).resolve()) if args.train_file else None,
        "model_name_or_path": name_or_path,
    }


def prepare_output_dir(args: RunGlueArguments, training_args: TrainingArguments, name_or_path: str) -> str | None:
    """Refuse to overwrite silently; return the checkpoint to resume from, if any.

    A folder holding checkpoints of the same run (same task, data and starting model) is resumed from its
    last checkpoint; checkpoints of any other run are an error, never silently continued.
    """
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise PabeeError(f"--output_dir {out} exists and is not a folder.")
    resume = training_args.resume_from_checkpoint
    if training_args.do_train:
        if resume is not None:
            if not Path(resume).is_dir():
                raise PabeeError(f"--resume_from_checkpoint {resume} is not a folder.")
            return resume
        if _non_empty(out) and not args.overwrite_output_dir:
            last = get_last_checkpoint(str(out))
            if last is not None:
                identity = _run_identity(args, name_or_path)
                try:
                    previous = json.loads((out / RUN_FILE).read_text())
                except (OSError, json.JSONDecodeError):
                    previous = None
                if previous != identity:
                    raise PabeeError(
                        f"--output_dir {out} holds checkpoints of another run ({previous or 'unknown'}); pass "
                        "--overwrite_output_dir to start afresh there, or choose another folder."
                    )
                return last
            raise PabeeError(
                f"--output_dir {out} exists and is not empty. Pass --overwrite_output_dir to replace its contents, "
                "or choose another folder."
            )
        if _non_empty(out) and args.overwrite_output_dir:
            # Only what a previous run wrote: stale checkpoints would be resumed or evaluated as this run's.
            for checkpoint in _checkpoints(out):
                shutil.rmtree(checkpoint)
            for name in (*RESULT_FILES, RUN_FILE, "trainer_state.json"):
                (out / name).unlink(missing_ok=True)
    elif not args.overwrite_output_dir:
        taken = [name for name in RESULT_FILES if (out / name).exists()]
        if taken:
            raise PabeeError(
                f"--output_dir {out} already holds {', '.join(taken)}; pass --overwrite_output_dir to replace them."
            )
    return None


def load_task_data(args: RunGlueArguments, training_args: TrainingArguments, labels=None) -> TaskData:
    if args.task_name is not None:
        task = get_task(args.task_name)
        data = load_glue(task, args.data_dir, train=training_args.do_train, evaluate=training_args.do_eval, test=False)
    else:
        data = load_user_files(args.train_file, args.validation_file, args.task_type, labels=labels)
    if training_args.do_train and data.train is None:
        raise PabeeError("--do_train needs training data (a GLUE task's train.tsv, or --train_file).")
    if training_args.do_eval and not data.eval:
        raise PabeeError("--do_eval needs evaluation data (a GLUE task's dev file, or --validation_file).")
    if args.max_train_samples is not None and data.train is not None:
        data.train = data.train.select(range(min(args.max_train_samples, len(data.train))))
    if args.max_eval_samples is not None:
        data.eval = {k: v.select(range(min(args.max_eval_samples, len(v)))) for k, v in data.eval.items()}
    return data


def _labels_of_finetuned(args: RunGlueArguments, name_or_path: str) -> tuple[str, ...] | None:
    """For your own data without a train file, the label order the fine-tuned model was trained with."""
    if args.task_name is not None or args.train_file is not None:
        return None
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    if config.model_type != "pabee" or not config.id2label or config.num_labels < 2:
        return None
    return tuple(config.id2label[i] for i in range(config.num_labels))


def load_model(args: RunGlueArguments, task: TaskSpec, name_or_path: str) -> PabeeForSequenceClassification:
    """A fine-tuned PABEE folder as it is, or a plain encoder with fresh PABEE heads for `task`."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot load a model config from {name_or_path!r}: {error}") from None
    encoder_type = config.encoder_config.model_type if config.model_type == "pabee" else config.model_type
    if args.model_type is not None and args.model_type != encoder_type:
        raise PabeeError(f"--model_type {args.model_type} does not match the checkpoint's encoder ({encoder_type}).")
    threshold = check_regression_threshold(args.regression_threshold)
    if config.model_type == "pabee":
        model = PabeeForSequenceClassification.from_pretrained(name_or_path, regression_threshold=threshold)
        if model.config.num_labels != task.num_labels:
            raise PabeeError(
                f"{name_or_path} was trained with {model.config.num_labels} labels but {task.name} has "
                f"{task.num_labels}."
            )
        return model
    try:
        return PabeeForSequenceClassification.from_backbone(
            name_or_path,
            num_labels=task.num_labels,
            regression_threshold=threshold,
            pooling=None if args.pooling == "auto" else args.pooling,
            id2label=task.id2label,
            label2id={v: k for k, v in task.id2label.items()} if task.id2label else None,
            problem_type="regression" if task.is_regression else "single_label_classification",
        )
    except ValueError as error:
        raise PabeeError(str(error)) from None


def sweep_results(
    model: PabeeForSequenceClassification,
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: TaskSpec,
    patiences: list[int],
    settings: dict[str, list[ExitSetting]] | None = None,
    max_exit_layer: int | None = None,
) -> dict[str, Any]:
    """Metrics and exit statistics for every patience and every other criterion's setting, all read off one
    full pass, and every internal classifier's own metrics."""
    all_logits_t = torch.as_tensor(all_logits)
    num_layers = all_logits_t.shape[1]
    regression = model.config.is_regression

    def evaluate(setting: ExitSetting) -> dict[str, Any]:
        criterion = model.get_exit_criterion(**setting.options(max_exit_layer))
        exit_layers = sweep_exit_layers(criterion, all_logits_t)
        chosen = logits_at_exit(all_logits_t, exit_layers).numpy()
        row = setting.describe()
        row.update(compute_metrics(task.metrics, predictions_from_logits(chosen, regression), labels))
        row.update(exit_statistics(exit_layers.numpy(), num_layers))
        return row

    per_layer = [
        {
            "layer": layer + 1,
            **compute_metrics(task.metrics, predictions_from_logits(all_logits[:, layer], regression), labels),
        }
        for layer in range(num_layers)
    ]
    result = {
        "num_examples": int(len(labels)),
        "num_layers": num_layers,
        "patiences": [evaluate(ExitSetting("patience", patience=p)) for p in patiences],
        "per_layer": per_layer,
    }
    others = {name: items for name, items in (settings or {}).items() if name != "patience"}
    if others:
        result["criteria"] = {name: [evaluate(s) for s in items] for name, items in others.items()}
    return result


def _metrics_during_training(model, task: TaskSpec, patiences: list[int]):
    """`compute_metrics` for Trainer: the task metrics of every patience, flattened for the log."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        _, all_logits, _ = prediction.predictions
        summary = sweep_results(model, all_logits, prediction.label_ids, task, patiences)
        flat: dict[str, float] = {}
        for row in summary["patiences"]:
            prefix = "full" if row["patience"] == 0 else f"p{row['patience']}"
            for name in (*task.metrics, "speed_up"):
                flat[f"{prefix}_{name}"] = row[name]
        return flat

    return compute


def _store_default_exit(model, settings: list[ExitSetting], max_exit_layer: int | None) -> None:
    """The saved model answers with the first criterion's first early-exit setting unless told otherwise."""
    setting = next((s for s in settings if not s.is_full_model), settings[0])
    config = model.config
    config.exit_criterion = setting.criterion
    config.exit_threshold = setting.threshold
    if setting.patience is not None:
        config.patience = setting.patience
    config.max_exit_layer = max_exit_layer


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def run_glue(args: RunGlueArguments, training_args: TrainingArguments, command: str | None = None) -> Path | None:
    """Fine-tune and/or evaluate; returns the results file, or None when nothing was evaluated.

    `command` is the command line recorded in the results (default: this process's `sys.argv`).
    """
    if args.task_name is None and args.train_file is None and args.validation_file is None:
        raise PabeeError("Give --task_name (a GLUE task) or --train_file / --validation_file (your own data).")
    if args.task_name is not None:
        get_task(args.task_name)  # unknown task: fail before touching any folder
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise PabeeError("Nothing to do: pass --do_train and/or --do_eval (or --do_predict for GLUE test files).")
    if training_args.do_predict:  # GLUE submission files: checked before training, written after it
        from .submission import check_predict_setup

        check_predict_setup(args.task_name, args.data_dir, training_args.output_dir, args.overwrite_output_dir)
    patiences = parse_patience_list(args.patience)
    criteria = parse_criteria(args.exit_criterion)
    thresholds = parse_thresholds(args.exit_threshold, criteria)
    try:
        check_regression_threshold(args.regression_threshold)
    except ValueError as error:
        raise PabeeError(f"--{error}") from None
    if args.max_seq_length < 8:
        raise PabeeError(f"--max_seq_length {args.max_seq_length} is too small; use at least 8.")
    name_or_path = args.model_name_or_path or str(bundled_model_path())
    resume = prepare_output_dir(args, training_args, name_or_path)
    output_dir = Path(training_args.output_dir)

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot load a tokenizer from {name_or_path!r}: {error}") from None
    data = load_task_data(args, training_args, labels=_labels_of_finetuned(args, name_or_path))
    task = data.task
    set_seed(training_args.seed)  # before the fresh classifiers are initialised, so a run is reproducible
    model = load_model(args, task, name_or_path)
    model.config.patience = patiences[1] if len(patiences) > 1 else 0
    settings = exit_settings(criteria, patiences, thresholds, model.num_layers)
    check_settings(model, settings, args.max_exit_layer)  # a bad threshold stops us before training
    _store_default_exit(model, settings[criteria[0]], args.max_exit_layer)

    def prepared(dataset, split):
        return tokenize(
            dataset,
            tokenizer,
            args.max_seq_length,
            split=split,
            cache_key=data.cache_keys.get(split),
            overwrite_cache=args.overwrite_cache,
        )

    with training_args.main_process_first(desc="tokenizing"):
        train_set = prepared(data.train, "train") if data.train is not None else None
        eval_sets = {name: prepared(ds, name) for name, ds in data.eval.items()}

    if not torch.cuda.is_available():  # pinning is a no-op without a GPU, and torch warns about it
        training_args.dataloader_pin_memory = False
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=(next(iter(eval_sets.values())) if len(eval_sets) == 1 else eval_sets) or None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=_metrics_during_training(model, task, patiences),
    )
    report: dict[str, Any] = {
        "task": task.name,
        "metrics": list(task.metrics),
        "main_metric": task.main_metric,
        "patiences": patiences,
        "criteria": criteria,
        "max_exit_layer": args.max_exit_layer,
        "provenance": provenance(command, model=name_or_path, data=data.sources),
        "training": None,
        "evaluations": [],
    }
    if resume is not None and trainer.is_world_process_zero():
        print(f"Resuming training from {resume}")
    if training_args.do_train:
        if trainer.is_world_process_zero():
            write_json(output_dir / RUN_FILE, _run_identity(args, name_or_path))
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        trainer.save_state()
        report["training"] = {**result.metrics, "global_step": result.global_step, "train_samples": len(train_set)}

    if training_args.do_predict and trainer.is_world_process_zero():
        from .submission import predict_glue_test

        sizes = {"max_length": args.max_seq_length, "batch_size": training_args.per_device_eval_batch_size}
        predict_glue_test(model, tokenizer, args.task_name, args.data_dir, output_dir, **sizes)

    if not training_args.do_eval:
        return None
    targets: list[tuple[str, str | None]] = []
    if args.eval_all_checkpoints:
        targets += [(p.name, str(p)) for p in _checkpoints(output_dir)]
    targets.append(("final", None))
    for label, path in targets:
        evaluated = model if path is None else load_model(args, task, path)
        evaluator = (
            trainer
            if path is None
            else Trainer(model=evaluated, args=training_args, data_collator=collator, processing_class=tokenizer)
        )
        splits = {}
        for split, dataset in eval_sets.items():
            output = evaluator.predict(dataset, metric_key_prefix=f"eval_{split}")
            _, all_logits, _ = output.predictions
            splits[split] = sweep_results(
                evaluated, all_logits, output.label_ids, task, patiences, settings, args.max_exit_layer
            )
        report["evaluations"].append({"model": label, "path": path or str(output_dir), "splits": splits})

    if not trainer.is_world_process_zero():
        return None
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "eval_results.json", report)
    markdown = _render_markdown(report)
    write_atomic(output_dir / "eval_results.md", markdown + "\n")
    final = report["evaluations"][-1]
    _comparison_plots(report, output_dir)
    for split, result in final["splits"].items():
        print(f"\n{task.name} {split} ({result['num_examples']} examples, {result['num_layers']} layers):\n")
        print("\n".join(_criteria_tables(report, result)).rstrip())
    print(f"\nResults: {output_dir / 'eval_results.md'} (table), eval_results.json, patience_curve.png")
    return output_dir / "eval_results.json"
