"""Shared fixtures: tiny random models for speed, the bundled MiniLM and real GLUE files for truth (helpers.py
holds the plain functions)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import SENTIMENT, read_tsv_column, save_tiny_text_model

import pabee
from pabee import PabeeForSequenceClassification

REPO_ROOT = Path(__file__).resolve().parents[1]


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
