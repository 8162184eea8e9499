"""GLUE readers on the real TSV files, and on small files in the original layout for what is not here."""

from __future__ import annotations

import pytest

from pabee.errors import DataError, PabeeError
from pabee.glue import GLUE_TASKS, get_task, read_glue_tsv, task_dir

OFFICIAL_ROWS = {
    ("CoLA", "train.tsv"): 8551,
    ("CoLA", "dev.tsv"): 1043,
    ("SST-2", "train.tsv"): 67349,
    ("SST-2", "dev.tsv"): 872,
    ("MRPC", "train.tsv"): 3668,
    ("MRPC", "dev.tsv"): 408,
    ("STS-B", "train.tsv"): 5749,
    ("STS-B", "dev.tsv"): 1500,
    ("QNLI", "dev.tsv"): 5463,
    ("RTE", "train.tsv"): 2490,
    ("RTE", "dev.tsv"): 277,
    ("WNLI", "train.tsv"): 635,
    ("WNLI", "dev.tsv"): 71,
}
OFFICIAL_TEST_ROWS = {"CoLA": 1063, "SST-2": 1821, "MRPC": 1725, "STS-B": 1379, "QNLI": 5463, "RTE": 3000, "WNLI": 146}


@pytest.mark.parametrize(("task_name", "filename"), sorted(OFFICIAL_ROWS))
def test_real_glue_file_has_the_official_row_count(glue_dir, task_name, filename):
    task = get_task(task_name)
    examples = read_glue_tsv(task, task_dir(task, glue_dir) / filename)
    assert len(examples) == OFFICIAL_ROWS[(task_name, filename)]
    assert all(isinstance(e["text"], str) and e["text"] for e in examples)
    if task.is_pair:
        assert all(e["text_pair"] for e in examples)
    if task.is_regression:
        assert all(0.0 <= e["label"] <= 5.0 for e in examples)
    else:
        assert {e["label"] for e in examples} == set(range(task.num_labels))


@pytest.mark.parametrize("task_name", sorted(OFFICIAL_TEST_ROWS))
def test_real_glue_test_files_read_without_labels(glue_dir, task_name):
    task = get_task(task_name)
    examples = read_glue_tsv(task, task_dir(task, glue_dir) / "test.tsv", test=True)
    assert len(examples) == OFFICIAL_TEST_ROWS[task_name]
    assert all(e["label"] is None for e in examples)
    assert examples[0]["idx"] == "0"


def test_known_label_balances(glue_dir):
    sst2 = read_glue_tsv(get_task("sst2"), glue_dir / "SST-2" / "train.tsv")
    assert sum(e["label"] for e in sst2) == 37569  # positives, as published
    rte = read_glue_tsv(get_task("RTE"), glue_dir / "RTE" / "dev.tsv")
    assert sum(e["label"] == 0 for e in rte) == 146  # entailment


@pytest.mark.parametrize("spelling", ["SST-2", "sst-2", "sst2", "Sst_2"])
def test_task_names_are_case_and_dash_insensitive(spelling):
    assert get_task(spelling).name == "SST-2"


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(PabeeError, match=r"Unknown GLUE task 'squad'.*CoLA, SST-2, MRPC, STS-B, QQP, MNLI"):
        get_task("squad")


def test_all_nine_tasks_are_in_the_table():
    assert sorted(t.name for t in GLUE_TASKS.values()) == sorted(
        ["CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI"]
    )
    assert get_task("stsb").is_regression and get_task("mnli").num_labels == 3


def test_task_dir_accepts_the_task_folder_or_the_glue_root(glue_dir):
    task = get_task("MRPC")
    assert task_dir(task, glue_dir) == glue_dir / "MRPC"
    assert task_dir(task, glue_dir / "MRPC") == glue_dir / "MRPC"


def _write(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


MNLI_DEV_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse "
    "sentence1 sentence2 label1 label2 label3 label4 label5 gold_label"
).split()
MNLI_TRAIN_HEADER = MNLI_DEV_HEADER[:11] + ["gold_label"]


