"""Every exit criterion: the decision rule on hand-built logits, the latency cap, multi-label, and on models
batched == one-by-one and the one-pass sweep == real early-exit inference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_batched_equals_one_by_one, exit_layers_with_compaction, random_batch, tiny_model

from pabee import (
    CRITERIA,
    ConfidenceCriterion,
    EntropyCriterion,
    ExitSpec,
    PabeeConfig,
    PabeeForSequenceClassification,
    PatienceConfidenceCriterion,
    PatienceCriterion,
    StaticCriterion,
    build_criterion,
    exit_spec_from,
    logits_at_exit,
    sweep_exit_layers,
)
from pabee.rules import Traits, confidence, entropy


def _two_class(margins: list[list[float]]) -> torch.Tensor:
    """`margins[example][layer]` → logits `[batch, layers, 2]` = (margin, 0): class 0 wins when margin > 0."""
    m = torch.tensor(margins)
    return torch.stack([m, torch.zeros_like(m)], dim=-1)


# Margins 0, 2, 4 give top probabilities 0.5, 0.881, 0.982 and entropies 0.693, 0.365, 0.090 nats.
RISING = [[0.0, 2.0, 4.0, 4.0, 4.0, 4.0]]


def _binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_confidence_and_entropy_values():
    logits = _two_class(RISING)[0][:3]
    top = [1 / (1 + math.exp(-m)) for m in (0.0, 2.0, 4.0)]  # 0.5, 0.881, 0.982
    single = "single_label_classification"
    torch.testing.assert_close(confidence(logits, single), torch.tensor(top), atol=1e-5, rtol=0)
    expected_entropy = torch.tensor([_binary_entropy(p) for p in top])  # 0.693, 0.365, 0.090
    torch.testing.assert_close(entropy(logits, single), expected_entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("threshold", "expected"), [(0.4, 2), (0.1, 3), (0.05, 6), (0.0, 6), (1.0, 1)])
def test_entropy_rule(threshold, expected):
    assert sweep_exit_layers(EntropyCriterion(threshold), _two_class(RISING)).tolist() == [expected]


@pytest.mark.parametrize(("threshold", "expected"), [(0.85, 2), (0.9, 3), (0.99, 6), (0.5, 1)])
def test_confidence_rule(threshold, expected):
    assert sweep_exit_layers(ConfidenceCriterion(threshold), _two_class(RISING)).tolist() == [expected]


def test_patience_confidence_counts_only_agreeing_confident_layers():
    # Always class 0, confidence 0.88, 0.88, 0.98, 0.98, ...: plain patience 2 exits at layer 3; with the
    # confidence condition the unsure layer 2 does not count, so the counter reaches 2 only at layer 4.
    logits = _two_class([[2.0, 2.0, 4.0, 4.0, 4.0, 4.0]])
    assert sweep_exit_layers(PatienceCriterion(2), logits).tolist() == [3]
    assert sweep_exit_layers(PatienceConfidenceCriterion(2, 0.9), logits).tolist() == [4]
    assert sweep_exit_layers(PatienceConfidenceCriterion(2, 0.8), logits).tolist() == [3]
    # An unsure layer resets the counter; disagreeing confident layers do not count either.
    reset = _two_class([[4.0, 4.0, 1.0, 4.0, 4.0, 4.0], [4.0, -4.0, 4.0, -4.0, 4.0, -4.0]])
    assert sweep_exit_layers(PatienceConfidenceCriterion(1, 0.9), reset).tolist() == [2, 6]
    assert sweep_exit_layers(PatienceConfidenceCriterion(2, 0.9), reset).tolist() == [5, 6]
    assert sweep_exit_layers(PatienceConfidenceCriterion(0, 0.9), reset).tolist() == [6, 6]


def test_static_rule_answers_from_layer_k():
    logits = torch.randn(5, 6, 3)
    for k in range(1, 7):
        exits = sweep_exit_layers(StaticCriterion(k), logits)
        assert exits.tolist() == [k] * 5
        torch.testing.assert_close(logits_at_exit(logits, exits), logits[:, k - 1])
    with pytest.raises(ValueError, match="static exit at layer 7 is impossible: the model has 6 layers"):
        sweep_exit_layers(StaticCriterion(7), logits)


@pytest.mark.parametrize(
    "criterion",
    [
        PatienceCriterion(3, max_exit_layer=4),
        PatienceCriterion(0, max_exit_layer=4),
        ConfidenceCriterion(0.999, max_exit_layer=4),
        EntropyCriterion(0.001, max_exit_layer=4),
        PatienceConfidenceCriterion(2, 0.999, max_exit_layer=4),
        StaticCriterion(5, max_exit_layer=4),
    ],
    ids=lambda c: c.name,
)
def test_max_exit_layer_caps_every_criterion(criterion):
    # Predictions flip every layer with low confidence: no rule fires, so every example hits the cap.
    logits = _two_class([[0.5, -0.5, 0.5, -0.5, 0.5, -0.5]] * 3)
    assert sweep_exit_layers(criterion, logits).tolist() == [4, 4, 4]


def test_max_exit_layer_keeps_earlier_exits():
    logits = _two_class([[4.0] * 6, [0.5, -0.5, 0.5, -0.5, 0.5, -0.5]])
    assert sweep_exit_layers(PatienceCriterion(1, max_exit_layer=3), logits).tolist() == [2, 3]
    assert sweep_exit_layers(ConfidenceCriterion(0.9, max_exit_layer=5), logits).tolist() == [1, 5]
    assert sweep_exit_layers(PatienceCriterion(1, max_exit_layer=99), logits).tolist() == [2, 6]  # above depth


def test_multi_label_patience_compares_label_sets():
    # Three labels; the predicted set is {labels with logit > 0}.
    sets = [[1, 0, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [0, 0, 0]]
    logits = (torch.tensor([sets]).float() * 2 - 1) * 3  # [1, 6, 3]
    multi = "multi_label_classification"
    assert sweep_exit_layers(PatienceCriterion(1, problem_type=multi), logits).tolist() == [2]
    assert sweep_exit_layers(PatienceCriterion(2, problem_type=multi), logits).tolist() == [5]
    # Confidence for multi-label: the least sure label decides.
    unsure = logits.clone()
    unsure[0, :4, 1] = 0.1
    assert sweep_exit_layers(ConfidenceCriterion(0.9, problem_type=multi), unsure).tolist() == [5]
    assert sweep_exit_layers(EntropyCriterion(0.2, problem_type=multi), unsure).tolist() == [5]


def make_rule(name, patience=None, threshold=None, max_exit_layer=None, problem_type="single_label_classification"):
    """A rule built the one way rules are built, for a model of `problem_type` and unknown depth."""
    return build_criterion(ExitSpec(name, patience, threshold, max_exit_layer), Traits(problem_type))


@pytest.mark.parametrize("name", list(CRITERIA))
def test_tracker_keep_follows_the_remaining_rows(name):
    """Dropping exited rows mid-way, as the engine does, gives the decisions of tracking every row."""
    torch.manual_seed(0)
    logits = torch.randn(32, 6, 3) * 2
    criterion = make_rule(name, patience=1, threshold=3 if name == "static" else None)
    expected = sweep_exit_layers(criterion, logits).tolist()
    got = exit_layers_with_compaction(criterion, logits)
    assert got == expected
    if name != "static":
        assert len(set(expected)) > 1


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fastest", {}, "exit_criterion='fastest' is unknown; choose one of patience, entropy"),
        ("patience", {"patience": 2, "threshold": 0.5}, "a threshold does not apply to 'patience'"),
        ("patience", {}, "'patience' rule needs patience"),
        ("confidence", {"threshold": 1.5}, r"threshold 1.5 is invalid for 'confidence'.*\(0, 1\]"),
        ("confidence", {"threshold": 0}, "threshold 0 is invalid for 'confidence'"),
        ("entropy", {"threshold": -0.1}, "threshold -0.1 is invalid for 'entropy'"),
        ("entropy", {"threshold": float("nan")}, "threshold nan is invalid for 'entropy'"),
        ("patience+confidence", {"threshold": 0.9}, "'patience\\+confidence' rule needs patience"),
        ("static", {}, r"'static' rule needs a threshold \(the layer k\)"),
        ("static", {"threshold": 0}, "threshold 0 is invalid for 'static'"),
        ("static", {"threshold": 2.5}, "threshold 2.5 is invalid for 'static'"),
        ("confidence", {"max_exit_layer": 0}, "max_exit_layer=0 is invalid"),
        ("entropy", {"problem_type": "regression"}, "'entropy' rule needs class probabilities.*regression"),
        ("confidence", {"problem_type": "regression"}, "does not apply to regression; use 'patience' or 'static'"),
        ("patience+confidence", {"patience": 1, "problem_type": "regression"}, "does not apply to regression"),
    ],
)
def test_bad_criterion_settings_are_clear_errors(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_rule(name, **kwargs)


def test_regression_supports_patience_and_static():
    values = torch.tensor([[1.0, 1.05, 1.1, 1.4, 1.45, 1.5]]).unsqueeze(-1)
    assert sweep_exit_layers(make_rule("patience", patience=2, problem_type="regression"), values).tolist() == [3]
    assert sweep_exit_layers(make_rule("static", threshold=4, problem_type="regression"), values).tolist() == [4]


# --- on models ------------------------------------------------------------------------------------------------


def _thresholds_that_vary_exits(model, batch) -> dict[str, dict]:
    """Per-call exit options whose thresholds sit inside the model's own score range, so exits vary."""
    with torch.no_grad():
        all_logits = model(**batch, output_all_logits=True).all_logits
    problem = model.config.problem
    conf = confidence(all_logits.flatten(0, 1), problem)
    ent = entropy(all_logits.flatten(0, 1), problem)
    return {
        "entropy": {"exit_criterion": "entropy", "exit_threshold": float(ent.quantile(0.3))},
        "confidence": {"exit_criterion": "confidence", "exit_threshold": float(conf.quantile(0.7))},
        "patience+confidence": {
            "exit_criterion": "patience+confidence",
            "patience": 1,
            "exit_threshold": float(conf.quantile(0.6)),
        },
        "static": {"exit_criterion": "static", "exit_threshold": 2},
        "confidence capped": {
            "exit_criterion": "confidence",
            "exit_threshold": float(conf.quantile(0.7)),
            "max_exit_layer": 3,
        },
        "patience capped": {"patience": 1, "max_exit_layer": 3},
    }


