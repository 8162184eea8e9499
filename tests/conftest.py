"""Shared fixtures: tiny random encoders for speed, the bundled MiniLM and real GLUE files for truth."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    PreTrainedConfig,
    RobertaConfig,
)

import pabee
from pabee import PabeeConfig, PabeeForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[1]


BACKBONE_TYPES = ("bert", "albert", "roberta", "distilbert", "electra", "deberta-v2")
POOLER_TYPES = ("bert", "albert", "roberta")  # the others have no pooler of their own


def tiny_encoder_config(model_type: str) -> PreTrainedConfig:
    """A random encoder small enough to run in milliseconds, exercising each architecture's particulars:
    ALBERT's 2 shared layer groups, ELECTRA's embedding projection, DeBERTa's relative positions and conv."""
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    if model_type == "bert":
        return BertConfig(**common)
    if model_type == "albert":
        return AlbertConfig(embedding_size=16, num_hidden_groups=2, inner_group_num=1, **common)
    if model_type == "roberta":
        return RobertaConfig(pad_token_id=1, **common)
    if model_type == "electra":
        return ElectraConfig(embedding_size=16, **common)
    if model_type == "deberta-v2":
        return DebertaV2Config(
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
            conv_kernel_size=3,
            position_biased_input=False,
            **common,
        )
    if model_type == "distilbert":
        return DistilBertConfig(
            vocab_size=99, dim=32, n_layers=4, n_heads=4, hidden_dim=37, max_position_embeddings=64
        )
    raise ValueError(model_type)


def tiny_model(
    model_type: str = "bert", num_labels: int = 2, seed: int = 0, **kwargs
) -> PabeeForSequenceClassification:
    torch.manual_seed(seed)
    config = PabeeConfig(encoder_config=tiny_encoder_config(model_type), num_labels=num_labels, **kwargs)
    return PabeeForSequenceClassification(config).eval()


def random_batch(batch_size: int = 8, max_len: int = 12, vocab: int = 99, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded random token ids with different lengths per row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, max_len + 1, (batch_size,), generator=gen)
    lengths[0] = max_len
    input_ids = torch.randint(5, vocab, (batch_size, max_len), generator=gen)
    attention_mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": torch.zeros_like(input_ids)}


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): tiny models
    gain nothing from a second thread, and on a busy machine idle OpenMP threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_tokenizer) -> Path:
    """A tiny random sentiment model (negative/positive) saved with the MiniLM tokenizer, patience 1."""
    from text_models import SENTIMENT, save_tiny_text_model

    return save_tiny_text_model(tmp_path_factory.mktemp("tiny"), minilm_tokenizer, patience=1, **SENTIMENT)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The original GLUE TSV folders: `$GLUE_DIR`, else `../shared/glue` beside the repository."""
    path = Path(os.environ.get("GLUE_DIR") or REPO_ROOT.parent / "shared" / "glue")
    if not path.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"GLUE data not found at {path}; set GLUE_DIR.")
        pytest.skip(f"GLUE data not found at {path}; set GLUE_DIR.")
    return path


def read_tsv_column(path: Path, column: str, limit: int | None = None) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        values = [row[column] for row in rows]
    return values[:limit]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return pabee.bundled_model_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def sst2_dev_sentences(glue_dir) -> list[str]:
    """64 real SST-2 dev sentences of many different lengths."""
    return read_tsv_column(glue_dir / "SST-2" / "dev.tsv", "sentence", limit=64)


@pytest.fixture(scope="session")
def trained_minilm(glue_dir, minilm_path, minilm_tokenizer) -> PabeeForSequenceClassification:
    """The bundled MiniLM with PABEE heads after a few SST-2 training steps, so that exit layers vary."""
    torch.manual_seed(0)
    model = PabeeForSequenceClassification.from_backbone(minilm_path, num_labels=2)
    train = glue_dir / "SST-2" / "train.tsv"
    sentences = read_tsv_column(train, "sentence", limit=256)
    labels = [int(x) for x in read_tsv_column(train, "label", limit=256)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    for start in range(0, len(sentences), 32):
        batch = minilm_tokenizer(sentences[start : start + 32], padding=True, truncation=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels[start : start + 32])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
