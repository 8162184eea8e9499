"""Resuming `pabee run-glue`: what makes two training runs the same run, and which checkpoint a run continues from.

Training records the run's identity (`run_identity`: the task, the training data's and the starting model's content,
every flag that changes the result) in `pabee_run.json` in its output folder. `prepare_output_dir` resumes that
folder's last complete checkpoint (`pabee.checkpoints`) only when the record is this run's, and refuses checkpoints of
any other run instead of continuing them silently; it also keeps an evaluation from overwriting earlier results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from .arguments import RunGlueArguments
from .checkpoints import CHECKPOINT_MARKER, checkpoint_folders, complete_checkpoints, is_complete_checkpoint
from .data import HUB_DATASET
from .errors import PabeeError
from .glue import GlueTask, task_dir
from .provenance import file_identity

__all__ = ["RESULT_FILES", "RUN_FILE", "prepare_output_dir", "prepare_output_dir_in_turn", "run_identity"]

RESULT_FILES = ("eval_results.json", "eval_results.md", "patience_curve.png", "exit_histograms.png")
RUN_FILE = "pabee_run.json"  # what a training run in this folder is, so a resume cannot mix two runs


def _non_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


# TrainingArguments that change what training computes (not where or how often it saves, logs or evaluates). The
# length of training (--max_steps, --num_train_epochs) is left out: continuing a run for more steps from its last
# checkpoint is what a user who asks for more steps wants.
RESULT_HYPERPARAMETERS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "weight_decay",
    "warmup_ratio",
    "warmup_steps",
    "lr_scheduler_type",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
    "world_size",
)
WEIGHT_FILES = ("config.json", "*.safetensors", "*.bin")  # what decides a local starting model


def _data_identity(args: RunGlueArguments, task: GlueTask | None) -> dict[str, Any]:
    if task is None:
        return {"train_file": file_identity(Path(args.train_file)) if args.train_file else None}
    if args.data_dir is None:
        return {"hub": f"{HUB_DATASET}/{task.hub_config}"}
    return {"train_file": file_identity(task_dir(task, args.data_dir) / "train.tsv")}


def _model_identity(name_or_path: str) -> dict[str, Any]:
    """A hub name as it is; a local folder by its config's and weights' content."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return {"name": name_or_path}
    files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()})
    return {"name": name_or_path, "files": {p.name: file_identity(p) for p in files}}


def _plain(value: Any) -> Any:
    """A value as JSON keeps it, so a recorded identity compares equal to a computed one (enums as their text)."""
    return value if isinstance(value, (int, float, bool, str, type(None))) else str(value)


def run_identity(args: RunGlueArguments, training_args: TrainingArguments, name_or_path: str) -> dict[str, Any]:
    """What makes two training runs the same run, so that one may resume the other's checkpoints: the task, the
    training data's content, the starting model's content, and every flag that changes the result."""
    task = args.glue_task  # None for your own files
    hyperparameters = {name: _plain(getattr(training_args, name, None)) for name in RESULT_HYPERPARAMETERS}
    calibration = args.calibration_fraction if args.calibrating else None
    hyperparameters |= {
        "max_seq_length": args.max_seq_length,
        "max_train_samples": args.max_train_samples,
        "calibration_fraction": calibration,  # it takes its share out of the training data
        "pooling": args.pooling,
        "task_type": args.task_type,
        "distillation_weight": args.distillation_weight,
        "distillation_temperature": args.distillation_temperature,
    }
    # The exit-aware recipes only when on, so a run recorded before they existed is still the same run.
    hyperparameters |= {name: value for name, value in args.recipes.items() if value}
    return {
        "task": task.name if task is not None else None,
        "data": _data_identity(args, task),
        "model": _model_identity(name_or_path),
        "hyperparameters": hyperparameters,
    }


def _differences(previous: Any, current: dict[str, Any]) -> str:
    """Which parts of two run identities differ, in a few words for an error message."""
    if not isinstance(previous, dict):
        return "no record of what it was"
    names = [key for key in current if key != "hyperparameters" and previous.get(key) != current[key]]
    before = previous.get("hyperparameters") or {}
    names += [name for name, value in current["hyperparameters"].items() if before.get(name) != value]
    return "it differs in: " + ", ".join(names) if names else "a record this version does not read"