@pytest.mark.parametrize("model_type", ["bert", "albert", "roberta"])
@pytest.mark.parametrize("num_labels", [2, 3])
def test_every_criterion_batched_equals_one_by_one_and_sweep(model_type, num_labels):
    model = tiny_model(model_type, num_labels=num_labels, pooling="mean")
    batch = random_batch(batch_size=24, max_len=12, seed=1)
    for label, options in _thresholds_that_vary_exits(model, batch).items():
        out = assert_batched_equals_one_by_one(model, batch, **options)
        with torch.no_grad():
            swept = model(**batch, output_all_logits=True, **options)
        assert swept.exit_layers.tolist() == out.exit_layers.tolist(), label
        torch.testing.assert_close(swept.logits, out.logits, rtol=1e-4, atol=1e-5)
        if label not in ("static", "patience capped"):  # those two may legitimately exit all at one layer
            assert len(set(out.exit_layers.tolist())) > 1, f"{label}: exits should vary"
        if "max_exit_layer" in options:
            assert out.exit_layers.max() <= options["max_exit_layer"]


def test_static_is_the_truncated_model_and_skips_early_heads():
    model = tiny_model(num_labels=3, pooling="cls")
    batch = random_batch(batch_size=8)
    called = []
    hooks = [c.register_forward_hook(lambda m, i, o, n=n: called.append(n)) for n, c in enumerate(model.classifiers)]
    with torch.no_grad():
        out = model(**batch, exit_criterion="static", exit_threshold=2)
        all_logits = model(**batch, output_all_logits=True).all_logits
    for hook in hooks:
        hook.remove()
    assert called[0] == 1, "static k=2 runs only classifier 2"
    assert out.exit_layers.tolist() == [2] * 8
    torch.testing.assert_close(out.logits, all_logits[:, 1], rtol=1e-5, atol=1e-6)
    # patience 0 capped at k is the same truncated model
    with torch.no_grad():
        capped = model(**batch, patience=0, max_exit_layer=2)
    torch.testing.assert_close(capped.logits, out.logits)


