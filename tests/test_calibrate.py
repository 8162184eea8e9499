"""`pabee calibrate`: the choice is the fewest layers within the allowed drop on one half, it is reported on the
other half, the config changes only where it should (and not at all in a dry run), and bad flags are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import tiny_run_glue_argv

from pabee import ExitSpec
from pabee.calibrate import auto_guarantee, choose_setting, exit_ladder, split_halves
from pabee.certify import Guarantee
from pabee.cli import main
from pabee.folders import load_model_folder
from pabee.glue import get_task
from pabee.settings import CERTIFY_SWEEPS

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
    labels = np.random.default_rng(0).integers(0, 2, 200)
    report = split_halves(200, seed=3)["report"]
    first = confident(labels, right=True)
    first[report] = confident(labels[report], right=False)  # layer 1: right on the choosing half only
    all_logits = np.stack([first] + [confident(labels, right=True)] * 3, axis=1)  # layers 2-4: right and sure
    specs = [ExitSpec("static", threshold=k) for k in (1, 2, 3, 4)]
    specs += [ExitSpec("patience", patience=p) for p in (1, 2)]
    result = choose_setting(model, all_logits, labels, get_task("SST-2"), specs, max_drop=1.0, seed=3)
    chosen = next(row for row in result["rows"] if row["chosen"])
    # Chosen on the choosing half, where layer 1 looks perfect; had the reporting half chosen, k=2 would have won.
    assert (chosen["criterion"], chosen["setting"]) == ("static", "k=1")
    assert chosen["choose"]["score"] == pytest.approx(100.0) and chosen["report"]["score"] == pytest.approx(0.0)
    assert result["halves"] == {"choose": 100, "report": 100}
    full = result["rows"][0]
    assert full["setting"] == "0 (full)" and full["choose"]["avg_exit_layer"] == 4.0


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


def layer_one_wrong_on_half(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels, and 4 layers' logits: layer 1 wrong on every other example, layers 2-4 right and sure."""
    labels = np.random.default_rng(0).integers(0, 2, count)
    first = confident(labels, right=True)
    first[::2] = confident(labels[::2], right=False)
    return labels, np.stack([first] + [confident(labels, right=True)] * 3, axis=1)


def test_a_certified_choice_is_the_fewest_layers_among_the_certified_settings(model_dir):
    model = load_model_folder(model_dir)
    labels, all_logits = layer_one_wrong_on_half(400)
    specs = [ExitSpec("static", threshold=k) for k in (1, 2, 3, 4)]
    specs += [ExitSpec("patience", patience=p) for p in (1, 2)]
    guarantee = Guarantee("disagreement", 0.05, 0.95)
    result = choose_setting(model, all_logits, None, get_task("SST-2"), specs, 1.0, seed=3, guarantee=guarantee)
    rows = {(row["criterion"], row["setting"]): row for row in result["rows"]}
    chosen = next(row for row in result["rows"] if row["chosen"])
    assert (chosen["criterion"], chosen["setting"]) == ("static", "k=2")  # no labels needed
    assert chosen["report"]["disagreement"] == 0.0 and "score" not in chosen["report"]
    assert not rows["static", "k=1"]["certified"] and rows["static", "k=1"]["first_failure"]
    certificate = result["certificate"]
    assert certificate["level"] == pytest.approx(0.025)  # 5% split over two rules
    assert certificate["certified"] == {"static": "3/4", "patience": "2/2"} and not certificate["none_certified"]


def test_with_too_few_examples_nothing_is_certified_and_the_full_model_stays(model_dir):
    model = load_model_folder(model_dir)
    labels, all_logits = layer_one_wrong_on_half(400)
    specs = [ExitSpec("static", threshold=k) for k in (1, 2, 3)]
    guarantee = Guarantee("drop", 0.02, 0.95)  # even a perfect setting needs more than 200 examples at 2 points
    result = choose_setting(model, all_logits, labels, get_task("SST-2"), specs, 1.0, guarantee=guarantee)
    chosen = next(row for row in result["rows"] if row["chosen"])
    assert chosen["setting"] == "0 (full)" and result["certificate"]["none_certified"]
    assert result["certificate"]["min_examples"] > result["halves"]["choose"] == 200
    more = choose_setting(model, *_repeat(all_logits, labels, 4), get_task("SST-2"), specs, 1.0, guarantee=guarantee)
    assert next(row for row in more["rows"] if row["chosen"])["setting"] == "k=2"


