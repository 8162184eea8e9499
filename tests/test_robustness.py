"""The robustness benchmark's verdicts: sign tests corrected for the number of comparisons a claim rests on, and
the size of the difference each comparison still allows."""

from __future__ import annotations

from types import ModuleType

import pytest
from helpers import benchmark_script


@pytest.fixture(scope="module")
def robustness() -> ModuleType:
    return benchmark_script("robustness")


def test_holm_adjusts_step_down_and_keeps_the_order(robustness):
    # Sorted 0.01, 0.02, 0.03, 0.5 -> x4, x3, x2, x1, each at least the one before.
    assert robustness.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert robustness.holm([0.4, 0.9]) == pytest.approx([0.8, 0.9])
    assert robustness.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_a_verdict_needs_the_corrected_p_value(robustness):
    test = {"only_pabee": 18, "only_other": 6, "p": 0.023, "p_holm": 0.068}
    assert robustness.verdict(test) == "no difference shown"  # significant alone, not over four comparisons
    assert robustness.verdict({**test, "p_holm": 0.04}) == "confirmed"
    assert robustness.verdict({"only_pabee": 1, "only_other": 10, "p": 0.01, "p_holm": 0.047}) == "refuted"


def test_the_difference_interval_is_exact_on_the_discordant_examples(robustness):
    diff, low, high = robustness.difference_interval({"only_pabee": 18, "only_other": 6}, 100)
    assert diff == pytest.approx(12.0)  # (18 - 6) / 100 examples, in points
    assert 0 < low < diff < high < 24  # excludes 0 (p = 0.023 alone), and cannot exceed 24 discordant of 100
    diff, low, high = robustness.difference_interval({"only_pabee": 1, "only_other": 1}, 100)
    assert diff == 0.0 and low == pytest.approx(-high) and high > 1.5
    assert robustness.difference_interval({"only_pabee": 0, "only_other": 0}, 100) == (0.0, 0.0, 0.0)


def test_the_claim_table_corrects_within_each_comparison(robustness):
    def attacked(survived: list[bool]) -> dict:
        return {"examples": [{"status": "failed" if s else "successful"} for s in survived]}

    n = 100
    rows = {
        "pabee": attacked([True] * 30 + [False] * 70),
        "plain": attacked([False] * 20 + [True] * 10 + [False] * 70),  # PABEE kept 20 more: p ~ 2e-6
        "full": attacked([True] * 29 + [False] * (n - 29)),  # one more: no difference
    }
    data = {"tasks": {"SST-2": {"attacks": {"pruthi": rows, "deepwordbug": rows}}}}
    tests = robustness.claim_tests(data)
    assert [(t["other"], t["recipe"]) for t in tests] == [
        ("plain", "pruthi"), ("full", "pruthi"), ("plain", "deepwordbug"), ("full", "deepwordbug")
    ]  # fmt: skip
    plain = [t for t in tests if t["other"] == "plain"]
    assert all(t["p_holm"] == pytest.approx(2 * plain[0]["p"]) for t in plain)  # two tests in the family
    assert [robustness.verdict(t) for t in tests] == ["confirmed", "no difference shown"] * 2
    summary = robustness.claim_summary(tests, data)
    assert "2 confirmed, 0 refuted, 0 no difference shown of 2 tests" in summary
