"""Adapter stepping must reproduce each encoder's own forward, layer by layer, with padding in the batch."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    BACKBONE_TYPES,
    POOLER_TYPES,
    assert_batched_equals_one_by_one,
    random_batch,
    tiny_encoder_config,
    tiny_model,
)
from transformers import AutoModel, AutoModelForSequenceClassification

from pabee import PabeeConfig, PabeeForSequenceClassification, adapter_for
from pabee.backbones import ADAPTERS


def _step_through(encoder, batch) -> list[torch.Tensor]:
    adapter = adapter_for(encoder.config.model_type)
    mask_2d = batch["attention_mask"]
    hidden = adapter.embed(encoder, batch["input_ids"], batch.get("token_type_ids"), None, None, mask_2d)
    mask = adapter.layer_mask(encoder, hidden, batch["attention_mask"])
    states = []
    for layer in range(encoder.config.num_hidden_layers):
        hidden = adapter.run_layer(encoder, layer, hidden, mask)
        states.append(hidden)
    return states


def _assert_matches_backbone(encoder, batch) -> None:
    with torch.no_grad():
        reference = encoder(**batch, output_hidden_states=True)
        states = _step_through(encoder, batch)
    assert len(states) == encoder.config.num_hidden_layers
    for layer, state in enumerate(states):
        torch.testing.assert_close(state, reference.hidden_states[layer + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states[-1], reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    adapter = adapter_for(encoder.config.model_type)
    if adapter.has_pooler(encoder):
        torch.testing.assert_close(adapter.pool(encoder, states[-1]), reference.pooler_output, rtol=1e-5, atol=1e-5)


def _batch_for(model_type: str, **kwargs) -> dict[str, torch.Tensor]:
    batch = random_batch(**kwargs)
    if model_type == "distilbert":  # no token types (its tokenizer does not make them)
        del batch["token_type_ids"]
    return batch


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_tiny_adapter_matches_backbone_forward(model_type):
    torch.manual_seed(0)
    encoder = AutoModel.from_config(tiny_encoder_config(model_type)).eval()
    batch = _batch_for(model_type, batch_size=6, max_len=10)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel(), "the batch must contain padding"
    assert adapter_for(encoder.config.model_type).has_pooler(encoder) == (model_type in POOLER_TYPES)
    _assert_matches_backbone(encoder, batch)


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
@pytest.mark.parametrize("pooling", ["pooler", "cls", "mean"])
def test_every_backbone_batched_equals_one_by_one(model_type, pooling):
    if pooling == "pooler" and model_type not in POOLER_TYPES:
        with pytest.raises(ValueError, match="pooling='pooler' needs a pooler"):
            tiny_model(model_type, pooling=pooling)
        return
    model = tiny_model(model_type, num_labels=3, pooling=pooling)
    batch = _batch_for(model_type, batch_size=16, max_len=12)
    seen = set()
    for patience in (1, 2):
        out = assert_batched_equals_one_by_one(model, batch, patience)
        seen.update(out.exit_layers.tolist())
    assert len(seen) > 1, "exit layers should vary for this test to mean something"


@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_every_backbone_saves_and_loads(model_type, tmp_path):
    model = tiny_model(model_type, num_labels=3, pooling="mean", patience=2)
    batch = _batch_for(model_type, batch_size=4, max_len=8)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, PabeeForSequenceClassification)
    assert isinstance(loaded.config, PabeeConfig)
    assert loaded.config.encoder_config.model_type == model_type
    with torch.no_grad():
        expected, got = model(**batch), loaded(**batch)
    torch.testing.assert_close(got.logits, expected.logits)
    assert got.exit_layers.tolist() == expected.exit_layers.tolist()


def test_albert_adapter_uses_shared_groups():
    encoder = AutoModel.from_config(tiny_encoder_config("albert"))
    assert encoder.config.num_hidden_groups == 2 and encoder.config.num_hidden_layers == 4
    assert len(encoder.encoder.albert_layer_groups) == 2


def test_minilm_adapter_matches_backbone_forward(minilm_path, minilm_tokenizer, sst2_dev_sentences):
    encoder = AutoModel.from_pretrained(minilm_path).eval()
    batch = minilm_tokenizer(sst2_dev_sentences[:8], padding=True, return_tensors="pt")
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel(), "the batch must contain padding"
    _assert_matches_backbone(encoder, batch)


def test_unknown_backbone_type_is_a_clear_error():
    with pytest.raises(ValueError, match=r"No PABEE adapter for backbone type 'gpt2'.*albert, bert"):
        adapter_for("gpt2")
    assert set(BACKBONE_TYPES) <= set(ADAPTERS)
