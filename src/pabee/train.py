"""`pabee run-glue`: fine-tune a PABEE model with Trainer and evaluate it across exit settings.

`run_glue` runs the stages in order — check, load, train, evaluate, write — each a function below, so every stage
can be read (and changed) on its own. The flags check themselves (`pabee.arguments`); what makes a run the same run,
and the checkpoint it resumes from, live in `pabee.resume`; the evaluation in `pabee.evaluate`, and the tables and
plots in `pabee.report`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    set_seed,
)

from .arguments import RunGlueArguments
from .checkpoints import CheckpointMarker, checkpoint_step, complete_checkpoints
from .data import TaskData, load_glue, load_user_files, tokenize
from .errors import PabeeError
from .evaluate import metrics_during_training, sweep_results
from .glue import TaskSpec
from .modeling import PabeeForSequenceClassification
from .pretrained import bundled_model_path
from .provenance import portable_path, provenance, write_atomic, write_json
from .recipes import TwoStageCallback
from .report import criteria_tables, run_glue_markdown, run_glue_plots
from .resume import RUN_FILE, prepare_output_dir_in_turn, run_identity
from .settings import ExitSpec

__all__ = ["load_model", "load_task_data", "run_glue"]


# --- check ---------------------------------------------------------------------------------------------------


def join_cpu_processes(training_args: TrainingArguments) -> TrainingArguments:
    """Under torchrun without a GPU, make the processes one job: accelerate forms a (gloo) process group on CPU only
    with `--use_cpu`, so without it each process trained alone and wrote the same folder. Returns the arguments to
    train with: these, or a copy with `--use_cpu` set."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched or training_args.use_cpu or training_args.world_size > 1:
        return training_args
    # A copy, not the flag set in place: TrainingArguments sets its devices up once per object, and has done so above.
    training_args = replace(training_args, use_cpu=True)
    if training_args.device.type != "cpu" or training_args.world_size == 1:
        raise PabeeError("torchrun started this process, but it could not join the others (no process group).")
    return training_args


def check(args: RunGlueArguments, training_args: TrainingArguments) -> None:
    """What only both sets of flags together can tell, before any folder or model is touched."""
    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise PabeeError("Nothing to do: pass --do_train and/or --do_eval (or --do_predict for GLUE test files).")
    if args.calibrating and not training_args.do_train:
        raise PabeeError(
            "--calibrate_max_drop and --calibrate_certify choose on held-out training data: they need --do_train."
        )
    if args.two_stage and training_args.ddp_find_unused_parameters is False:
        raise PabeeError(
            "--two_stage leaves part of the model without gradients in each stage, which DDP accepts only with "
            "--ddp_find_unused_parameters true (its default without gradient checkpointing)."
        )
    if training_args.do_predict:  # GLUE submission files: checked before training, written after it
        from .submission import check_predict_setup

        check_predict_setup(args.glue_task, args.data_dir, training_args.output_dir, args.overwrite_output_dir)


# --- load ----------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What the stages share: the model and its tokenizer, the data, and the exit settings to evaluate."""

    name_or_path: str
    tokenizer: PreTrainedTokenizerBase
    data: TaskData
    model: PabeeForSequenceClassification
    specs: dict[str, list[ExitSpec]]
    train_set: datasets.Dataset | None
    eval_sets: dict[str, datasets.Dataset]

    @property
    def task(self) -> TaskSpec:
        return self.data.task


def load_task_data(args: RunGlueArguments, training_args: TrainingArguments, labels=None) -> TaskData:
    """The splits the flags ask for (`--task_name`'s GLUE task, or your own files), cut to `--max_*_samples`."""
    task = args.glue_task
    if task is not None:
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
    if args.calibrating and data.train is not None:
        held_out = max(2, round(args.calibration_fraction * len(data.train)))
        if held_out >= len(data.train):
            raise PabeeError(f"Calibration needs more than {held_out} training examples.")
        parts = data.train.train_test_split(test_size=held_out, seed=training_args.seed)
        data.train, data.calibration = parts["train"], parts["test"]
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
    threshold = args.regression_threshold
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
            patience=0,  # fresh classifiers: the full model until a setting is chosen on data
            regression_threshold=threshold,
            pooling=None if args.pooling == "auto" else args.pooling,
            id2label=task.id2label,
            label2id={v: k for k, v in task.id2label.items()} if task.id2label else None,
            problem_type="regression" if task.is_regression else "single_label_classification",
        )
    except ValueError as error:
        raise PabeeError(str(error)) from None


def _default_exit(args: RunGlueArguments) -> ExitSpec:
    """The setting the saved model answers with until one is chosen on data (`--calibrate_*`, `pabee calibrate`):
    the full model (under `--max_exit_layer`, if given). A swept setting is never the default: the sweep reports
    every one on the same data, so the first of them may be the worst (MRPC patience 1: 6.7 points under full)."""
    return ExitSpec("patience", patience=0, max_exit_layer=args.max_exit_layer)


