"""`pabee calibrate`: the choice is the fewest layers within the allowed drop on one half, it is reported on the
other half, the config changes only where it should (and not at all in a dry run), and bad flags are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_run_glue_argv

from pabee.calibrate import choose_setting, split_halves
from pabee.cli import main
from pabee.exits import ExitSpec
from pabee.folders import load_model_folder
from pabee.glue import get_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def confident(labels: np.ndarray, right: bool, classes: int = 2) -> np.ndarray:
    """Logits that say `labels` (or a wrong class) with high confidence."""
    out = np.full((len(labels), classes), -4.0, dtype=np.float32)
    out[np.arange(len(labels)), labels if right else 1 - labels] = 4.0
    return out


def test_the_halves_are_disjoint_cover_everything_and_follow_the_seed():
    halves = split_halves(11, seed=3)
    assert len(halves["choose"]) == 5 and len(halves["report"]) == 6
    assert sorted(np.concatenate(list(halves.values())).tolist()) == list(range(11))
    assert np.array_equal(split_halves(11, seed=3)["choose"], halves["choose"])
    assert not np.array_equal(split_halves(11, seed=4)["choose"], halves["choose"])


def test_the_fewest_layers_within_the_drop_on_the_choosing_half(model_dir):
    model = load_model_folder(model_dir)  # 4 layers, two classes
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    first = confident(labels, right=True)
    first[::2] = confident(labels[::2], right=False)  # layer 1: wrong on half the examples
    all_logits = np.stack([first] + [confident(labels, right=True)] * 3, axis=1)  # layers 2-4: right and sure
    specs = [ExitSpec("static", threshold=k) for k in (1, 2, 3, 4)]
    specs += [ExitSpec("patience", patience=p) for p in (1, 2)]
    result = choose_setting(model, all_logits, labels, get_task("SST-2"), specs, max_drop=1.0, seed=3)
    chosen = next(row for row in result["rows"] if row["chosen"])
    assert (chosen["criterion"], chosen["setting"]) == ("static", "k=2")
    assert chosen["report"]["score"] == pytest.approx(100.0) and result["halves"] == {"choose": 100, "report": 100}
    full = result["rows"][0]
    assert full["setting"] == "0 (full)" and full["choose"]["avg_exit_layer"] == 4.0
    eligible = [r for r in result["rows"] if r["choose"]["score"] >= full["choose"]["score"] - 1.0]
    assert chosen["choose"]["avg_exit_layer"] == min(r["choose"]["avg_exit_layer"] for r in eligible)


def test_with_no_drop_allowed_nothing_worse_than_the_full_model_is_chosen(model_dir):
    model = load_model_folder(model_dir)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 100)
    noisy = torch.randn(100, 4, 2).numpy()
    noisy[:, -1] = confident(labels, right=True)
    specs = [ExitSpec("static", threshold=k) for k in (1, 2, 3)]
    result = choose_setting(model, noisy, labels, get_task("SST-2"), specs, max_drop=0.0)
    chosen = next(row for row in result["rows"] if row["chosen"])
    assert chosen["choose"]["score"] >= result["rows"][0]["choose"]["score"]


def test_calibrate_writes_the_choice_and_a_report(model_dir, glue_dir, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    before = json.loads((folder / "config.json").read_text())
    argv = ["calibrate", "--model", str(folder), "--task_name", "SST-2", "--data_dir", str(glue_dir / "SST-2")]
    argv += ["--exit_criterion", "patience,static", "--max_drop", "2"]
    assert main([*argv, "--dry_run"]) == 0
    assert json.loads((folder / "config.json").read_text()) == before
    assert "dry run, config unchanged" in capsys.readouterr().out
    assert main(argv) == 0
    out = capsys.readouterr().out
    after = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "calibration.json").read_text())
    chosen = next(row for row in report["rows"] if row["chosen"])
    field = "exit_threshold" if chosen["criterion"] == "static" else "patience"
    assert after["exit_criterion"] == chosen["criterion"]
    assert after[field] == chosen["threshold" if field == "exit_threshold" else "patience"]
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed <= {"exit_criterion", "patience", "exit_threshold", "max_exit_layer"}
    assert report["halves"] == {"choose": 436, "report": 436} and "written to" in out
    markdown = (folder / "calibration.md").read_text()
    assert "measured on the other half (436), which the choice never saw" in markdown and "(chosen)" in markdown


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task_name", "SST-2", "--validation_file", "x.jsonl"], "Give either --task_name"),
        ([], "Give either --task_name"),
        (["--task_name", "SST-2", "--max_drop", "-1"], "--max_drop=-1.0 is invalid"),
        (["--task_name", "NOPE"], "NOPE"),
    ],
)
def test_bad_calibrate_flags_are_one_line(extra, message, model_dir, capsys):
    assert main(["calibrate", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_glue_calibrates_on_held_out_training_examples(tmp_path, minilm_tokenizer, capsys):
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=40)
    argv += ["--exit_criterion", "patience,static", "--calibrate_max_drop", "5"]
    assert main(argv) == 0
    assert "Calibrated on 4 held-out training examples" in capsys.readouterr().out
    report = json.loads((out / "calibration.json").read_text())
    assert report["halves"] == {"choose": 2, "report": 2}
    chosen = next(row for row in report["rows"] if row["chosen"])
    assert json.loads((out / "config.json").read_text())["exit_criterion"] == chosen["criterion"]
    assert main([*argv[:-2], "--calibrate_max_drop", "-1"]) == 2
    no_training = [a for a in argv if a != "--do_train"] + [
        "--do_eval",
        "--validation_file",
        str(tmp_path / "train.jsonl"),
    ]
    assert main(no_training) == 2
    assert "needs --do_train" in capsys.readouterr().err
