"""`run-glue`'s evaluation: every exit setting read off one full pass.

Trainer's predictions are every layer's logits `[examples, layers, labels]` (the config's
`keys_to_ignore_at_inference` drops the rest), and each setting's exit layers come from them through the same rule
real inference uses (`sweep_exit_layers`), so a whole sweep costs one forward pass and cannot disagree with
early exit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction

from .glue import TaskSpec
from .metrics import compute_metrics, exit_statistics, predictions_from_logits
from .modeling import Runtime
from .rules import build_criterion, logits_at_exit, sweep_exit_layers
from .settings import ExitSpec, ExitSweep

__all__ = ["exit_answers", "layer_metrics", "metrics_during_training", "setting_row", "sweep_results"]


def exit_answers(model: Runtime, all_logits: torch.Tensor, spec: ExitSpec) -> tuple[np.ndarray, np.ndarray]:
    """What real early exit answers under `spec`, read off every layer's logits (a class id or value per example),
    and the 1-based layer each example exits at."""
    exit_layers = sweep_exit_layers(build_criterion(spec, model.config), all_logits)
    chosen = logits_at_exit(all_logits, exit_layers).numpy()
    return predictions_from_logits(chosen, model.config.is_regression), exit_layers.numpy()


def setting_row(
    model: Runtime, all_logits: torch.Tensor, labels: np.ndarray, task: TaskSpec, spec: ExitSpec
) -> dict[str, Any]:
    """One results row: the setting, the task metrics of the answers it gives, and where examples exit."""
    predictions, exit_layers = exit_answers(model, all_logits, spec)
    return {
        **spec.describe(),
        **compute_metrics(task.metrics, predictions, labels),
        **exit_statistics(exit_layers, all_logits.shape[1]),
    }


def layer_metrics(all_logits: np.ndarray, labels: np.ndarray, task: TaskSpec, regression: bool) -> list[dict]:
    """Each internal classifier's metrics on its own, layer 1 first."""
    return [
        {"layer": layer + 1, **compute_metrics(task.metrics, predictions_from_logits(logits, regression), labels)}
        for layer, logits in enumerate(np.moveaxis(np.asarray(all_logits), 1, 0))
    ]


def sweep_results(
    model: Runtime,
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: TaskSpec,
    patience_specs: Sequence[ExitSpec],
    specs: Mapping[str, Sequence[ExitSpec]] | None = None,
) -> dict[str, Any]:
    """Rows for every patience setting (the full model first) and for every other criterion's settings in `specs`,
    plus each layer's own metrics; the shape of one split in `eval_results.json`."""
    logits = torch.as_tensor(all_logits)
    result: dict[str, Any] = {
        "num_examples": int(len(labels)),
        "num_layers": logits.shape[1],
        "patiences": [setting_row(model, logits, labels, task, spec) for spec in patience_specs],
        "per_layer": layer_metrics(all_logits, labels, task, model.config.is_regression),
    }
    others = {name: items for name, items in (specs or {}).items() if name != "patience"}
    if others:
        result["criteria"] = {
            name: [setting_row(model, logits, labels, task, spec) for spec in items] for name, items in others.items()
        }
    return result


def metrics_during_training(
    model: Runtime, task: TaskSpec, sweep: ExitSweep
) -> Callable[[EvalPrediction], dict[str, float]]:
    """Trainer's `compute_metrics`: the task metrics and speed-up of every patience, flattened for the log
    (`full_accuracy`, `p2_speed_up`, ...)."""

    def compute(prediction: EvalPrediction) -> dict[str, float]:
        summary = sweep_results(model, prediction.predictions, prediction.label_ids, task, sweep.patience_specs())
        flat: dict[str, float] = {}
        for row in summary["patiences"]:
            prefix = "full" if row["patience"] == 0 else f"p{row['patience']}"
            for name in (*task.metrics, "speed_up"):
                flat[f"{prefix}_{name}"] = row[name]
        return flat

    return compute