def test_criterion_is_stored_in_config_overridden_per_call_and_saved(tmp_path):
    model = tiny_model(num_labels=2, pooling="mean", exit_criterion="confidence", exit_threshold=0.52)
    batch = random_batch(batch_size=16, seed=2)
    with torch.no_grad():
        default = model(**batch)
        explicit = model(**batch, exit_criterion="confidence", exit_threshold=0.52)
        other = model(**batch, exit_criterion="patience", patience=1)
        capped = model(**batch, max_exit_layer=1)
    assert default.exit_layers.tolist() == explicit.exit_layers.tolist()
    assert other.exit_layers.tolist() != default.exit_layers.tolist()
    assert capped.exit_layers.tolist() == [1] * 16
    # switching rule for one call takes that rule's default threshold, not the stored one
    switched = exit_spec_from({"exit_criterion": "entropy"}, model.config.exit_spec)
    assert build_criterion(switched, model.config) == EntropyCriterion(0.1)
    model.save_pretrained(tmp_path)
    loaded = PabeeForSequenceClassification.from_pretrained(tmp_path).eval()
    assert (loaded.config.exit_criterion, loaded.config.exit_threshold) == ("confidence", 0.52)
    with torch.no_grad():
        assert loaded(**batch).exit_layers.tolist() == default.exit_layers.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit_criterion": "bogus"}, "exit_criterion='bogus' is unknown"),
        ({"exit_criterion": "static"}, "'static' rule needs a threshold"),
        ({"exit_criterion": "static", "exit_threshold": 5}, "static exit at layer 5 is impossible: the model has 4"),
        ({"exit_criterion": "entropy", "num_labels": 1}, "'entropy' rule needs class probabilities"),
        ({"max_exit_layer": -1}, "max_exit_layer=-1 is invalid"),
        ({"exit_threshold": 0.5}, "a threshold does not apply to 'patience'"),
    ],
)
def test_bad_criterion_config_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_bad_criterion_at_call_time_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="threshold 2 is invalid for 'confidence'"):
        model(**random_batch(), exit_criterion="confidence", exit_threshold=2)