def _check_same_run(where: str, recorded: Path, identity: dict[str, Any]) -> None:
    """`where` (a folder of checkpoints, or a checkpoint) must belong to the run `identity` describes."""
    try:
        previous = json.loads(recorded.read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    if previous != identity:
        raise PabeeError(
            f"{where} holds checkpoints of another run ({_differences(previous, identity)}); pass "
            "--overwrite_output_dir to start afresh there, or choose another folder."
        )


def _same_run_checkpoint(out: Path, identity: dict[str, Any], main_process: bool) -> str | None:
    """The last complete checkpoint in `out` when it belongs to this run, or None when this run was killed before
    it completed one (it starts afresh); checkpoints of another run are an error."""
    try:
        same_run = json.loads((out / RUN_FILE).read_text()) == identity
    except (OSError, json.JSONDecodeError):
        same_run = False
    unfinished = same_run and not (out / "trainer_state.json").exists()  # a finished run saves its state there
    if not checkpoint_folders(out) and not unfinished:
        raise PabeeError(
            f"--output_dir {out} exists and is not empty. Pass --overwrite_output_dir to replace its contents, "
            "or choose another folder."
        )
    _check_same_run(f"--output_dir {out}", out / RUN_FILE, identity)
    complete = complete_checkpoints(out, remove_incomplete=main_process, verbose=main_process)
    if complete:
        return str(complete[-1])
    if main_process:
        print(f"No complete checkpoint of this run in {out}: training from the start.")
    return None


def _checked_resume(resume: str, identity: dict[str, Any]) -> str:
    """`--resume_from_checkpoint`, held to what the automatic resume is: complete, and of this run."""
    checkpoint = Path(resume)
    if not checkpoint.is_dir():
        raise PabeeError(f"--resume_from_checkpoint {resume} is not a folder.")
    if not is_complete_checkpoint(checkpoint):
        raise PabeeError(
            f"--resume_from_checkpoint {resume} is not a complete checkpoint (no {CHECKPOINT_MARKER}, or files "
            "changed since it was saved: a save cut short); resume from an earlier one."
        )
    _check_same_run(f"--resume_from_checkpoint {resume}", checkpoint.parent / RUN_FILE, identity)
    return resume


def prepare_output_dir(
    args: RunGlueArguments, training_args: TrainingArguments, name_or_path: str, identity: dict | None = None
) -> str | None:
    """Refuse to overwrite silently; return the checkpoint to resume from, if any.

    A folder holding checkpoints of the same run (same task, data content, starting model and result-changing
    flags: `run_identity`) is resumed from its last complete checkpoint (one a kill cut short is removed first);
    checkpoints of any other run are an error, never silently continued. `--resume_from_checkpoint` is held to
    the same two tests.
    """
    out = Path(training_args.output_dir)
    if out.exists() and not out.is_dir():
        raise PabeeError(f"--output_dir {out} exists and is not a folder.")
    resume = training_args.resume_from_checkpoint
    if not training_args.do_train:
        taken = [name for name in RESULT_FILES if (out / name).exists()]
        if taken and not args.overwrite_output_dir:
            raise PabeeError(
                f"--output_dir {out} already holds {', '.join(taken)}; pass --overwrite_output_dir to replace them."
            )
        return None
    identity = identity or run_identity(args, training_args, name_or_path)
    if resume is not None:
        return _checked_resume(resume, identity)
    if not _non_empty(out):
        return None
    if not args.overwrite_output_dir:
        return _same_run_checkpoint(out, identity, training_args.should_save)
    if not training_args.should_save:  # the saving process emptied the folder first (`prepare_output_dir_in_turn`)
        return None
    # Only what a previous run wrote: stale checkpoints would be resumed or evaluated as this run's.
    for checkpoint in checkpoint_folders(out):
        shutil.rmtree(checkpoint)
    for name in (*RESULT_FILES, RUN_FILE, "trainer_state.json"):
        (out / name).unlink(missing_ok=True)
    return None


def prepare_output_dir_in_turn(
    args: RunGlueArguments, training_args: TrainingArguments, name_or_path: str, identity: dict | None
) -> str | None:
    """`prepare_output_dir` under torchrun: the saving process first (only it removes stale files), the others
    after it, so they see the folder it left and reach the same checkpoint to resume from, or the same error."""
    local = training_args.save_on_each_node  # the processes that save: one per node, or rank 0 alone
    with training_args.main_process_first(local=local, desc="preparing the output folder"):
        return prepare_output_dir(args, training_args, name_or_path, identity)
