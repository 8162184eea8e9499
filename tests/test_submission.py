"""`run-glue --do_predict`: GLUE-server submission files from real early exit, for real and hand-made test sets."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import save_tiny_text_model

from pabee.cli import main
from pabee.glue import get_task, read_glue_tsv
from pabee.pipeline import pipeline
from pabee.submission import SUBMISSION_DIR, format_predictions, submission_filename

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args) -> int:
    try:
        return main(["run-glue", *map(str, args)])
    except SystemExit as stop:
        return stop.code


def read_submission(path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_file_names_and_label_strings_are_what_the_glue_server_expects():
    mnli, stsb, sst2 = get_task("MNLI"), get_task("STS-B"), get_task("SST-2")
    assert submission_filename(mnli, "test_matched") == "MNLI-m.tsv"
    assert submission_filename(mnli, "test_mismatched") == "MNLI-mm.tsv"
    assert submission_filename(sst2, "test") == "SST-2.tsv"
    assert format_predictions(mnli, torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])) == ["neutral", "contradiction"]
    assert format_predictions(sst2, torch.tensor([[2.0, 1.0], [0.0, 1.0]])) == ["0", "1"]
    assert format_predictions(stsb, torch.tensor([[-0.4], [2.71828], [6.0]])) == ["0.000", "2.718", "5.000"]


@pytest.mark.parametrize("patience", [0, 1])
def test_rte_test_set_submission_with_the_models_own_setting(glue_dir, tmp_path, minilm_tokenizer, patience):
    model = save_tiny_text_model(tmp_path / "tiny", minilm_tokenizer, patience=patience)
    out = tmp_path / "out"
    args = ["--task_name", "RTE", "--data_dir", glue_dir, "--model_name_or_path", model, "--do_predict"]
    assert run(*args, "--patience", "2,3", "--output_dir", out) == 0  # the swept patiences are not the setting
    rows = read_submission(out / SUBMISSION_DIR / "RTE.tsv")
    test = read_glue_tsv(get_task("RTE"), glue_dir / "RTE" / "test.tsv", test=True)
    assert rows[0] == ["index", "prediction"] and len(rows) == len(test) + 1 == 3001
    assert [r[0] for r in rows[1:]] == [e["idx"] for e in test]
    pipe = pipeline(model, patience=patience)
    expected = pipe([(e["text"], e["text_pair"]) for e in test[:50]])
    names = get_task("RTE").labels  # the model's label i is RTE's i-th label
    assert [r[1] for r in rows[1:51]] == [names[pipe.labels.index(a["label"])] for a in expected]
    assert {r[1] for r in rows[1:]} <= {"entailment", "not_entailment"}
    summary = json.loads((out / "glue_submission.json").read_text())
    assert summary["exit_setting"]["patience"] == patience and summary["files"]["RTE.tsv"]["examples"] == 3000
    average = summary["files"]["RTE.tsv"]["avg_exit_layer"]
    assert average == 4.0 if patience == 0 else average < 4.0


def _write(folder, name, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header), *("\t".join(row) for row in rows)]
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_mnli_gets_matched_and_mismatched_files(tmp_path, minilm_tokenizer):
    model = save_tiny_text_model(tmp_path / "tiny3", minilm_tokenizer, num_labels=3)
    folder = tmp_path / "MNLI"
    header = "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse".split()
    header += ["sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    parses = ["1", "2", "fiction", "(a)", "(b)", "(a)", "(b)"]
    for name, first in (("test_matched.tsv", 7), ("test_mismatched.tsv", 100)):
        rows = [
            [str(first), *parses, "A man walks.", "He moves."],
            [str(first + 1), *parses, "Cats nap.", "Dogs bark."],
        ]
        _write(folder, name, header, rows)
    out = tmp_path / "out"
    args = ["--task_name", "MNLI", "--data_dir", folder, "--model_name_or_path", model, "--do_predict"]
    assert run(*args, "--output_dir", out) == 0
    matched = read_submission(out / SUBMISSION_DIR / "MNLI-m.tsv")
    mismatched = read_submission(out / SUBMISSION_DIR / "MNLI-mm.tsv")
    assert [r[0] for r in matched] == ["index", "7", "8"] and [r[0] for r in mismatched] == ["index", "100", "101"]
    assert {r[1] for r in matched[1:] + mismatched[1:]} <= {"entailment", "neutral", "contradiction"}


def test_stsb_scores_are_clipped_numbers(tmp_path, minilm_tokenizer):
    model = save_tiny_text_model(tmp_path / "tiny1", minilm_tokenizer, num_labels=1)
    folder = tmp_path / "STS-B"
    header = "index genre filename year old_index source1 source2 sentence1 sentence2".split()
    rows = [[str(i), "main", "f", "2012", "0", "none", "none", f"A girl {i}.", "A girl."] for i in range(4)]
    _write(folder, "test.tsv", header, rows)
    out = tmp_path / "out"
    args = ["--task_name", "STS-B", "--data_dir", folder, "--model_name_or_path", model, "--do_predict"]
    assert run(*args, "--output_dir", out) == 0
    rows = read_submission(out / SUBMISSION_DIR / "STS-B.tsv")
    assert len(rows) == 5 and all(0.0 <= float(r[1]) <= 5.0 and len(r[1].split(".")[1]) == 3 for r in rows[1:])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_task", "--do_predict writes GLUE test-set submission files; it needs --task_name"),
        ("no_test_file", "--do_predict needs the test file"),
        ("taken", "already holds submission files; pass --overwrite_output_dir"),
    ],
)
def test_do_predict_problems_are_reported_before_any_work(case, message, tmp_path, minilm_tokenizer, capsys):
    model = save_tiny_text_model(tmp_path / "tiny", minilm_tokenizer)
    folder = tmp_path / "SST-2"
    _write(folder, "test.tsv", ["index", "sentence"], [["0", "fine"]])
    out = tmp_path / "out"
    args = ["--task_name", "SST-2", "--data_dir", folder, "--model_name_or_path", model, "--do_predict"]
    if case == "no_task":
        (tmp_path / "dev.csv").write_text("text,label\nfine,1\n")
        args = ["--validation_file", tmp_path / "dev.csv", "--model_name_or_path", model, "--do_predict"]
    elif case == "no_test_file":
        (folder / "test.tsv").unlink()
    elif case == "taken":
        (out / SUBMISSION_DIR).mkdir(parents=True)
        (out / SUBMISSION_DIR / "SST-2.tsv").write_text("old\n")
    assert run(*args, "--output_dir", out) == 2
    assert message in capsys.readouterr().err
    if case == "taken":
        assert (out / SUBMISSION_DIR / "SST-2.tsv").read_text() == "old\n"
        assert run(*args, "--output_dir", out, "--overwrite_output_dir") == 0
        assert read_submission(out / SUBMISSION_DIR / "SST-2.tsv")[1][0] == "0"
    else:
        assert not out.exists()
