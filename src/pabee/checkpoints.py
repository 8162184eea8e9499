"""Checkpoints a kill cannot corrupt: a marker written after Trainer has saved a whole checkpoint.

Trainer writes straight into `checkpoint-N`, so a process killed while saving leaves a folder that looks like a
checkpoint. `CheckpointMarker` writes `pabee_checkpoint.json` (the step and every file's size) last, atomically;
only a folder holding it, with its files unchanged, is ever resumed from or evaluated.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .provenance import write_json

__all__ = [
    "CHECKPOINT_MARKER",
    "CheckpointMarker",
    "checkpoint_folders",
    "checkpoint_step",
    "complete_checkpoints",
    "is_complete_checkpoint",
    "mark_checkpoint_complete",
]

CHECKPOINT_MARKER = "pabee_checkpoint.json"


def checkpoint_step(checkpoint: str | Path) -> int:
    """The training step a `checkpoint-N` folder was saved at, read off its name as Trainer writes it."""
    return int(Path(checkpoint).name.split("-")[1])


def checkpoint_folders(output_dir: Path) -> list[Path]:
    """Every `checkpoint-N` folder, by step, complete or not."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=checkpoint_step)


def _checkpoint_files(checkpoint: Path) -> dict[str, int]:
    """Each file's size, by path inside the folder (the marker and its temporary file left out)."""
    files = {}
    for path in sorted(checkpoint.rglob("*")):
        if path.is_file() and not path.name.startswith((CHECKPOINT_MARKER, f".{CHECKPOINT_MARKER}.")):
            files[path.relative_to(checkpoint).as_posix()] = path.stat().st_size
    return files


def mark_checkpoint_complete(checkpoint: Path, step: int) -> None:
    """Record that `checkpoint` was written whole: its step and every file's size, atomically, after the rest."""
    write_json(checkpoint / CHECKPOINT_MARKER, {"step": step, "files": _checkpoint_files(checkpoint)})


def is_complete_checkpoint(checkpoint: Path) -> bool:
    """The one test of "complete": the marker is there, for this folder's step, and each file it lists still has
    the size it had; anything else is a save that a kill (or a crash) cut short."""
    try:
        marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
        step = checkpoint_step(checkpoint)
        files = marker["files"]
        return (
            marker["step"] == step
            and bool(files)
            and all((checkpoint / name).stat().st_size == size for name, size in files.items())
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


class CheckpointMarker(TrainerCallback):
    """Marks each checkpoint complete once Trainer has saved all of it (`on_save` follows `_save_checkpoint`,
    trainer_state.json included), so a resume never picks up a folder a kill left half-written."""

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"  # as Trainer names it
        if state.is_world_process_zero and checkpoint.is_dir():
            mark_checkpoint_complete(checkpoint, state.global_step)
        return control


def complete_checkpoints(output_dir: Path, *, remove_incomplete: bool = False, verbose: bool = True) -> list[Path]:
    """The complete checkpoints, by step; each incomplete one is named, and removed when `remove_incomplete`
    (before training, so Trainer never resumes from it nor writes into its stale files), else skipped."""
    complete = []
    for checkpoint in checkpoint_folders(output_dir):
        if is_complete_checkpoint(checkpoint):
            complete.append(checkpoint)
            continue
        if verbose:
            action = "removing it" if remove_incomplete else "skipping it"
            print(f"{checkpoint} is incomplete (interrupted while saving): {action}.")
        if remove_incomplete:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return complete
