"""Exit settings as one value: the one function from keywords to a setting, and what a setting says of itself."""

from __future__ import annotations

import pytest

from pabee import ExitSpec, ExitSweep, exit_spec_from
from pabee.settings import CERTIFY_SWEEPS, DEFAULT_SWEEPS


def test_keywords_become_a_setting_over_a_base():
    own = ExitSpec("patience", patience=3, max_exit_layer=5)
    assert exit_spec_from({}, own) == own
    assert exit_spec_from({"patience": None, "exit_threshold": None}, own) == own  # None is unset
    assert exit_spec_from({"patience": 2}, own) == ExitSpec("patience", patience=2, max_exit_layer=5)
    assert exit_spec_from({"max_exit_layer": 4}) == ExitSpec("patience", patience=0, max_exit_layer=4)  # base: full
    switched = exit_spec_from({"exit_criterion": "confidence"}, ExitSpec("entropy", threshold=0.3))
    assert switched == ExitSpec("confidence")  # a threshold belongs to its rule: the new rule's default applies
    assert exit_spec_from({"exit_criterion": "confidence", "exit_threshold": 0.8}).threshold == 0.8


def test_a_patience_given_alone_means_the_patience_rule():
    calibrated = ExitSpec("confidence", threshold=0.8, max_exit_layer=5)
    assert exit_spec_from({"patience": 0}, calibrated) == ExitSpec("patience", patience=0, max_exit_layer=5)
    assert exit_spec_from({"patience": 0}, ExitSpec("static", threshold=3)).is_full_model
    assert exit_spec_from({"exit_threshold": 0.9}, calibrated) == ExitSpec(
        "confidence", threshold=0.9, max_exit_layer=5
    )
    both = ExitSpec("patience+confidence", patience=2, threshold=0.9)
    assert exit_spec_from({"patience": 1}, both) == ExitSpec("patience+confidence", patience=1, threshold=0.9)
    assert exit_spec_from({"exit_criterion": "entropy", "patience": 2}, calibrated).criterion == "entropy"


def test_an_unknown_keyword_or_rule_is_named():
    with pytest.raises(ValueError, match="Unknown exit option 'patients'; use patience, exit_criterion"):
        exit_spec_from({"patients": 2})
    with pytest.raises(ValueError, match="exit_criterion='fastest' is unknown; choose one of patience, entropy"):
        exit_spec_from({"exit_criterion": "fastest"})


def test_a_setting_round_trips_through_its_keywords():
    spec = ExitSpec("patience+confidence", patience=2, threshold=0.9, max_exit_layer=4)
    assert spec.keywords() == {"patience": 2, "exit_criterion": "patience+confidence", "exit_threshold": 0.9,
                               "max_exit_layer": 4}  # fmt: skip
    assert exit_spec_from(spec.keywords(), ExitSpec("static", threshold=1)) == spec
    assert spec.title == "patience 2 + confidence 0.9, at most 4 layers" and spec.label == "p2, 0.9"


def test_a_sweep_lists_every_setting_under_its_cap():
    sweep = ExitSweep(("patience", "static", "confidence"), (0, 2), {"confidence": (0.8,)}, cap=3)
    specs = sweep.specs(num_layers=4)
    assert [s.label for s in specs["patience"]] == ["0 (full)", "2"]
    assert [s.label for s in specs["static"]] == ["k=1", "k=2", "k=3", "k=4"]
    assert specs["confidence"] == [ExitSpec("confidence", threshold=0.8, max_exit_layer=3)]
    assert all(s.max_exit_layer == 3 for items in specs.values() for s in items)


def test_certifying_walks_fine_thresholds_where_the_user_gave_none():
    sweep = ExitSweep(("patience", "confidence", "entropy", "static"), (0, 1), {"entropy": (0.2,)})
    fine = sweep.for_certifying()
    assert fine.thresholds["confidence"] == CERTIFY_SWEEPS["confidence"] and 0.91 in fine.thresholds["confidence"]
    assert fine.thresholds["entropy"] == (0.2,) and "static" not in fine.thresholds  # given, or no threshold grid
    assert fine.patiences == sweep.patiences and sweep.thresholds == {"entropy": (0.2,)}  # the sweep is unchanged
    assert (
        len(fine.specs(4)["confidence"]) == len(CERTIFY_SWEEPS["confidence"]) > 5 * len(DEFAULT_SWEEPS["confidence"])
    )
