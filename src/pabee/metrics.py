"""Task metrics (the official GLUE ones, via scikit-learn and scipy) and early-exit statistics."""

from __future__ import annotations

import statistics

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["METRIC_LABELS", "compute_metrics", "exit_statistics", "predictions_from_logits", "task_score"]

METRIC_LABELS = {
    "accuracy": "Acc",
    "f1": "F1",
    "mcc": "MCC",
    "pearson": "Pearson",
    "spearman": "Spearman",
}


def _safe_correlation(fn, predictions: np.ndarray, labels: np.ndarray) -> float:
    """Correlation, or 0.0 when one side is constant (where it is undefined), so a metric is always a number."""
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(fn(predictions, labels)[0])


def compute_metrics(metrics: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Score predictions (class ids, or scores for regression) against labels.

    Args:
        metrics: names from `accuracy`, `f1` (binary, positive class 1), `macro_f1`, `mcc`, `pearson`, `spearman`.
    Returns:
        `{name: value}` with values as plain floats in [0, 1] (correlations in [-1, 1]).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out: dict[str, float] = {}
    for name in metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name == "macro_f1":
            out[name] = float(f1_score(labels, predictions, average="macro", zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = _safe_correlation(pearsonr, predictions, labels)
        elif name == "spearman":
            out[name] = _safe_correlation(spearmanr, predictions, labels)
        else:
            raise ValueError(f"Unknown metric {name!r}; known: accuracy, f1, macro_f1, mcc, pearson, spearman.")
    return out


def task_score(row: dict[str, float], metrics: tuple[str, ...]) -> float:
    """The task's quality in points: its metric, or the mean of its metrics (as GLUE averages MRPC's two)."""
    return 100 * statistics.fmean(row[name] for name in metrics)


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Class ids (argmax) or, for regression, the single output."""
    logits = np.asarray(logits)
    return logits[..., 0] if regression else logits.argmax(axis=-1)


def exit_statistics(exit_layers: np.ndarray, num_layers: int) -> dict[str, float | list[int]]:
    """Average exit layer, layer speed-up (layers / average exit layer), % layers saved, exit histogram."""
    exit_layers = np.asarray(exit_layers)
    average = float(exit_layers.mean())
    return {
        "avg_exit_layer": average,
        "speed_up": num_layers / average,
        "layers_saved_pct": 100.0 * (1.0 - average / num_layers),
        "exit_histogram": np.bincount(exit_layers, minlength=num_layers + 1)[1:].tolist(),
    }
