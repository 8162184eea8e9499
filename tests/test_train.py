"""The one-pass patience sweep must equal real early-exit inference, on real dev data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from pabee.arguments import RunGlueArguments, parse_criteria, parse_patiences, parse_thresholds
from pabee.data import load_glue, tokenize
from pabee.errors import PabeeError
from pabee.evaluate import sweep_results
from pabee.glue import get_task
from pabee.metrics import compute_metrics
from pabee.rules import confidence, entropy
from pabee.settings import ExitSpec, ExitSweep


def test_parse_patiences():
    assert parse_patiences("3,4,5,6,7,8") == [3, 4, 5, 6, 7, 8]
    assert parse_patiences(" 2, 0 ,2") == [2, 0]
    for bad in ("3,x", "-1", "1.5", "", "3,,4"):
        with pytest.raises(PabeeError, match="--patience .* is invalid"):
            parse_patiences(bad)


def test_run_glue_always_evaluates_the_full_model_first():
    assert RunGlueArguments(task_name="MRPC", patience="3,4,5,6,7,8").patiences == [0, 3, 4, 5, 6, 7, 8]
    assert RunGlueArguments(task_name="MRPC", patience=" 2, 0 ,2").patiences == [0, 2]


def test_parse_exit_settings():
    criteria = parse_criteria("patience, confidence,static,confidence")
    assert criteria == ["patience", "confidence", "static"]
    thresholds = parse_thresholds(["confidence=0.8,0.95", "static=2"], criteria)
    assert thresholds == {"confidence": [0.8, 0.95], "static": [2.0]}
    assert parse_thresholds("0.7", ["patience", "entropy"]) == {"entropy": [0.7]}
    sweep = ExitSweep(("patience+confidence", "static", "entropy"), (0, 1, 3), {}, cap=2)
    settings = sweep.specs(num_layers=4)
    assert [s.label for s in settings["patience+confidence"]] == ["p1, 0.9", "p3, 0.9"]
    assert [s.label for s in settings["static"]] == ["k=1", "k=2", "k=3", "k=4"]
    assert settings["entropy"][0].keywords() == {
        "patience": None,
        "exit_criterion": "entropy",
        "exit_threshold": 0.01,
        "max_exit_layer": 2,
    }
    for bad, message in (("x=1", "'x' is not a selected criterion"), ("static=a", "'a' is not a number")):
        with pytest.raises(PabeeError, match=message):
            parse_thresholds([bad], ["static"])


@pytest.mark.slow
def test_sweep_equals_real_early_exit_on_sst2_dev(trained_minilm, minilm_tokenizer, glue_dir, tmp_path):
    task = get_task("SST-2")
    dev = load_glue(task, glue_dir, train=False, evaluate=True, test=False).eval["dev"]
    dev = tokenize(dev.select(range(256)), minilm_tokenizer, 128, split="dev")  # 256 of 872: enough to vary exits
    assert len(dev) == 256
    collator = DataCollatorWithPadding(minilm_tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=64, report_to="none", dataloader_pin_memory=False
    )
    trainer = Trainer(model=trained_minilm, args=args, data_collator=collator)
    output = trainer.predict(dev)
    all_logits = output.predictions  # the config's keys_to_ignore_at_inference leave every layer's logits alone
    assert all_logits.shape == (256, 6, 2)
    patiences = [0, 1, 2, 3, 4, 5]
    criteria = ["patience", "entropy", "confidence", "patience+confidence", "static"]
    # This lightly trained model is unsure, so the thresholds sit at quantiles of its own scores.
    flat = torch.as_tensor(all_logits).flatten(0, 1)
    ent, conf = entropy(flat, "single_label_classification"), confidence(flat, "single_label_classification")
    thresholds = {
        "entropy": [float(ent.quantile(0.2)), float(ent.quantile(0.5))],
        "confidence": [float(conf.quantile(0.5)), float(conf.quantile(0.8))],
        "patience+confidence": [float(conf.quantile(0.4))],
        "static": [3],
    }
    settings = ExitSweep(tuple(criteria), (0, 1, 2), thresholds).specs(num_layers=6)
    patience_specs = [ExitSpec("patience", patience=p) for p in patiences]
    summary = sweep_results(trained_minilm, all_logits, output.label_ids, task, patience_specs, settings)

    features = dev.remove_columns(
        [c for c in dev.column_names if c not in ("input_ids", "attention_mask", "token_type_ids")]
    )

    def assert_real_inference_matches(row, **options):
        logits, exits = [], []
        with torch.no_grad():
            for start in range(0, len(features), 64):
                batch = collator([features[i] for i in range(start, min(start + 64, len(features)))])
                out = trained_minilm(**batch, **options)
                logits.append(out.logits)
                exits.append(out.exit_layers)
        logits, exits = torch.cat(logits).numpy(), torch.cat(exits).numpy()
        real = compute_metrics(task.metrics, logits.argmax(-1), output.label_ids)
        assert row["accuracy"] == real["accuracy"], options
        assert row["avg_exit_layer"] == pytest.approx(exits.mean(), abs=1e-12)
        assert row["exit_histogram"] == np.bincount(exits, minlength=7)[1:].tolist()

    for patience, row in zip(patiences, summary["patiences"], strict=True):
        assert_real_inference_matches(row, patience=patience)
    # every other criterion: the sweep's rows equal real early-exit inference with the same settings
    assert set(summary["criteria"]) == set(criteria) - {"patience"}
    for name, rows in summary["criteria"].items():
        for setting, row in zip(settings[name], rows, strict=True):
            assert row["setting"] == setting.label
            assert_real_inference_matches(row, exit_spec=setting)
        assert len({r["avg_exit_layer"] for r in rows}) == len(rows) or name == "static", f"{name}: vary thresholds"
    spread = [row["avg_exit_layer"] for row in summary["patiences"]]
    assert spread[1] < spread[2] < spread[3] < spread[4] < 6.0, "exits must vary with patience for this to mean much"
    assert spread[0] == spread[5] == 6.0  # patience 0, and patience 5 on 6 layers, are the full model
    assert len(summary["per_layer"]) == 6


def test_run_glue_refuses_to_resume_across_changed_data_or_flags(tmp_path, minilm_tokenizer, capsys):
    """End to end: a tiny run with checkpoints, then the same command with the data file edited in place, another
    learning rate, and --resume_from_checkpoint at a half-saved checkpoint."""
    from helpers import tiny_run_glue_argv

    from pabee.checkpoints import CHECKPOINT_MARKER
    from pabee.cli import main

    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=8)
    argv += ["--save_strategy", "steps", "--save_steps", "1"]
    assert main(argv) == 0 and (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    train = tmp_path / "train.jsonl"
    original = train.read_text()
    train.write_text(original.replace('"label": 0', '"label": 9').replace('"label": 1', '"label": 0')
                     .replace('"label": 9', '"label": 1'))  # fmt: skip
    assert main(argv) == 2 and "another run (it differs in: data)" in capsys.readouterr().err
    train.write_text(original)
    assert main([*argv, "--learning_rate", "1e-3"]) == 2 and "learning_rate" in capsys.readouterr().err
    (out / "checkpoint-1" / CHECKPOINT_MARKER).unlink()
    resume = ["--resume_from_checkpoint", str(out / "checkpoint-1"), "--output_dir", str(tmp_path / "other")]
    assert main([*argv, *resume]) == 2 and "is not a complete checkpoint" in capsys.readouterr().err