def _mnli_row(i, label, n_labels):
    return [str(i), "1", f"{i}e", "fiction", "( a )", "( b )", "(ROOT a)", "(ROOT b)", f"premise {i}", f"hyp {i}"] + [
        label
    ] * n_labels


def test_mnli_reader_on_original_layout(tmp_path):
    task = get_task("MNLI")
    folder = tmp_path / "MNLI"
    _write(
        folder / "train.tsv",
        MNLI_TRAIN_HEADER,
        [_mnli_row(i, lab, 2) for i, lab in enumerate(["neutral", "contradiction", "entailment"])],
    )
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        _write(folder / name, MNLI_DEV_HEADER, [_mnli_row(i, "entailment", 6) for i in range(4)])
    train = read_glue_tsv(task, task_dir(task, tmp_path) / "train.tsv")
    assert [e["label"] for e in train] == [1, 2, 0]  # neutral, contradiction, entailment in hub order
    assert train[0]["text"] == "premise 0" and train[0]["text_pair"] == "hyp 0"
    assert [s.filename for s in task.eval_splits] == ["dev_matched.tsv", "dev_mismatched.tsv"]
    assert len(read_glue_tsv(task, folder / "dev_mismatched.tsv")) == 4


def test_qqp_reader_on_original_layout(tmp_path):
    task = get_task("QQP")
    path = _write(
        tmp_path / "QQP" / "dev.tsv",
        ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        [["0", "1", "2", "How?", "Why?", "0"], ["1", "3", "4", "Who?", "Whom?", "1"]],
    )
    examples = read_glue_tsv(task, path)
    assert [(e["text"], e["text_pair"], e["label"]) for e in examples] == [("How?", "Why?", 0), ("Who?", "Whom?", 1)]
    test = _write(tmp_path / "QQP" / "test.tsv", ["id", "question1", "question2"], [["7", "A?", "B?"]])
    assert read_glue_tsv(task, test, test=True) == [{"text": "A?", "text_pair": "B?", "label": None, "idx": "7"}]


def test_qnli_train_reader_on_original_layout(tmp_path):
    task = get_task("QNLI")
    path = _write(
        tmp_path / "train.tsv",
        ["index", "question", "sentence", "label"],
        [["0", "Q?", "S.", "not_entailment"], ["1", "Q2?", "S2.", "entailment"]],
    )
    assert [e["label"] for e in read_glue_tsv(task, path)] == [1, 0]


def test_malformed_row_names_file_and_line(tmp_path):
    path = _write(tmp_path / "dev.tsv", ["sentence", "label"], [["good film", "1"], ["a stray\ttab", "0"]])
    with pytest.raises(DataError, match=r"dev\.tsv, line 3: expected 2 tab-separated columns, found 3"):
        read_glue_tsv(get_task("sst2"), path)


def test_label_outside_the_task_set_names_file_and_line(tmp_path):
    path = _write(tmp_path / "dev.tsv", ["sentence", "label"], [["good film", "1"], ["bad", "2"]])
    with pytest.raises(DataError, match=r"line 3: label '2' is not a SST-2 label \(0, 1\)"):
        read_glue_tsv(get_task("sst2"), path)


def test_non_numeric_stsb_score_is_an_error(tmp_path):
    header = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()
    row = ["0", "g", "f", "2012", "1", "s", "s", "A man.", "A dog.", "high"]
    path = _write(tmp_path / "dev.tsv", header, [row])
    with pytest.raises(DataError, match=r"line 2: STS-B score 'high' is not a number"):
        read_glue_tsv(get_task("STS-B"), path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"Missing data file .*dev\.tsv"):
        read_glue_tsv(get_task("rte"), tmp_path / "dev.tsv")
    with pytest.raises(DataError, match="does not exist"):
        task_dir(get_task("rte"), tmp_path / "nope")
