"""Adapter stepping must reproduce each encoder's own forward, layer by layer, with padding in the batch."""

from __future__ import annotations

import pytest
import torch
from conftest import random_batch, tiny_encoder_config
from transformers import AutoModel

from pabee import adapter_for
from pabee.backbones import ADAPTERS


def _step_through(encoder, batch) -> list[torch.Tensor]:
    adapter = adapter_for(encoder.config.model_type)
    hidden = adapter.embed(encoder, batch["input_ids"], batch.get("token_type_ids"), None, None)
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
    torch.testing.assert_close(adapter.pool(encoder, states[-1]), reference.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "albert"])
def test_tiny_adapter_matches_backbone_forward(model_type):
    torch.manual_seed(0)
    encoder = AutoModel.from_config(tiny_encoder_config(model_type)).eval()
    batch = random_batch(batch_size=6, max_len=10)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel(), "the batch must contain padding"
    _assert_matches_backbone(encoder, batch)


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
    assert {"bert", "albert"} <= set(ADAPTERS)
