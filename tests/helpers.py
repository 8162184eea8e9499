"""What several test modules share: tiny random encoders and text models, batches, reference loops.

Fixtures live in `conftest.py`; plain helpers live here, so no test module imports another.
"""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from transformers import (
    AlbertConfig,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    MPNetConfig,
    PreTrainedConfig,
    RobertaConfig,
)

from pabee import PabeeConfig, PabeeForSequenceClassification
from pabee.rules import ExitCriterion

BACKBONE_TYPES = ("bert", "albert", "roberta", "distilbert", "electra", "deberta-v2", "mpnet")
POOLER_TYPES = ("bert", "albert", "roberta", "mpnet")  # the others have no pooler of their own


def tiny_encoder_config(model_type: str) -> PreTrainedConfig:
    """A random encoder small enough to run in milliseconds, exercising each architecture's particulars:
    ALBERT's 2 shared layer groups, ELECTRA's embedding projection, DeBERTa's relative positions and conv, MPNet's
    relative position bias."""
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
    if model_type == "mpnet":
        return MPNetConfig(pad_token_id=1, **common)  # 32 buckets: MPNetEncoder assumes that many
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


def read_tsv_column(path: Path, column: str, limit: int | None = None) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        values = [row[column] for row in rows]
    return values[:limit]


# --- tiny text models: the MiniLM vocabulary, milliseconds per batch ---------------------------------------------

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


# --- reference loops ------------------------------------------------------------------------------------------


def one_by_one(model, batch, patience=None, **exit_options):
    """Run every example alone, without its padding: the only mode the original research code had."""
    logits, exits = [], []
    with torch.no_grad():
        for row in range(batch["input_ids"].shape[0]):
            length = int(batch["attention_mask"][row].sum())
            single = {k: v[row : row + 1, :length] for k, v in batch.items()}
            out = model(**single, patience=patience, **exit_options)
            logits.append(out.logits[0])
            exits.append(int(out.exit_layers[0]))
    return torch.stack(logits), exits


def assert_batched_equals_one_by_one(model, batch, patience=None, atol=1e-5, **exit_options):
    with torch.no_grad():
        out = model(**batch, patience=patience, **exit_options)
    single_logits, single_exits = one_by_one(model, batch, patience, **exit_options)
    assert out.exit_layers.dtype == torch.long
    assert out.exit_layers.tolist() == single_exits
    if model.config.is_regression:
        torch.testing.assert_close(out.logits, single_logits, rtol=1e-4, atol=atol)
    else:
        assert out.logits.argmax(-1).tolist() == single_logits.argmax(-1).tolist()
        torch.testing.assert_close(out.logits, single_logits, rtol=1e-4, atol=atol)
    return out


def exit_layers_with_compaction(criterion: ExitCriterion, all_logits: torch.Tensor) -> list[int]:
    """Apply `criterion` as the engine does: rows that exit are dropped and the tracker told (`keep`)."""
    batch_size, num_layers, _ = all_logits.shape
    if not criterion.can_exit_early(num_layers):
        return [criterion.exit_limit(num_layers)] * batch_size
    tracker = criterion.tracker(batch_size)
    rows, got = np.arange(batch_size), [criterion.exit_limit(num_layers)] * batch_size
    for layer in range(criterion.exit_limit(num_layers) - 1):
        leaving = tracker.update(all_logits[torch.from_numpy(rows), layer])
        for r in rows[leaving].tolist():
            got[r] = layer + 1
        tracker.keep(~leaving)
        rows = rows[~leaving]
    return got


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text → {(sample name, sorted labels): value}; raises if the text does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def tiny_run_glue_argv(tmp_path: Path, tokenizer, num_rows: int) -> tuple[list[str], Path]:
    """A `pabee run-glue` command line that fine-tunes a tiny random BERT encoder (no PABEE heads) for 2 steps
    on `num_rows` two-class jsonl rows, in seconds; returns it and its output folder."""
    import json

    from transformers import BertModel

    encoder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=20)  # fmt: skip
    BertModel(config).save_pretrained(encoder)
    tokenizer.save_pretrained(encoder)
    rows = [{"text": f"word{i % 7} word{i % 3}", "label": i % 2} for i in range(num_rows)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    argv = ["run-glue", "--model_name_or_path", str(encoder), "--train_file", str(tmp_path / "train.jsonl")]
    argv += ["--do_train", "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(out), "--use_cpu"]
    return [*argv, "--report_to", "none"], out


def assert_run_glue_refuses(flags: list[str], message: str, output_dir: Path, err_of) -> None:
    """`pabee run-glue --do_train` with bad training `flags` exits with status 2 and a one-line `message` on
    stderr (`err_of()` reads it), no traceback, and creates no `output_dir`."""
    from pabee.cli import main

    argv = ["run-glue", "--task_name", "MRPC", "--do_train", "--output_dir", str(output_dir), *flags]
    assert main(argv) == 2
    err = err_of()
    assert message in err and "Traceback" not in err and not output_dir.exists()


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_script(name: str) -> ModuleType:
    """`benchmarks/<name>.py` imported as the scripts run (they import their siblings, `common`, from their folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))
