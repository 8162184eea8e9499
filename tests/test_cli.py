"""`pabee run-glue` end to end on real GLUE files, its seed-compatible flags, resume, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pabee.cli import _RENAMED_FLAGS, main, translate_seed_flags


def run(args: list[str]) -> int:
    try:
        return main(["run-glue", *map(str, args)])
    except SystemExit as stop:  # argparse's own errors
        return stop.code


def test_seed_flags_are_translated():
    argv = [
        "--per_gpu_train_batch_size",
        "32",
        "--per_gpu_eval_batch_size=1",
        "--evaluate_during_training",
        "--seed",
        "1",
    ]
    assert translate_seed_flags(argv) == [
        "--per_device_train_batch_size",
        "32",
        "--per_device_eval_batch_size=1",
        "--eval_strategy",
        "steps",
        "--seed",
        "1",
    ]
    assert translate_seed_flags(["--evaluate_during_training", "false", "--do_eval"]) == ["--do_eval"]


def _sst2_folder(tmp_path, rows):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\n" for r in rows), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown_task", "Unknown GLUE task 'glue9'. Valid tasks: CoLA, SST-2"),
        ("missing_file", "Missing data file"),
        ("malformed_row", r"dev.tsv, line 3: expected 2 tab-separated columns, found 3"),
        ("bad_label", r"dev.tsv, line 2: label 'positive' is not a SST-2 label"),
        ("bad_score", "STS-B score 'five' is not a number"),
        ("bad_patience", "--patience '3,x' is invalid"),
        ("negative_patience", "--patience '-2' is invalid"),
        ("bad_threshold", "regression_threshold=-1.0 is invalid"),
        ("taken_output", "exists and is not empty. Pass --overwrite_output_dir"),
        ("nothing_to_do", "Nothing to do: pass --do_train and/or --do_eval"),
        ("no_output_dir", "the following arguments are required: --output_dir"),
        ("unknown_criterion", "--exit_criterion 'patience,fastest': 'fastest' is unknown; choose from patience"),
        ("regression_entropy", "'entropy' rule needs class probabilities and does not apply to regression"),
        ("threshold_not_number", "--exit_threshold 'confidence=0.9,x': 'x' is not a number"),
        ("threshold_out_of_range", "threshold 1.5 is invalid for 'confidence': use a probability in (0, 1]"),
        ("threshold_ambiguous", "--exit_threshold '0.5' does not say which criterion it is for"),
        ("threshold_unselected", "--exit_threshold 'static=2': 'static' is not a selected criterion"),
        ("static_too_deep", "static exit at layer 9 is impossible: the model has 6 layers"),
        ("bad_cap", "max_exit_layer=0 is invalid"),
    ],
)
def test_bad_input_gives_message_and_exit_code_2(case, message, tmp_path, glue_dir, capsys):
    out = tmp_path / "out"
    args = ["--task_name", "SST-2", "--data_dir", glue_dir, "--do_eval", "--output_dir", out]
    if case == "unknown_task":
        args[1] = "glue9"
    elif case == "missing_file":
        (tmp_path / "empty").mkdir()
        args[3] = tmp_path / "empty"
    elif case == "malformed_row":
        args[3] = _sst2_folder(tmp_path, ["fine film\t1", "a stray\ttab\t0"])
    elif case == "bad_label":
        args[3] = _sst2_folder(tmp_path, ["fine film\tpositive"])
    elif case == "bad_score":
        folder = tmp_path / "STS-B"
        folder.mkdir()
        header = "index genre filename year old_index source1 source2 sentence1 sentence2 score"
        (folder / "dev.tsv").write_text(header.replace(" ", "\t") + "\n0\tg\tf\t2012\t1\ts\ts\tA.\tB.\tfive\n")
        args[1], args[3] = "STS-B", folder
    elif case == "bad_patience":
        args += ["--patience", "3,x"]
    elif case == "negative_patience":
        args += ["--patience=-2"]
    elif case == "bad_threshold":
        args += ["--regression_threshold", "-1"]
    elif case == "taken_output":
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
        args[4] = "--do_train"
    elif case == "nothing_to_do":
        args.remove("--do_eval")
    elif case == "no_output_dir":
        args = args[:5]
    elif case == "unknown_criterion":
        args += ["--exit_criterion", "patience,fastest"]
    elif case == "regression_entropy":
        args[1], args[3] = "STS-B", glue_dir / "STS-B"
        args += ["--exit_criterion", "patience,entropy"]
    elif case == "threshold_not_number":
        args += ["--exit_criterion", "confidence", "--exit_threshold", "confidence=0.9,x"]
    elif case == "threshold_out_of_range":
        args += ["--exit_criterion", "confidence", "--exit_threshold", "1.5"]
    elif case == "threshold_ambiguous":
        args += ["--exit_criterion", "entropy,confidence", "--exit_threshold", "0.5"]
    elif case == "threshold_unselected":
        args += ["--exit_criterion", "confidence", "--exit_threshold", "static=2"]
    elif case == "static_too_deep":
        args += ["--exit_criterion", "static", "--exit_threshold", "static=2,9"]
    elif case == "bad_cap":
        args += ["--max_exit_layer", "0"]
    assert run(args) == 2
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err or __import__("re").search(message, err), err
    assert "Traceback" not in err
    if case == "taken_output":
        assert (out / "notes.txt").read_text() == "keep me"


def test_run_glue_compares_exit_criteria_on_one_model(glue_dir, tmp_path, capsys):
    out = tmp_path / "criteria"
    code = run(
        [
            *"--task_name MRPC --do_eval --max_eval_samples 48 --patience 1,2".split(),
            *"--exit_criterion patience,entropy,confidence,patience+confidence,static".split(),
            *"--exit_threshold static=2,4 confidence=0.55,0.6 --max_exit_layer 5".split(),
            *["--data_dir", glue_dir, "--output_dir", out],
        ]
    )
    assert code == 0
    report = json.loads((out / "eval_results.json").read_text())
    assert report["criteria"] == ["patience", "entropy", "confidence", "patience+confidence", "static"]
    result = report["evaluations"][-1]["splits"]["dev"]
    criteria = result["criteria"]
    assert [r["setting"] for r in criteria["static"]] == ["k=2", "k=4"]
    assert [r["threshold"] for r in criteria["confidence"]] == [0.55, 0.6]
    assert len(criteria["entropy"]) == 8  # the default sweep
    assert [r["setting"] for r in criteria["patience+confidence"]] == ["p1, 0.9", "p2, 0.9"]
    assert [r["avg_exit_layer"] for r in criteria["static"]] == [2.0, 4.0]
    assert all(r["avg_exit_layer"] <= 5 for rows in criteria.values() for r in rows)  # the cap
    assert result["patiences"][0]["avg_exit_layer"] == 5.0  # the "full" row obeys the cap too
    markdown = (out / "eval_results.md").read_text()
    for heading in ("### patience (PABEE)", "### entropy", "### confidence", "### patience+confidence", "### static"):
        assert heading in markdown
    assert "| static setting | Acc | F1 | Avg. exit layer |" in markdown
    assert (out / "patience_curve.png").stat().st_size > 10_000
    assert (out / "exit_histograms.png").stat().st_size > 10_000
    assert "### confidence" in capsys.readouterr().out


@pytest.mark.slow
def test_run_glue_end_to_end_on_mrpc(glue_dir, tmp_path, capsys):
    out = tmp_path / "mrpc"
    code = run(
        [
            *"--model_type bert --task_name MRPC --do_train --do_eval --do_lower_case --max_seq_length 128".split(),
            *"--per_gpu_train_batch_size 8 --per_gpu_eval_batch_size 32 --learning_rate 5e-5 --max_steps 4".split(),
            *"--save_steps 2 --logging_steps 2 --patience 1,2,3 --eval_all_checkpoints --save_only_model".split(),
            *["--seed", "7", "--data_dir", glue_dir / "MRPC", "--output_dir", out],
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| Patience | Acc | F1 | Avg. exit layer | Speed-up | Layers saved |" in printed
    assert f"Results: {out / 'eval_results.md'}" in printed
    report = json.loads((out / "eval_results.json").read_text())
    assert report["task"] == "MRPC" and report["patiences"] == [0, 1, 2, 3]
    assert [e["model"] for e in report["evaluations"]] == ["checkpoint-2", "checkpoint-4", "final"]
    result = report["evaluations"][-1]["splits"]["dev"]
    assert result["num_examples"] == 408 and result["num_layers"] == 6
    for row in result["patiences"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
        assert 1.0 <= row["avg_exit_layer"] <= 6.0
        assert row["speed_up"] == pytest.approx(6 / row["avg_exit_layer"])
        assert sum(row["exit_histogram"]) == 408
    rows = {r["patience"]: r for r in result["patiences"]}
    assert rows[0]["avg_exit_layer"] == 6.0 and rows[1]["avg_exit_layer"] <= rows[2]["avg_exit_layer"]
    assert rows[1]["avg_exit_layer"] >= 2.0  # patience 1 exits at layer 2 at the earliest
    assert [r["layer"] for r in result["per_layer"]] == [1, 2, 3, 4, 5, 6]
    prov = report["provenance"]
    assert "run-glue" in prov["command"] and prov["data"]["dev"].endswith("MRPC/dev.tsv")
    assert {"torch", "transformers", "pabee"} <= set(prov["versions"]) and prov["hardware"]["cpu_count"]
    assert report["training"]["global_step"] == 4
    markdown = (out / "eval_results.md").read_text()
    assert "# PABEE on MRPC" in markdown and "| 0 (full) |" in markdown and "## checkpoint-2 — dev" in markdown
    assert (out / "patience_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    # The fine-tuned folder evaluates again through the console script, as a user would run it.
    again = tmp_path / "again"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pabee",
            "run-glue",
            "--task_name",
            "mrpc",
            "--data_dir",
            str(glue_dir),
            "--model_name_or_path",
            str(out),
            "--do_eval",
            "--output_dir",
            str(again),
            "--patience",
            "2",
            "--max_eval_samples",
            "64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 2 |" in proc.stdout
    assert (
        json.loads((again / "eval_results.json").read_text())["evaluations"][0]["splits"]["dev"]["num_examples"] == 64
    )


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(glue_dir, tmp_path, capsys):
    out = tmp_path / "rte"
    base = [
        *"--task_name RTE --do_train --per_device_train_batch_size 4 --max_train_samples 32".split(),
        *"--save_steps 2 --max_seq_length 64".split(),
        *["--data_dir", glue_dir, "--output_dir", out],
    ]
    assert run([*base, "--max_steps", "2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert run([*base, "--max_steps", "4"]) == 0
    assert f"Resuming training from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    # Another task's run never continues these checkpoints silently.
    other = [*base, "--max_steps", "6"]
    other[other.index("RTE")] = "WNLI"
    assert run(other) == 2
    assert "holds checkpoints of another run" in capsys.readouterr().err
    # --overwrite_output_dir starts afresh: old checkpoints go, the user's other files stay.
    (out / "notes.txt").write_text("mine")
    assert run([*other[:-2], "--max_steps", "2", "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((out / "pabee_run.json").read_text())["task"] == "WNLI"
    assert (out / "notes.txt").read_text() == "mine"


def _mnli_folder(root):
    """A tiny MNLI in the original layout: train.tsv (12 columns), dev_matched/mismatched (16 columns)."""
    head = "index promptID pairID genre s1_bin s2_bin s1_parse s2_parse sentence1 sentence2".split()
    labels = ["entailment", "neutral", "contradiction"]
    folder = root / "MNLI"
    folder.mkdir()

    def rows(n, n_labels):
        return [
            [str(i), "1", f"{i}e", "fiction", "(a)", "(b)", "(a)", "(b)", f"A man walks {i}.", f"A person moves {i}."]
            + [labels[i % 3]] * n_labels
            for i in range(n)
        ]

    files = {"train.tsv": (head + ["label1", "gold_label"], rows(24, 2))}
    dev_head = head + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    files["dev_matched.tsv"] = (dev_head, rows(9, 6))
    files["dev_mismatched.tsv"] = (dev_head, rows(6, 6))
    for name, (header, body) in files.items():
        (folder / name).write_text("\n".join("\t".join(r) for r in [header, *body]) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_mnli_evaluates_matched_and_mismatched_and_during_training(tmp_path, capsys):
    data = _mnli_folder(tmp_path)
    out = tmp_path / "mnli"
    code = run(
        [
            *"--task_name MNLI --do_train --do_eval --max_steps 2 --per_device_train_batch_size 8".split(),
            *"--evaluate_during_training --logging_steps 1 --save_steps 1 --save_only_model --patience 1,2".split(),
            "--eval_all_checkpoints",  # beside --eval_strategy steps, which Trainer checks for an eval set
            *["--data_dir", data, "--output_dir", out],
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MNLI dev_matched (9 examples" in printed and "MNLI dev_mismatched (6 examples" in printed
    report = json.loads((out / "eval_results.json").read_text())
    assert [e["model"] for e in report["evaluations"]] == ["checkpoint-1", "checkpoint-2", "final"]
    splits = report["evaluations"][-1]["splits"]
    assert splits["dev_matched"]["num_examples"] == 9 and splits["dev_mismatched"]["num_examples"] == 6
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    during = [h for h in history if "eval_dev_matched_full_accuracy" in h]
    assert len(during) == 2, "evaluated at each logging step"
    logged = {key for entry in history for key in entry}
    assert {"eval_dev_mismatched_p1_accuracy", "eval_dev_matched_p2_speed_up"} <= logged


@pytest.mark.slow
def test_own_data_files_regression(tmp_path, capsys):
    rows = [
        {"text": f"sentence number {i}", "text_pair": f"another one {i % 5}", "label": i % 5 + 0.5} for i in range(40)
    ]
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows[32:])):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in part) + "\n", encoding="utf-8")
    out = tmp_path / "own"
    code = run(
        [
            *"--do_train --do_eval --max_steps 2 --save_strategy no --patience 1 --regression_threshold 0.05".split(),
            *["--train_file", tmp_path / "train.jsonl", "--validation_file", tmp_path / "dev.jsonl"],
            *["--output_dir", out],
        ]
    )
    assert code == 0
    report = json.loads((out / "eval_results.json").read_text())
    assert report["metrics"] == ["pearson", "spearman"] and report["task"] == "train"
    row = report["evaluations"][-1]["splits"]["dev"]["patiences"][1]
    assert row["patience"] == 1 and -1.0 <= row["spearman"] <= 1.0
    assert "| Patience | Pearson | Spearman |" in capsys.readouterr().out


# --- every command's --help and a bad value of every typed flag ------------------------------------------------

# What each command needs before a flag's value is even looked at (the value checks run after parsing).
_REQUIRED = {
    "run-glue": ["--task_name", "MRPC", "--output_dir", "unused"],
    "predict": ["--model", "unused", "--input", "unused"],
    "serve": ["--model", "unused"],
    "calibrate": ["--model", "unused", "--task_name", "MRPC"],
    "export": ["--model", "unused", "--output", "unused"],
    "bench": [],
    "add-exits": ["--model", "unused", "--output_dir", "unused", "--task_name", "MRPC"],
}


def _bad_values(command: str) -> list[tuple[str, str]]:
    """(flag, value) pairs, one per typed flag of `command`, each a value its type or choices cannot take."""
    from transformers.hf_argparser import string_to_bool

    from pabee.cli import command_parser

    cases = []
    for action in command_parser(command)._actions:
        flag = next((option for option in action.option_strings if option.startswith("--")), None)
        if flag is None or action.nargs == 0 or flag in ("--help",):
            continue
        if action.choices:
            cases.append((flag, "no-such-choice"))
        elif action.type is string_to_bool:
            cases.append((flag, "maybe"))
        elif action.type in (int, float):
            cases.append((flag, "many"))
    return cases


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, (argv, err)
    return lines[0]


@pytest.mark.parametrize("command", [None, *sorted(_REQUIRED)])
def test_every_command_renders_its_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pabee") and "Traceback" not in out
    if command is not None:  # every flag is listed, each help string formatted (a bare % used to crash argparse)
        assert all(flag in out for flag, _ in _bad_values(command))


@pytest.mark.parametrize("command", sorted(_REQUIRED))
def test_a_bad_value_of_every_typed_flag_is_one_line(command, capsys):
    cases = _bad_values(command)
    assert len(cases) >= 3  # the parser really was read
    for flag, value in cases:
        line = _one_line_error(capsys, [command, *_REQUIRED[command], flag, value])
        named = _RENAMED_FLAGS.get(flag, flag)  # the research script's spellings are read as their new names
        assert line.startswith(f"pabee {command}: error:") and named in line, line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--patience", "-1"], "--patience '-1' is invalid"),
        (["bench", "--threads", "0"], "--threads=0 is invalid"),
        (["predict", "--model", "m", "--input", "i", "--patience", "-3"], "patience=-3 is invalid"),
        (["predict", "--model", "m", "--input", "i", "--batch_size", "0"], "--batch_size=0 is invalid"),
        (["serve", "--model", "m", "--max_queue", "0"], "--max_queue=0 is invalid"),
        (["serve", "--model", "m", "--request_timeout", "0"], "--request_timeout=0.0 is invalid"),
        (["calibrate", "--model", "m", "--task_name", "MRPC", "--max_drop", "-1"], "--max_drop=-1.0 is invalid"),
        (["calibrate", "--model", "m", "--task_name", "MRPC", "--confidence_level", "1"], "--confidence_level=1.0"),
        (["export", "--model", "m", "--output", "o", "--opset", "9"], "--opset=9 is invalid"),
        (["run-glue", "--task_name", "MRPC", "--output_dir", "o", "--max_seq_length", "2"], "--max_seq_length 2"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
        (["add-exits", "--model", "m", "--output_dir", "o"], "Give one of --task_name"),
        (
            ["add-exits", "--model", "m", "--output_dir", "o", "--input_file", "f", "--task_name", "MRPC"],
            "Give one of",
        ),
        (["add-exits", "--model", "m", "--output_dir", "o", "--task_name", "MRPC", "--label_weight", "-1"], "-1.0 is"),
        (["add-exits", "--model", "m", "--output_dir", "o", "--task_name", "MRPC", "--learning_rate", "0"], "> 0"),
        (
            ["add-exits", "--model", "m", "--output_dir", "o", "--input_file", "f", "--max_disagreement", "2"],
            "give --calibration_file",
        ),
        (
            ["add-exits", "--model", "m", "--output_dir", "o", "--task_name", "MRPC", "--max_disagreement", "100"],
            "--max_disagreement=100.0 is invalid",
        ),
    ],
)
def test_a_value_no_command_could_use_is_one_line(argv, message, capsys):
    assert message in _one_line_error(capsys, argv)
