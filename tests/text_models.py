"""Tiny random text classifiers saved with the MiniLM tokenizer, for the pipeline, predict, serve and submission tests.

They take raw text (the MiniLM vocabulary) yet run in milliseconds: hidden size 32, 4 layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig

from pabee import PabeeConfig, PabeeForSequenceClassification

SENTIMENT = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def save_tiny_text_model(folder: Path, tokenizer, num_labels: int = 2, seed: int = 1, **config: object) -> Path:
    """Save a tiny random BERT PABEE model and `tokenizer` into `folder`; `config` adds `PabeeConfig` fields.

    Seed 1 gives labels and exit layers (2 and 3 at patience 1) that vary over SST-2 sentences.
    """
    torch.manual_seed(seed)
    encoder = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    model = PabeeForSequenceClassification(
        PabeeConfig(encoder_config=encoder, num_labels=num_labels, pooling="mean", **config)
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
