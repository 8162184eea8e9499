"""The early-exit engine: batched == one-by-one, full-model limits, loss, save/load, Auto classes, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_batched_equals_one_by_one,
    random_batch,
    read_tsv_column,
    tiny_encoder_config,
    tiny_model,
)
from transformers import AutoConfig, AutoModelForSequenceClassification

from pabee import ExitSpec, PabeeConfig, PabeeForSequenceClassification, infer


@pytest.mark.parametrize("model_type", ["bert", "albert"])
@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
@pytest.mark.parametrize("patience", [1, 2, 3])
def test_tiny_batched_equals_one_by_one(model_type, pooling, patience):
    model = tiny_model(model_type, num_labels=3, pooling=pooling)
    batch = random_batch(batch_size=16, max_len=12)
    assert_batched_equals_one_by_one(model, batch, patience)


@pytest.mark.parametrize("model_type", ["bert", "albert"])
def test_tiny_regression_batched_equals_one_by_one(model_type):
    model = tiny_model(model_type, num_labels=1, regression_threshold=0.02, pooling="mean")
    batch = random_batch(batch_size=16, max_len=12, seed=3)
    seen = set()
    for patience in (1, 2, 3):
        out = assert_batched_equals_one_by_one(model, batch, patience)
        seen.update(out.exit_layers.tolist())
    assert len(seen) > 1, "exit layers should vary for this test to mean something"


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_minilm_batched_equals_one_by_one_on_sst2(trained_minilm, minilm_tokenizer, sst2_dev_sentences, patience):
    batch = minilm_tokenizer(sst2_dev_sentences, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert len(sst2_dev_sentences) >= 64 and len(set(lengths.tolist())) > 10
    out = assert_batched_equals_one_by_one(trained_minilm, batch, patience)
    assert out.logits.shape == (64, 2)
    assert len(set(out.exit_layers.tolist())) > 1, "exits must vary after training"
    assert out.exit_layers.min() >= patience + 1


def test_minilm_regression_batched_equals_one_by_one(minilm_path, minilm_tokenizer, glue_dir):
    torch.manual_seed(0)
    # Mean pooling: untrained heads on the [CLS] state (regression's automatic pooling) all exit at one layer.
    model = PabeeForSequenceClassification.from_backbone(
        minilm_path, num_labels=1, regression_threshold=0.01, pooling="mean"
    ).eval()
    dev = glue_dir / "STS-B" / "dev.tsv"
    first, second = read_tsv_column(dev, "sentence1", 64), read_tsv_column(dev, "sentence2", 64)
    batch = minilm_tokenizer(first, second, padding=True, return_tensors="pt")
    seen = set()
    for patience in (1, 2, 3):
        seen.update(assert_batched_equals_one_by_one(model, batch, patience).exit_layers.tolist())
    assert len(seen) > 1


@pytest.mark.parametrize("model_type", ["bert", "albert", "mpnet"])
@pytest.mark.parametrize("num_labels", [1, 3])
def test_patience_zero_and_large_give_the_full_model(model_type, num_labels):
    model = tiny_model(model_type, num_labels=num_labels)
    batch = random_batch()
    with torch.no_grad():
        full = model(**batch, output_all_logits=True).all_logits[:, -1]
        for patience in (0, model.num_layers, model.num_layers + 5):
            out = model(**batch, patience=patience)
            assert out.exit_layers.tolist() == [model.num_layers] * batch["input_ids"].shape[0]
            torch.testing.assert_close(out.logits, full, rtol=1e-5, atol=1e-6)


def test_configured_patience_is_used_and_call_overrides_it():
    model = tiny_model(patience=1)
    batch = random_batch(batch_size=16)
    with torch.no_grad():
        default = model(**batch)
        explicit = model(**batch, patience=1)
        full = model(**batch, patience=0)
    assert default.exit_layers.tolist() == explicit.exit_layers.tolist()
    assert default.exit_layers.float().mean() < full.exit_layers.float().mean()


def test_all_logits_sweep_matches_real_inference():
    model = tiny_model("albert", num_labels=3)
    batch = random_batch(batch_size=16)
    with torch.no_grad():
        for patience in range(0, 5):
            swept = model(**batch, patience=patience, output_all_logits=True)
            real = model(**batch, patience=patience)
            assert swept.all_logits.shape == (16, 4, 3)
            assert swept.exit_layers.tolist() == real.exit_layers.tolist()
            torch.testing.assert_close(swept.logits, real.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_training_loss_is_the_layer_weighted_average(num_labels):
    model = tiny_model(num_labels=num_labels, classifier_dropout=0.0)
    batch = random_batch()
    labels = torch.randn(8) if num_labels == 1 else torch.randint(0, num_labels, (8,))
    out = model(**batch, labels=labels)
    layers = out.all_logits.shape[1]
    if num_labels == 1:
        per_layer = [torch.nn.functional.mse_loss(out.all_logits[:, i, 0], labels) for i in range(layers)]
    else:
        per_layer = [torch.nn.functional.cross_entropy(out.all_logits[:, i], labels) for i in range(layers)]
    expected = sum((i + 1) * loss for i, loss in enumerate(per_layer)) / sum(range(1, layers + 1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for i, classifier in enumerate(model.classifiers):
        assert classifier.weight.grad is not None and classifier.weight.grad.abs().sum() > 0, f"layer {i + 1}"
    assert model.encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_training_mode_uses_dropout_and_returns_all_logits():
    model = tiny_model().train()
    batch = random_batch()
    out = model(**batch)
    assert out.all_logits.shape == (8, 4, 2) and out.loss is None
    torch.manual_seed(1)
    first = model(**batch).all_logits
    torch.manual_seed(2)
    assert not torch.allclose(first, model(**batch).all_logits)


def test_save_and_load_round_trip_and_auto_class(tmp_path):
    model = tiny_model("albert", num_labels=3, patience=2, pooling="mean", id2label={0: "a", 1: "b", 2: "c"})
    batch = random_batch(batch_size=16)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    for loaded in (
        PabeeForSequenceClassification.from_pretrained(tmp_path),
        AutoModelForSequenceClassification.from_pretrained(tmp_path),
    ):
        loaded.eval()
        assert type(loaded) is PabeeForSequenceClassification
        assert loaded.config.patience == 2 and loaded.config.pooling == "mean"
        assert loaded.config.id2label == {0: "a", 1: "b", 2: "c"}
        assert loaded.config.encoder_config.model_type == "albert"
        with torch.no_grad():
            a, b = model(**batch), loaded(**batch)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_layers, b.exit_layers)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PabeeConfig)


def test_from_backbone_on_minilm(minilm_path, minilm_tokenizer):
    model = PabeeForSequenceClassification.from_backbone(minilm_path, num_labels=3, patience=4)
    assert model.config.pooling == "mean"  # the bundled MiniLM says it was trained with mean pooling
    assert model.config.num_labels == 3 and model.num_layers == 6 and model.config.patience == 4
    assert model.encoder.pooler is None
    model.eval()
    out = model(**minilm_tokenizer(["a gripping film", "it is dull"], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 3) and out.exit_layers.shape == (2,)
    with_pooler = PabeeForSequenceClassification.from_backbone(minilm_path, pooling="pooler")
    assert with_pooler.encoder.pooler is not None and with_pooler.config.pooling == "pooler"


@pytest.mark.parametrize(
    ("kwargs", "pooling"),
    [
        ({"num_labels": 2}, "mean"),
        ({"num_labels": 1}, "cls"),  # regression: mean pooling costs STS-B 11 Spearman points (reproduction v2)
        ({"num_labels": 3, "problem_type": "multi_label_classification"}, "mean"),
        ({"num_labels": 1, "pooling": "mean"}, "mean"),  # an explicit choice is kept
    ],
)
def test_automatic_pooling_follows_the_problem_type(minilm_path, kwargs, pooling):
    model = PabeeForSequenceClassification.from_backbone(minilm_path, **kwargs)
    assert model.config.pooling == pooling


def test_from_backbone_without_sentence_transformers_files_uses_the_pooler(tmp_path):
    from transformers import AutoModel

    AutoModel.from_config(tiny_encoder_config("bert")).save_pretrained(tmp_path)
    for num_labels in (2, 1):  # classification and regression alike, as in the paper
        model = PabeeForSequenceClassification.from_backbone(tmp_path, num_labels=num_labels)
        assert model.config.pooling == "pooler" and model.encoder.pooler is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": -1}, "patience=-1 is invalid"),
        ({"regression_threshold": -0.5}, "regression_threshold=-0.5 is invalid"),
        ({"num_labels": 0}, "num_labels=0 is invalid"),
        ({"pooling": "max"}, "pooling='max' is not supported"),
    ],
)
def test_bad_config_values_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PabeeConfig(encoder_config=tiny_encoder_config("bert"), **kwargs)


def test_bad_from_backbone_arguments_are_clear_errors(minilm_path, tmp_path):
    with pytest.raises(ValueError, match="num_labels=0 is invalid"):
        PabeeForSequenceClassification.from_backbone(minilm_path, num_labels=0)
    with pytest.raises(ValueError, match="patience=-2 is invalid"):
        PabeeForSequenceClassification.from_backbone(minilm_path, patience=-2)
    from transformers import AutoModel, GPT2Config

    AutoModel.from_config(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="No PABEE adapter for backbone type 'gpt2'"):
        PabeeForSequenceClassification.from_backbone(tmp_path)


def test_bad_patience_at_call_time_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="patience=-3 is invalid"):
        model(**random_batch(), patience=-3)


def test_left_padded_batch_equals_one_by_one():
    """Left padding cannot be trimmed, but rows must still leave the batch correctly.

    BERT's absolute positions shift under left padding, so each row is compared with itself run alone with
    the same padding."""
    model = tiny_model(num_labels=3, pooling="mean")
    batch = random_batch(batch_size=16, max_len=12, seed=5)
    batch = {k: v.flip(dims=[1]) for k, v in batch.items()}
    seen = set()
    for patience in (1, 2):
        with torch.no_grad():
            out = model(**batch, patience=patience)
        logits, exits = [], []
        for row in range(16):
            single = {k: v[row : row + 1] for k, v in batch.items()}
            with torch.no_grad():
                o = model(**single, patience=patience)
            logits.append(o.logits[0])
            exits.append(int(o.exit_layers[0]))
        assert out.exit_layers.tolist() == exits
        torch.testing.assert_close(out.logits, torch.stack(logits), rtol=1e-4, atol=1e-5)
        seen.update(exits)
    assert len(seen) > 1


def test_mean_pooling_is_the_mean_and_follows_a_mask_refilled_in_place():
    """Mean pooling keeps one pass's token weights with its mask; a new pass (here the same mask tensors, refilled
    with other rows, as a server reusing its buffers would) must not read the old weights."""
    model = tiny_model("bert", pooling="mean")
    first, second = random_batch(6, seed=1), random_batch(6, seed=2)
    assert not torch.equal(first["attention_mask"], second["attention_mask"])
    hidden = torch.randn(6, first["input_ids"].shape[1], 32)
    mask = second["attention_mask"].unsqueeze(-1).float()
    torch.testing.assert_close(model.pool(hidden, second["attention_mask"]), (hidden * mask).sum(1) / mask.sum(1))
    with torch.inference_mode():
        expected = infer(model, second, ExitSpec(patience=0), all_layers=True).all_logits
        buffers = {name: tensor.clone() for name, tensor in first.items()}
        infer(model, buffers, ExitSpec(patience=0), all_layers=True)
        for name, tensor in buffers.items():
            tensor.copy_(second[name])
        refilled = infer(model, buffers, ExitSpec(patience=0), all_layers=True).all_logits
    torch.testing.assert_close(refilled, expected)
