"""The exit rule on hand-built layer predictions, independent of any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import exit_layers_with_compaction

from pabee import ExitSpec, PatienceCriterion, build_criterion, logits_at_exit, sweep_exit_layers
from pabee.rules import Traits


def _one_hot_logits(predictions: list[list[int]], num_labels: int = 3) -> torch.Tensor:
    """`predictions[example][layer]` → logits `[batch, layers, num_labels]` whose argmax is that label."""
    labels = torch.tensor(predictions)
    return torch.nn.functional.one_hot(labels, num_labels).float()


@pytest.mark.parametrize(
    ("predictions", "patience", "expected"),
    [
        ([0, 0, 0, 0, 0, 0], 1, 2),  # layer 2 agrees with layer 1 → counter 1
        ([0, 0, 0, 0, 0, 0], 2, 3),
        ([0, 0, 0, 0, 0, 0], 5, 6),  # counter reaches 5 only at the last layer
        ([0, 0, 0, 0, 0, 0], 6, 6),  # patience ≥ layers never fires: full model
        ([0, 0, 0, 0, 0, 0], 0, 6),  # patience 0 is the full model
        ([0, 1, 1, 2, 2, 2], 2, 6),  # counter: 0,0,1,0,1,2 → fires at layer 6
        ([0, 1, 1, 1, 2, 2], 2, 4),  # counter: 0,0,1,2 → fires at layer 4
        ([0, 0, 1, 1, 1, 0], 2, 5),  # reset at layer 3, then 1, 2 → layer 5
        ([0, 1, 0, 1, 0, 1], 1, 6),  # never agrees
    ],
)
def test_patience_rule_on_hand_built_predictions(predictions, patience, expected):
    logits = _one_hot_logits([predictions])
    exit_layers = sweep_exit_layers(PatienceCriterion(patience), logits)
    assert exit_layers.tolist() == [expected]
    assert logits_at_exit(logits, exit_layers).argmax(-1).tolist() == [predictions[expected - 1]]


def test_rule_is_per_example_inside_a_batch():
    logits = _one_hot_logits([[0, 0, 0, 0], [0, 1, 1, 1], [2, 1, 2, 1]])
    assert sweep_exit_layers(PatienceCriterion(1), logits).tolist() == [2, 3, 4]
    assert sweep_exit_layers(PatienceCriterion(2), logits).tolist() == [3, 4, 4]


def test_regression_agreement_uses_threshold():
    # outputs per layer: differences 0.05, 0.05, 0.3, 0.05, 0.05
    values = torch.tensor([[1.0, 1.05, 1.1, 1.4, 1.45, 1.5]]).unsqueeze(-1)

    def exits(patience: int, threshold: float) -> list[int]:
        criterion = PatienceCriterion(patience, problem_type="regression", regression_threshold=threshold)
        return sweep_exit_layers(criterion, values).tolist()

    assert exits(2, 0.1) == [3]
    assert exits(3, 0.1) == [6]
    assert exits(3, 0.5) == [4]
    assert exits(1, 0.0) == [6]


def test_tracker_keep_follows_the_remaining_rows():
    """Dropping exited rows mid-way gives the same decisions as tracking every row."""
    logits = _one_hot_logits([[0, 0, 0, 0, 0], [0, 1, 1, 1, 1], [1, 1, 2, 2, 2], [2, 0, 1, 2, 0]])
    criterion = PatienceCriterion(1)
    full = sweep_exit_layers(criterion, logits).tolist()
    got = exit_layers_with_compaction(criterion, logits)
    assert got == full == [2, 3, 2, 5]


@pytest.mark.parametrize("bad", [-1, 1.5, "3", None, True])
def test_invalid_patience_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="patience=.*whole number >= 0"):
        PatienceCriterion(bad)


@pytest.mark.parametrize("bad", [-0.1, float("inf"), float("nan"), "x"])
def test_invalid_threshold_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="regression_threshold=.*finite number >= 0"):
        PatienceCriterion(1, problem_type="regression", regression_threshold=bad)


def test_can_exit_early_only_when_the_counter_can_fire_before_the_last_layer():
    assert [PatienceCriterion(p).can_exit_early(6) for p in range(8)] == [
        False,
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]


def test_earliest_exit_is_where_the_rule_can_first_fire():
    """The layers before it run for every example (one prefix call on ONNX Runtime); it must never be later than
    the first layer at which the one-pass sweep lets any example leave."""
    from pabee import ConfidenceCriterion, PatienceConfidenceCriterion, StaticCriterion

    assert [PatienceCriterion(p).earliest_exit(6) for p in (1, 2, 5)] == [2, 3, 6]
    assert PatienceCriterion(3, max_exit_layer=2).earliest_exit(6) == 2  # the cap comes first
    assert PatienceConfidenceCriterion(2, threshold=0.9).earliest_exit(6) == 3
    assert ConfidenceCriterion(0.9).earliest_exit(6) == 1
    assert StaticCriterion(4).earliest_exit(6) == 4
    agreeing = _one_hot_logits([[0] * 6] * 3)
    for patience in (1, 2, 3, 4):
        criterion = PatienceCriterion(patience)
        assert int(sweep_exit_layers(criterion, agreeing).min()) == criterion.earliest_exit(6)


def test_the_readers_answer_in_the_kind_of_array_they_are_given_and_trackers_in_numpy():
    """ONNX Runtime's loop hands the rules numpy, torch's hands tensors: the same numbers either way, and a
    tracker's decision is a numpy bool array whatever it read."""
    import numpy as np

    from pabee.rules import ConfidenceCriterion, confidence, entropy, predictions

    logits = torch.tensor([[2.0, -1.0], [0.1, 0.2], [-3.0, 3.0]])
    for reader in (confidence, entropy, predictions):
        from_torch = reader(logits, "single_label_classification")
        from_numpy = reader(logits.numpy(), "single_label_classification")
        assert isinstance(from_torch, torch.Tensor) and isinstance(from_numpy, np.ndarray)
        assert np.allclose(from_torch.numpy(), from_numpy)
    for given in (logits, logits.numpy()):
        for criterion in (PatienceCriterion(1), ConfidenceCriterion(0.9)):
            tracker = criterion.tracker(3)
            first, second = tracker.update(given), tracker.update(given)
            assert first.dtype == np.bool_ and second.dtype == np.bool_
            assert second.tolist() == ([True, True, True] if criterion.name == "patience" else [True, False, True])


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (ExitSpec("patience", patience=2), "single_label_classification"),
        (ExitSpec("patience", patience=1), "multi_label_classification"),
        (ExitSpec("patience", patience=2), "regression"),
        (ExitSpec("patience+confidence", patience=1, threshold=0.5), "single_label_classification"),
        (ExitSpec("entropy", threshold=0.9), "single_label_classification"),
        (ExitSpec("entropy", threshold=0.68), "multi_label_classification"),
        (ExitSpec("confidence", threshold=0.6), "single_label_classification"),
        (ExitSpec("static", threshold=3), "single_label_classification"),
    ],
)
@pytest.mark.parametrize("calls", [(1, 1, 1, 1, 1, 1), (6,), (2, 4), (3, 1, 2)])
def test_layers_read_in_one_pass_decide_as_one_at_a_time(spec, problem, calls):
    """A runtime that ran several layers in one call hands the rule their logits at once (`update_layers`): the
    decisions, and the state carried into the next call, are those of `update` layer by layer."""
    generator = np.random.default_rng(sum(calls) + len(calls))
    labels = 1 if problem == "regression" else 3
    # Few distinct values, so that layers agree often enough for the counters to grow and reset.
    logits = generator.integers(-2, 3, size=(6, 5, labels)).astype(np.float32) / 2
    criterion = build_criterion(spec, Traits(problem=problem, num_hidden_layers=6))
    one_at_a_time = criterion.tracker(5)
    expected = np.stack([one_at_a_time.update(layer) for layer in logits])
    grouped, layer, decided = criterion.tracker(5), 0, []
    for count in calls:
        decided.append(grouped.update_layers(list(logits[layer : layer + count])))
        layer += count
    assert np.array_equal(np.concatenate(decided), expected)