def _tokenized(
    args: RunGlueArguments, training_args: TrainingArguments, tokenizer: PreTrainedTokenizerBase, data: TaskData
) -> tuple[datasets.Dataset | None, dict[str, datasets.Dataset]]:
    """The training set and every evaluation split, tokenized (and cached) once, by the main process first."""

    def prepared(dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        key = data.cache_keys.get(split)
        return tokenize(
            dataset, tokenizer, args.max_seq_length, split=split, cache_key=key, overwrite_cache=args.overwrite_cache
        )

    with training_args.main_process_first(desc="tokenizing"):
        train_set = prepared(data.train, "train") if data.train is not None else None
        return train_set, {name: prepared(ds, name) for name, ds in data.eval.items()}


def load(args: RunGlueArguments, training_args: TrainingArguments, name_or_path: str) -> Setup:
    """Tokenizer, data and model; every exit setting is built once here, so a bad one stops us before training."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise PabeeError(f"Cannot load a tokenizer from {name_or_path!r}: {error}") from None
    data = load_task_data(args, training_args, labels=_labels_of_finetuned(args, name_or_path))
    set_seed(training_args.seed)  # before the fresh classifiers are initialised, so a run is reproducible
    model = load_model(args, data.task, name_or_path)
    specs = args.sweep_specs(model.config)
    if training_args.do_train:  # a folder only evaluated keeps its own setting
        model.config.exit_spec = _default_exit(args)
    if training_args.do_train:  # the loss this run trains with, recorded in the saved config
        model.config.distillation_weight = args.distillation_weight
        model.config.distillation_temperature = args.distillation_temperature
        for name, value in args.recipes.items():
            setattr(model.config, name, value)
    train_set, eval_sets = _tokenized(args, training_args, tokenizer, data)
    return Setup(name_or_path, tokenizer, data, model, specs, train_set, eval_sets)


# --- train ---------------------------------------------------------------------------------------------------


def make_trainer(args: RunGlueArguments, training_args: TrainingArguments, setup: Setup) -> Trainer:
    """The Trainer for training and for evaluating the final model; evaluation during training logs every
    patience's metrics."""
    if not torch.cuda.is_available():  # pinning is a no-op without a GPU, and torch warns about it
        training_args.dataloader_pin_memory = False
    eval_sets = setup.eval_sets
    return Trainer(
        model=setup.model,
        args=training_args,
        train_dataset=setup.train_set,
        eval_dataset=(next(iter(eval_sets.values())) if len(eval_sets) == 1 else eval_sets) or None,
        data_collator=DataCollatorWithPadding(setup.tokenizer),
        processing_class=setup.tokenizer,
        compute_metrics=metrics_during_training(setup.model, setup.task, args.sweep),
        callbacks=[CheckpointMarker(), *([TwoStageCallback(args.two_stage)] if args.two_stage else [])],
    )


def train(trainer: Trainer, setup: Setup, resume: str | None, identity: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune (resuming from `resume` if given) and save the model; returns the training summary. The run's
    `identity` is recorded first, so a resume after a kill can tell it is the same run."""
    if trainer.is_world_process_zero():
        if resume is not None:
            print(f"Resuming training from {resume}")
        write_json(Path(trainer.args.output_dir) / RUN_FILE, identity)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.save_state()
    # train_runtime covers this process only: the steps it ran are global_step - resumed_from_step.
    resumed = 0 if resume is None else checkpoint_step(resume)
    return {**result.metrics, "global_step": result.global_step, "resumed_from_step": resumed,
            "train_samples": len(setup.train_set)}  # fmt: skip


def predict_test(args: RunGlueArguments, trainer: Trainer, setup: Setup) -> None:
    """`--do_predict`: GLUE submission files from real early exit with the saved model's setting."""
    from .submission import predict_glue_test

    sizes = {"max_length": args.max_seq_length, "batch_size": trainer.args.per_device_eval_batch_size}
    predict_glue_test(setup.model, setup.tokenizer, setup.task, args.data_dir, trainer.args.output_dir, **sizes)


# --- evaluate ------------------------------------------------------------------------------------------------


def _split_results(args: RunGlueArguments, evaluator: Trainer, setup: Setup) -> dict[str, dict[str, Any]]:
    """Every evaluation split of the evaluator's model through one full pass, every exit setting read off it."""
    splits = {}
    for split, dataset in setup.eval_sets.items():
        output = evaluator.predict(dataset, metric_key_prefix=f"eval_{split}")
        splits[split] = sweep_results(
            evaluator.model,
            output.predictions,
            output.label_ids,
            setup.task,
            args.sweep.patience_specs(),
            setup.specs,
        )
    return splits


def evaluate(args: RunGlueArguments, trainer: Trainer, setup: Setup) -> list[dict[str, Any]]:
    """Each `checkpoint-*` (with `--eval_all_checkpoints`), then the final model, on every evaluation split."""
    output_dir = Path(trainer.args.output_dir)
    evaluations = []
    main_process = trainer.is_world_process_zero()
    for checkpoint in complete_checkpoints(output_dir, verbose=main_process) if args.eval_all_checkpoints else []:
        evaluator = Trainer(  # the eval set too: Trainer refuses --eval_strategy steps without one
            model=load_model(args, setup.task, str(checkpoint)),
            args=trainer.args,
            eval_dataset=trainer.eval_dataset,
            data_collator=trainer.data_collator,
            processing_class=setup.tokenizer,
        )
        splits = _split_results(args, evaluator, setup)
        evaluations.append({"model": checkpoint.name, "path": portable_path(checkpoint), "splits": splits})
    final = _split_results(args, trainer, setup)
    evaluations.append({"model": "final", "path": portable_path(output_dir), "splits": final})
    return evaluations


# --- write ---------------------------------------------------------------------------------------------------


def new_report(args: RunGlueArguments, setup: Setup, command: str | None, world_size: int = 1) -> dict[str, Any]:
    """The results skeleton, with the provenance of the run as it starts (`world_size`: the torchrun processes
    that trained and evaluated, since the global batch is theirs together); the stages fill in the rest."""
    task = setup.task
    data = {split: portable_path(path) for split, path in setup.data.sources.items()}  # as the result names them
    sources = {"model": portable_path(setup.name_or_path), "data": data, "world_size": world_size}
    return {
        "task": task.name,
        "metrics": list(task.metrics),
        "main_metric": task.main_metric,
        **args.sweep.describe(),
        "provenance": provenance(command, **sources),
        "training": None,
        "evaluations": [],
    }


def write_results(report: dict[str, Any], output_dir: Path) -> Path:
    """`eval_results.json`, `eval_results.md` and the plots; the final model's tables are printed too."""
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "eval_results.json", report)
    write_atomic(output_dir / "eval_results.md", run_glue_markdown(report) + "\n")
    run_glue_plots(report, output_dir)
    for split, result in report["evaluations"][-1]["splits"].items():
        print(f"\n{report['task']} {split} ({result['num_examples']} examples, {result['num_layers']} layers):\n")
        print("\n".join(criteria_tables(report, result)).rstrip())
    print(f"\nResults: {output_dir / 'eval_results.md'} (table), eval_results.json, patience_curve.png")
    return output_dir / "eval_results.json"


def calibrate_saved_model(args: RunGlueArguments, setup: Setup, output_dir: Path, command: str | None) -> None:
    """`--calibrate_max_drop` / `--calibrate_certify`: choose the saved model's exit setting on the held-out
    training examples."""
    from .calibrate import Calibration, calibrate, summary_line
    from .pipeline import PabeePipeline

    max_drop = 1.0 if args.calibrate_max_drop is None else args.calibrate_max_drop
    auto = args.calibrate_confidence_level if args.auto_certify else None
    settings = Calibration(args.sweep, max_drop, guarantee=args.guarantee(), auto_confidence=auto)
    pipe = PabeePipeline(setup.model, setup.tokenizer, max_length=args.max_seq_length)
    report = calibrate(pipe, setup.task, setup.data.calibration, settings, output_dir, command)
    print(
        f"Calibrated on {len(setup.data.calibration)} held-out training examples: {summary_line(report, output_dir)}"
    )


def run_glue(args: RunGlueArguments, training_args: TrainingArguments, command: str | None = None) -> Path | None:
    """Fine-tune and/or evaluate; returns the results file, or None when nothing was evaluated.

    `command` is the command line recorded in the results (default: this process's `sys.argv`).
    Under torchrun every process trains and takes its share of each evaluation (Trainer shards and gathers it);
    only the first writes the results and the submission files, and prints the tables.
    """
    training_args = join_cpu_processes(training_args)
    check(args, training_args)
    name_or_path = args.model_name_or_path or str(bundled_model_path())
    identity = run_identity(args, training_args, name_or_path) if training_args.do_train else None
    resume = prepare_output_dir_in_turn(args, training_args, name_or_path, identity)
    setup = load(args, training_args, name_or_path)
    trainer = make_trainer(args, training_args, setup)
    report = new_report(args, setup, command, training_args.world_size)
    if training_args.do_train:
        report["training"] = train(trainer, setup, resume, identity)
        trainer.accelerator.wait_for_everyone()  # the final save and marker written: all list the same checkpoints
    if training_args.do_eval:
        report["evaluations"] = evaluate(args, trainer, setup)
    if not trainer.is_world_process_zero():
        return None
    if args.calibrating:
        calibrate_saved_model(args, setup, Path(training_args.output_dir), command)
    if training_args.do_predict:  # after evaluation, so no other process waits on it in a collective call
        predict_test(args, trainer, setup)
    return write_results(report, Path(training_args.output_dir)) if training_args.do_eval else None
