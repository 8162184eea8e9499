"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pabee.metrics import compute_metrics, exit_statistics, predictions_from_logits


def test_accuracy_and_f1_by_hand():
    labels = [1, 1, 1, 0, 0, 1]
    preds = [1, 0, 1, 0, 1, 1]
    # tp=3, fp=1, fn=1 → precision 3/4, recall 3/4, F1 0.75; 4 of 6 right
    out = compute_metrics(("accuracy", "f1"), preds, labels)
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["f1"] == pytest.approx(0.75)


def test_matthews_by_hand():
    labels = [1, 1, 1, 0, 0, 1]
    preds = [1, 0, 1, 0, 1, 1]
    tp, tn, fp, fn = 3, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics(("mcc",), preds, labels)["mcc"] == pytest.approx(expected)  # 0.25


def test_pearson_and_spearman_by_hand():
    labels = [1.0, 2.0, 3.0, 4.0]
    preds = [1.0, 3.0, 2.0, 4.0]
    out = compute_metrics(("pearson", "spearman"), preds, labels)
    # centred: labels (-1.5,-.5,.5,1.5), preds (-1.5,.5,-.5,1.5) → cov 4, var 5 → r = 0.8; same ranks → 0.8
    assert out["pearson"] == pytest.approx(0.8)
    assert out["spearman"] == pytest.approx(0.8)


def test_constant_predictions_give_zero_correlation_not_nan():
    out = compute_metrics(("pearson", "spearman"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert out == {"pearson": 0.0, "spearman": 0.0}


def test_unknown_metric_is_an_error():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'"):
        compute_metrics(("bleu",), [1], [1])


def test_predictions_from_logits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert predictions_from_logits(logits, regression=False).tolist() == [1, 0]
    assert predictions_from_logits(np.array([[3.5], [1.0]]), regression=True).tolist() == [3.5, 1.0]


def test_exit_statistics_by_hand():
    stats = exit_statistics(np.array([2, 2, 3, 6]), num_layers=6)
    assert stats["avg_exit_layer"] == pytest.approx(3.25)
    assert stats["speed_up"] == pytest.approx(6 / 3.25)
    assert stats["layers_saved_pct"] == pytest.approx(100 * (1 - 3.25 / 6))
    assert stats["exit_histogram"] == [0, 2, 1, 0, 0, 1]