def _repeat(all_logits: np.ndarray, labels: np.ndarray, times: int) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([all_logits] * times), np.concatenate([labels] * times)


def test_calibrate_certifies_on_unlabelled_texts(model_dir, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence number {i} is {'good' if i % 3 else 'bad'}" for i in range(40)) + "\n")
    argv = ["calibrate", "--model", str(folder), "--input_file", str(texts)]  # --certify auto: disagreement
    assert main([*argv, "--max_disagreement", "20", "--exit_criterion", "patience,static"]) == 0
    out = capsys.readouterr().out
    report = json.loads((folder / "calibration.json").read_text())
    assert report["halves"] == {"choose": 20, "report": 20} and report["certificate"]["risk"] == "disagreement"
    rows = {(row["criterion"], row["setting"]): row for row in report["rows"]}
    # Patience 3 of 4 layers never exits before the last: no answer changes, so 20 examples certify it
    # (0.8^20 = 0.012 < 0.025, the level of each of the two rules); the choice is the fewest-layer certified one.
    assert rows["patience", "3"]["certified"] and rows["patience", "3"]["choose"]["disagreement"] == 0.0
    certified = [row for row in report["rows"] if row["certified"]]
    chosen = next(row for row in report["rows"] if row["chosen"])
    assert chosen["choose"]["avg_exit_layer"] == min(row["choose"]["avg_exit_layer"] for row in certified)
    assert "certified: at most 20% of answers changed with 95% confidence" in out and "none certified" not in out
    markdown = (folder / "calibration.md").read_text()
    assert "Certified on one random half" in markdown and "Unlabelled texts" in markdown
    # Certifying a threshold rule walks its fine grid: no confidence is spent on the longer sequence.
    assert main([*argv, "--max_disagreement", "20", "--exit_criterion", "confidence"]) == 0
    report = json.loads((folder / "calibration.json").read_text())
    settings = [row["setting"] for row in report["rows"] if row["criterion"] == "confidence"]
    assert settings == [f"{t:g}" for t in CERTIFY_SWEEPS["confidence"]]
    shown = (folder / "calibration.md").read_text().count("| confidence |")
    assert 1 <= shown < len(settings)  # the report shows the certified front, the choice and the first failure


def test_the_ladder_steps_down_by_at_least_a_tenth_of_the_layers():
    def row(layers: float, changed: float) -> dict:
        return {"spec": ExitSpec("static", threshold=layers), "choose": {"avg_exit_layer": layers,
                "disagreement": changed}, "report": {"avg_exit_layer": layers, "disagreement": changed}}  # fmt: skip

    rows = [row(6.0, 0.0), row(5.9, 0.1), row(5.0, 0.5), row(4.8, 0.6), row(4.0, 1.0), row(4.5, 2.0)]
    result = {"rows": rows, "halves": {"choose": 10, "report": 10}}
    rungs = exit_ladder(result, {})["rungs"]
    assert [rung["layers"] for rung in rungs] == [6.0, 5.0, 4.0]  # 5.9, 4.8: too close; 4.5: beaten by 4.0


def test_calibrate_writes_the_choice_and_a_report(model_dir, glue_dir, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    before = json.loads((folder / "config.json").read_text())
    argv = ["calibrate", "--model", str(folder), "--task_name", "SST-2", "--data_dir", str(glue_dir / "SST-2")]
    argv += ["--exit_criterion", "patience,static", "--max_drop", "2", "--certify", "none"]
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
    ladder = json.loads((folder / "exit_ladder.json").read_text())["rungs"]  # for pabee serve --latency_target_ms
    assert ladder[0] | {"layers": 4.0} == {"patience": 0, "exit_criterion": "patience", "exit_threshold": None,
                                           "max_exit_layer": None, "disagreement": 0.0, "layers": 4.0,
                                           "certified": False}  # fmt: skip
    assert len(ladder) >= 2 and all(a["layers"] >= b["layers"] for a, b in zip(ladder, ladder[1:], strict=False))
    assert "Not certified: within 2 points on the choosing half only" in out and "certificate" not in report
    markdown = (folder / "calibration.md").read_text()
    assert "measured on the other half (436), which the choice never saw" in markdown and "(chosen)" in markdown


def test_auto_certifies_the_drop_only_where_the_examples_can():
    # Two rules at delta 0.05: a 2-point drop needs 368 examples per half, a 1-point drop 741.
    guarantee, caveat = auto_guarantee(2.0, 0.95, regression=False, examples=368, rules=2)
    assert guarantee == Guarantee("drop", 0.02, 0.95) and caveat is None
    guarantee, caveat = auto_guarantee(2.0, 0.95, regression=False, examples=367, rules=2)
    assert guarantee is None and "needs at least 368 examples per half here, these give 367" in caveat
    assert auto_guarantee(1.0, 0.95, False, 740, 2)[0] is None and auto_guarantee(1.0, 0.95, False, 741, 2)[0]
    assert auto_guarantee(1.0, 0.95, False, 10_000, 3)[0] == Guarantee("drop", 0.01, 0.95)
    guarantee, caveat = auto_guarantee(5.0, 0.95, regression=True, examples=10_000, rules=1)
    assert guarantee is None and "correlation" in caveat
    assert auto_guarantee(0.0, 0.95, False, 10_000, 1)[0] is None


def test_calibrate_certifies_by_default_where_the_data_allow_and_says_so_where_not(model_dir, glue_dir, tmp_path,
                                                                                   capsys):  # fmt: skip
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "model")
    argv = ["calibrate", "--model", str(folder), "--task_name", "SST-2", "--data_dir", str(glue_dir / "SST-2")]
    argv += ["--exit_criterion", "patience,static", "--dry_run"]
    assert main([*argv, "--max_drop", "2"]) == 0  # 436 per half certify a 2-point drop over two rules (368)
    out = capsys.readouterr().out
    report = json.loads((folder / "calibration.json").read_text())
    assert report["certificate"]["risk"] == "drop" and report["certificate"]["bound"] == 0.02
    rows = {(row["criterion"], row["setting"]): row for row in report["rows"]}
    assert rows["patience", "3"]["certified"]  # never exits before layer 4 of 4: changes nothing, so certified
    assert "certified: accuracy drop at most 2 point(s) with 95% confidence" in out
    assert "Not certified" not in out and report["caveat"] is None
    assert main([*argv, "--max_drop", "1"]) == 0  # ... but not a 1-point drop (741)
    out = capsys.readouterr().out
    report = json.loads((folder / "calibration.json").read_text())
    assert "certificate" not in report and "needs at least 741 examples per half here, these give 436" in out
    assert "Not certified" in (folder / "calibration.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task_name", "SST-2", "--validation_file", "x.jsonl"], "Give one of --task_name"),
        ([], "Give one of --task_name"),
        (["--task_name", "SST-2", "--max_drop", "-1"], "--max_drop=-1.0 is invalid"),
        (["--task_name", "NOPE"], "NOPE"),
        (["--input_file", "texts.txt", "--certify", "drop"], "only --certify disagreement"),
        (["--task_name", "SST-2", "--certify", "drop", "--max_drop", "0"], "--certify drop needs a --max_drop"),
        (["--task_name", "SST-2", "--certify", "drop", "--confidence_level", "1.5"], "--confidence_level=1.5"),
        (["--task_name", "SST-2", "--certify", "disagreement", "--max_disagreement", "0"], "--max_disagreement=0"),
    ],
)
def test_bad_calibrate_flags_are_one_line(extra, message, model_dir, capsys):
    assert main(["calibrate", "--model", str(model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_run_glue_saves_the_full_model_unless_a_setting_is_chosen_on_data(tmp_path, minilm_tokenizer):
    # The sweep's first patience used to become the default (MRPC: patience 1, 6.7 points under the full model).
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=40)
    assert main([*argv, "--patience", "1,2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["exit_criterion"], saved["patience"], saved["max_exit_layer"]) == ("patience", 0, None)
    capped = [*argv, "--patience", "1", "--max_exit_layer", "1", "--output_dir", str(tmp_path / "capped")]
    assert main(capped) == 0
    saved = json.loads((tmp_path / "capped" / "config.json").read_text())
    assert (saved["patience"], saved["max_exit_layer"]) == (0, 1)  # the user's worst-case cap is kept


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
    assert "need --do_train" in capsys.readouterr().err
    certified = [*argv[:-2], "--calibrate_certify", "disagreement", "--calibrate_max_disagreement", "50"]
    certified[certified.index("--output_dir") + 1] = str(tmp_path / "certified")
    assert main(certified) == 0
    assert "none certified, full model kept" in capsys.readouterr().out  # 2 examples certify nothing