def test_from_backbone_stores_criterion(minilm_path):
    model = PabeeForSequenceClassification.from_backbone(
        minilm_path, exit_criterion="entropy", exit_threshold=0.2, max_exit_layer=4
    )
    assert isinstance(model.config, PabeeConfig)
    assert build_criterion(model.config.exit_spec, model.config) == EntropyCriterion(0.2, max_exit_layer=4)


@pytest.mark.slow
def test_minilm_every_criterion_on_real_text(trained_minilm, minilm_tokenizer, sst2_dev_sentences):
    batch = minilm_tokenizer(sst2_dev_sentences, padding=True, truncation=True, return_tensors="pt")
    for label, options in _thresholds_that_vary_exits(trained_minilm, batch).items():
        out = assert_batched_equals_one_by_one(trained_minilm, batch, atol=1e-4, **options)
        with torch.no_grad():
            swept = trained_minilm(**batch, output_all_logits=True, **options)
        assert swept.exit_layers.tolist() == out.exit_layers.tolist(), label
        if options.get("exit_criterion") != "static":
            assert len(set(out.exit_layers.tolist())) > 1, f"{label}: exits should vary"


# --- multi-label ----------------------------------------------------------------------------------------------


def _multi_label_set(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Label j is on when token 10 + j appears in the sequence: a learnable 3-label task."""
    batch = random_batch(batch_size=n, max_len=10, vocab=20, seed=seed)
    labels = torch.stack([((batch["input_ids"] == 10 + j) & (batch["attention_mask"] > 0)).any(1) for j in range(3)])
    return batch, labels.T.float()


def test_multi_label_trains_with_bce_and_exits_on_label_sets():
    model = tiny_model(num_labels=3, pooling="mean", problem_type="multi_label_classification")
    batch, labels = _multi_label_set(64, seed=0)
    with torch.no_grad():
        all_logits = model(**batch, output_all_logits=True).all_logits
        loss = model(**batch, labels=labels).loss
    weights = torch.arange(1, 5, dtype=torch.float)
    per_layer = torch.stack(
        [torch.nn.functional.binary_cross_entropy_with_logits(all_logits[:, i], labels) for i in range(4)]
    )
    torch.testing.assert_close(loss, (weights * per_layer).sum() / weights.sum())

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else float(loss.detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert float(loss.detach()) < 0.6 * first
    test_batch, test_labels = _multi_label_set(64, seed=1)
    with torch.no_grad():
        full = model(**test_batch, patience=0)
    exact = ((full.logits > 0) == test_labels.bool()).all(-1).float().mean()
    assert exact > 0.3  # chance for 3 independent labels is 1/8
    for patience in (1, 2):
        out = assert_batched_equals_one_by_one(model, test_batch, patience)
        with torch.no_grad():
            swept = model(**test_batch, patience=patience, output_all_logits=True)
        assert swept.exit_layers.tolist() == out.exit_layers.tolist()
    assert_batched_equals_one_by_one(model, test_batch, exit_criterion="confidence", exit_threshold=0.8)


def test_a_rule_built_before_does_not_let_an_equal_but_invalid_value_through():
    """Built rules are kept, keyed by the setting: `patience=True` equals `patience=1` as a value, and is refused
    even after patience 1 was built; a value no setting can hold (a list) is refused with the usual message."""
    model = Traits(num_hidden_layers=6)
    assert build_criterion(ExitSpec(patience=1), model).patience == 1
    with pytest.raises(ValueError, match="patience=True is invalid"):
        build_criterion(ExitSpec(patience=True), model)
    with pytest.raises(ValueError, match="threshold"):
        build_criterion(ExitSpec("confidence", threshold=[0.9]), model)
    assert build_criterion(ExitSpec(patience=1), model) is build_criterion(ExitSpec(patience=1), model)
