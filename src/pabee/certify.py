"""Exit settings with a guarantee: Learn then Test with fixed-sequence testing.

Choosing the fastest setting whose quality on a sample stays within a bound promises nothing about new data: on a
few hundred examples the chosen setting is often the one whose sample happened to flatter it. Learn then Test
(Angelopoulos, Bates, Candès, Jordan and Lei, 2021) turns the choice into hypothesis tests. For each candidate
setting, the null hypothesis is "its risk exceeds the bound"; a setting is *certified* when its null is rejected.
If every rejection is made at a level that controls the family-wise error at δ, then with probability at least
1 − δ over the calibration examples *every* certified setting has risk within the bound, so the fastest of them
may be taken freely.

Here the candidates of one exit rule are tested in a fixed order, from the most conservative setting (most
layers) to the most aggressive, each at level δ / (number of rules), stopping at the first that cannot be
rejected (fixed-sequence testing within a rule, Bonferroni across rules). The order is fixed before the data are
seen, so no multiplicity is lost along a rule's sequence.

Two risks, both against the full model's answers (the model without early exit is the reference a user knows):
- `disagreement`: the share of examples whose answer differs from the full model's (for regression: by more than
  a tolerance). Needs no labels. Losses are 0 or 1, so the p-value is the exact binomial tail.
- `drop`: the expected accuracy drop, E[wrong at exit − wrong at full depth], each term −1, 0 or 1. The p-value
  comes from a betting martingale (Waudby-Smith and Ramdas, 2023), valid for any bounded loss and tight when
  the early answer rarely changes correctness. Accuracy is a mean over examples; F1, Matthews correlation and
  correlation coefficients are not, so no bound of this kind covers them directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binom

__all__ = [
    "RISKS",
    "Guarantee",
    "betting_p_value",
    "binomial_p_value",
    "certify",
    "fixed_sequence",
    "min_examples",
    "p_value",
    "risk_losses",
]

RISKS = ("drop", "disagreement")


@dataclass(frozen=True)
class Guarantee:
    """What a certified setting promises: `risk` at most `bound`, with probability `confidence` over the
    calibration sample. `bound` is a share (0.01 = one point of accuracy, or 1% of answers changed)."""

    risk: str
    bound: float
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.risk not in RISKS:
            raise ValueError(f"risk={self.risk!r} is unknown; use one of {', '.join(RISKS)}.")
        if not 0.0 < self.bound < 1.0:
            raise ValueError(f"The risk bound {self.bound!r} is invalid: use a share in (0, 1).")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"The confidence {self.confidence!r} is invalid: use a probability in (0, 1).")

    @property
    def delta(self) -> float:
        return 1.0 - self.confidence

    def describe(self) -> str:
        what = "accuracy drop" if self.risk == "drop" else "disagreement with the full model"
        amount = f"{100 * self.bound:g} point(s)" if self.risk == "drop" else f"{100 * self.bound:g}% of answers"
        return f"{what} at most {amount} with {100 * self.confidence:g}% confidence"


def risk_losses(
    exit_predictions: np.ndarray,
    full_predictions: np.ndarray,
    labels: np.ndarray | None,
    risk: str,
    tolerance: float = 0.0,
    regression: bool = False,
) -> np.ndarray:
    """Each example's loss under `risk`: 0/1 for disagreement, −1/0/1 for the accuracy drop (needs labels)."""
    if risk == "disagreement":
        if regression:
            return (np.abs(exit_predictions - full_predictions) > tolerance).astype(float)
        return (exit_predictions != full_predictions).astype(float)
    if labels is None:
        raise ValueError("The accuracy drop needs labels; certify 'disagreement' on unlabelled text.")
    if regression:
        raise ValueError("The accuracy drop needs a classification task; certify 'disagreement' for regression.")
    return (exit_predictions != labels).astype(float) - (full_predictions != labels).astype(float)


