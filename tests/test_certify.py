"""`pabee.certify`: the p-values are valid (hand-computed, and rejecting a true null no more often than the level),
fixed-sequence testing stops at the first failure, and the level is split across rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pabee.certify import (
    Guarantee,
    betting_p_value,
    binomial_p_value,
    certify,
    fixed_sequence,
    min_examples,
    risk_losses,
)


def test_the_binomial_p_value_is_the_exact_lower_tail():
    assert binomial_p_value(np.zeros(10), 0.1) == pytest.approx(0.9**10)
    one_failure = np.array([1.0] + [0.0] * 9)
    assert binomial_p_value(one_failure, 0.1) == pytest.approx(0.9**10 + 10 * 0.1 * 0.9**9)
    assert binomial_p_value(np.ones(10), 0.1) == pytest.approx(1.0)


def test_fixed_sequence_stops_at_the_first_hypothesis_it_cannot_reject():
    assert fixed_sequence([0.01, 0.02, 0.5, 0.001], 0.05) == 2
    assert fixed_sequence([0.2, 0.001], 0.05) == 0
    assert fixed_sequence([0.01, 0.01], 0.05) == 2
    assert fixed_sequence([], 0.05) == 0


def test_losses_are_disagreement_or_the_change_in_correctness():
    exits, full, labels = np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0])
    assert risk_losses(exits, full, None, "disagreement").tolist() == [0, 1, 0, 1]
    assert risk_losses(exits, full, labels, "drop").tolist() == [0, 1, 0, -1]  # newly wrong, newly right
    near = risk_losses(np.array([1.0, 2.0]), np.array([1.05, 2.5]), None, "disagreement", 0.1, regression=True)
    assert near.tolist() == [0, 1]
    with pytest.raises(ValueError, match="needs labels"):
        risk_losses(exits, full, None, "drop")


@pytest.mark.parametrize("bound", [0.3, 0.5, 0.55])
def test_the_betting_p_value_rejects_a_true_null_at_most_at_the_level(bound):
    """Values with mean exactly at the bound (the hardest null): rejections at level 0.1 in <= 10% of samples."""
    rng = np.random.default_rng(0)
    rejected = [betting_p_value(rng.random(300) < bound, bound, 0.1) <= 0.1 for _ in range(1000)]
    assert np.mean(rejected) <= 0.1 + 3 * math.sqrt(0.1 * 0.9 / 1000)


def test_the_betting_p_value_is_small_when_the_mean_is_well_below_the_bound():
    rng = np.random.default_rng(1)
    assert betting_p_value((rng.random(400) < 0.2).astype(float), 0.5, 0.05) < 1e-6
    assert betting_p_value(np.full(400, 0.6), 0.5, 0.05) == 1.0  # above the bound: no evidence
    assert betting_p_value(np.array([]), 0.5, 0.05) == 1.0


def test_rules_share_the_error_budget_and_each_stops_at_its_first_failure():
    guarantee = Guarantee("disagreement", 0.1, confidence=0.9)
    clean, dirty = np.zeros(100), np.r_[np.ones(50), np.zeros(50)]
    result = certify({"a": [clean, clean, dirty, clean], "b": [dirty, clean]}, guarantee)
    assert result["a"]["level"] == pytest.approx(0.05) and result["b"]["level"] == pytest.approx(0.05)
    assert result["a"]["certified"] == 2 and result["b"]["certified"] == 0
    assert result["a"]["p_values"][0] == pytest.approx(0.9**100)


def test_the_fewest_examples_that_can_certify_anything():
    # zero disagreements out of n: p = 0.99^n <= 0.05 from n = ceil(ln 0.05 / ln 0.99) = 299
    assert min_examples(Guarantee("disagreement", 0.01), 0.05) == 299
    needed = min_examples(Guarantee("drop", 0.02), 0.05)
    assert (
        betting_p_value(np.full(needed, 0.5), 0.51, 0.05)
        <= 0.05
        < betting_p_value(np.full(needed - 1, 0.5), 0.51, 0.05)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"risk": "speed", "bound": 0.1}, "risk='speed' is unknown"),
        ({"risk": "drop", "bound": 0.0}, "bound 0.0 is invalid"),
        ({"risk": "drop", "bound": 0.1, "confidence": 1.0}, "confidence 1.0 is invalid"),
    ],
)
def test_a_bad_guarantee_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Guarantee(**kwargs)
