"""The one-pass patience sweep must equal real early-exit inference, on real dev data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from pabee.data import load_glue, tokenize
from pabee.errors import PabeeError
from pabee.glue import get_task
from pabee.metrics import compute_metrics
from pabee.train import parse_patience_list, sweep_results


def test_parse_patience_list():
    assert parse_patience_list("3,4,5,6,7,8") == [0, 3, 4, 5, 6, 7, 8]
    assert parse_patience_list(" 2, 0 ,2") == [0, 2]
    for bad in ("3,x", "-1", "1.5", "", "3,,4"):
        with pytest.raises(PabeeError, match="--patience .* is invalid"):
            parse_patience_list(bad)


@pytest.mark.slow
def test_sweep_equals_real_early_exit_on_sst2_dev(trained_minilm, minilm_tokenizer, glue_dir, tmp_path):
    task = get_task("SST-2")
    dev = load_glue(task, glue_dir, train=False, evaluate=True, test=False).eval["dev"]
    dev = tokenize(dev, minilm_tokenizer, 128, split="dev")
    assert len(dev) == 872
    collator = DataCollatorWithPadding(minilm_tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=64, report_to="none", dataloader_pin_memory=False
    )
    trainer = Trainer(model=trained_minilm, args=args, data_collator=collator)
    output = trainer.predict(dev)
    _, all_logits, _ = output.predictions
    patiences = [0, 1, 2, 3, 4, 5]
    summary = sweep_results(trained_minilm, all_logits, output.label_ids, task, patiences)

    features = dev.remove_columns(
        [c for c in dev.column_names if c not in ("input_ids", "attention_mask", "token_type_ids")]
    )
    for patience, row in zip(patiences, summary["patiences"], strict=True):
        logits, exits = [], []
        with torch.no_grad():
            for start in range(0, len(features), 64):
                batch = collator([features[i] for i in range(start, min(start + 64, len(features)))])
                out = trained_minilm(**batch, patience=patience)
                logits.append(out.logits)
                exits.append(out.exit_layers)
        logits, exits = torch.cat(logits).numpy(), torch.cat(exits).numpy()
        real = compute_metrics(task.metrics, logits.argmax(-1), output.label_ids)
        assert row["accuracy"] == real["accuracy"], f"patience {patience}"
        assert row["avg_exit_layer"] == pytest.approx(exits.mean(), abs=1e-12)
        assert row["exit_histogram"] == np.bincount(exits, minlength=7)[1:].tolist()
    spread = [row["avg_exit_layer"] for row in summary["patiences"]]
    assert spread[1] < spread[2] < spread[3] < spread[4] < 6.0, "exits must vary with patience for this to mean much"
    assert spread[0] == spread[5] == 6.0  # patience 0, and patience 5 on 6 layers, are the full model
    assert len(summary["per_layer"]) == 6