def binomial_p_value(losses: np.ndarray, bound: float) -> float:
    """Null: the mean of 0/1 losses is at least `bound`. p = P(Binomial(n, bound) <= observed failures), exact."""
    return float(binom.cdf(int(np.sum(losses)), len(losses), bound))


def betting_p_value(values: np.ndarray, bound: float, delta: float) -> float:
    """Null: E[X] >= `bound` for X in [0, 1]. A bettor stakes against each X exceeding the bound; under the null
    the capital is a nonnegative supermartingale, so by Ville's inequality p = 1 / (its maximum) is valid.

    The stake follows the predictable plug-in of Waudby-Smith and Ramdas: larger when the values seen so far vary
    little, capped at half of what keeps the capital positive."""
    n = len(values)
    if n == 0:
        return 1.0
    values = np.asarray(values, dtype=float)
    seen = np.arange(1, n + 1)
    means = (0.5 + np.cumsum(values)) / (seen + 1)
    spreads = (0.25 + np.cumsum((values - means) ** 2)) / (seen + 1)
    prior_spread = np.concatenate(([0.25], spreads[:-1]))  # what is known before each bet
    stakes = np.minimum(np.sqrt(2 * math.log(1 / delta) / (n * prior_spread)), 0.5 / (1 - bound))
    log_capital = np.cumsum(np.log1p(stakes * (bound - values)))
    return float(min(1.0, math.exp(-max(0.0, float(log_capital.max())))))


def p_value(losses: np.ndarray, guarantee: Guarantee, level: float) -> float:
    """The test of one setting: exact binomial for 0/1 losses, betting for the drop (shifted into [0, 1]). The
    bets follow a fixed random order of the examples: an order that follows the data (sorted by length, say)
    would let the risk drift along the sequence, which the martingale argument does not allow."""
    if guarantee.risk == "disagreement":
        return binomial_p_value(losses, guarantee.bound)
    order = np.random.default_rng(0).permutation(len(losses))
    return betting_p_value((np.asarray(losses)[order] + 1) / 2, (guarantee.bound + 1) / 2, level)


def fixed_sequence(p_values: Sequence[float], level: float) -> int:
    """How many hypotheses, in their fixed order, are rejected at `level` before the first that is not."""
    for index, value in enumerate(p_values):
        if value > level:
            return index
    return len(p_values)


def certify(chains: Mapping[str, Sequence[np.ndarray]], guarantee: Guarantee) -> dict[str, dict[str, Any]]:
    """Learn then Test over exit rules: `chains` maps each rule to its settings' per-example losses, most
    conservative first. Returns, per rule, each setting's p-value, the level it was tested at and how many of its
    leading settings are certified (family-wise error at most 1 − confidence over all rules)."""
    level = guarantee.delta / max(1, len(chains))
    result = {}
    for name, chain in chains.items():
        values = [p_value(losses, guarantee, level) for losses in chain]
        result[name] = {"p_values": values, "level": level, "certified": fixed_sequence(values, level)}
    return result


def min_examples(guarantee: Guarantee, level: float, limit: int = 1_000_000) -> int | None:
    """The fewest examples on which even a setting that never changes an answer is certified at `level`: below
    it nothing but the full model can be, whatever the model does. None beyond `limit`."""
    if guarantee.risk == "disagreement":  # zero failures: p = (1 - bound)^n
        return math.ceil(math.log(level) / math.log1p(-guarantee.bound))
    low, high = 1, 1
    while betting_p_value(np.full(high, 0.5), (guarantee.bound + 1) / 2, level) > level:
        low, high = high, 2 * high
        if high > limit:
            return None
    while low < high:  # the p-value of a constant sequence falls as it grows
        middle = (low + high) // 2
        if betting_p_value(np.full(middle, 0.5), (guarantee.bound + 1) / 2, level) > level:
            low = middle + 1
        else:
            high = middle
    return high
