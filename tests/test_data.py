"""User data files, the hub fallback, and tokenization."""

from __future__ import annotations

import json

import datasets
import pytest

from pabee.data import infer_task, load_glue, load_user_files, read_examples_file, tokenize
from pabee.errors import DataError
from pabee.glue import get_task


def test_csv_tsv_and_jsonl_files(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"good, really",pos\nbad,neg\n', encoding="utf-8")
    (tmp_path / "a.tsv").write_text("text\ttext_pair\tlabel\nq\ta\t1.5\n", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "x", "text_pair": "y", "label": 0})
        + "\n\n"
        + json.dumps({"text": "z", "text_pair": "w", "label": 1})
        + "\n",
        encoding="utf-8",
    )
    assert [e["text"] for e in read_examples_file(tmp_path / "a.csv")] == ["good, really", "bad"]
    assert read_examples_file(tmp_path / "a.tsv")[0]["text_pair"] == "a"
    assert [e["_line"] for e in read_examples_file(tmp_path / "a.jsonl")] == [1, 3]


def test_training_lines_that_are_not_text_are_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine", "label": 0}\n{"text": "ok \\ud800", "label": 1}\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 2: character 3 is a lone surrogate U\+D800"):
        read_examples_file(tmp_path / "a.jsonl")
    (tmp_path / "b.csv").write_bytes(b"text,label\nfine,0\nbad \xff byte,1\n")
    with pytest.raises(DataError, match=r"b.csv, line 3: character 4 is not valid UTF-8 text \(byte 0xFF"):
        read_examples_file(tmp_path / "b.csv")


def test_bad_user_files_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": 1}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        read_examples_file(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("sentence,label\nx,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="must name a 'text' column"):
        read_examples_file(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("text,label\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"short\.csv, line 2: the number of columns differs"):
        read_examples_file(tmp_path / "short.csv")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi\n")
        read_examples_file(tmp_path / "x.txt")


def test_task_inference_for_user_data():
    cls = infer_task("t", [{"label": "neg", "_line": 2}, {"label": "pos", "_line": 3}])
    assert cls.labels == ("neg", "pos") and not cls.is_regression
    ints = infer_task("t", [{"label": 10, "_line": 2}, {"label": 2, "_line": 3}])
    assert ints.labels == ("2", "10")  # numeric labels sort numerically
    reg = infer_task("t", [{"label": 0.5, "_line": 2}, {"label": 2, "_line": 3}])
    assert reg.is_regression and reg.main_metric == "spearman"
    with pytest.raises(DataError, match="line 3: regression label 'x' is not a number"):
        infer_task("t", [{"label": 1.5, "_line": 2}, {"label": "x", "_line": 3}], task_type="regression")


def test_validation_label_unseen_in_training_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n", encoding="utf-8")
    (tmp_path / "dev.csv").write_text("text,label\nc,meh\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.csv, line 2: label 'meh' was not seen in training"):
        load_user_files(str(tmp_path / "train.csv"), str(tmp_path / "dev.csv"))


def test_user_files_become_datasets(tmp_path):
    (tmp_path / "train.jsonl").write_text(
        "\n".join(
            json.dumps({"text": f"t{i}", "text_pair": "p", "label": "yes" if i % 2 else "no"}) for i in range(6)
        ),
        encoding="utf-8",
    )
    data = load_user_files(str(tmp_path / "train.jsonl"), None)
    assert data.task.is_pair and data.task.labels == ("no", "yes")
    assert data.train["label"] == [0, 1, 0, 1, 0, 1]


def test_hub_failure_says_to_pass_data_dir(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"Could not load nyu-mll/glue \(mrpc\).*Pass --data_dir"):
        load_glue(get_task("mrpc"), None, train=False, evaluate=True, test=False)


def test_glue_splits_and_tokenization(glue_dir, minilm_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path))
    data = load_glue(get_task("MRPC"), glue_dir, train=False, evaluate=True, test=True)
    assert set(data.eval) == {"dev"} and set(data.test) == {"test"} and data.train is None
    assert "label" not in data.test["test"].column_names
    dev = data.eval["dev"].select(range(16))
    tokenized = tokenize(dev, minilm_tokenizer, 64, split="dev", cache_key=data.cache_keys["dev"])
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    assert max(lengths) == 64 and len(set(lengths)) > 1, "no padding at tokenization time; truncation at 64"
    assert list((tmp_path / "pabee").glob("dev-*.arrow")), "tokenized split is cached on disk"
    again = tokenize(dev, minilm_tokenizer, 64, split="dev", cache_key=data.cache_keys["dev"])
    assert again["input_ids"] == tokenized["input_ids"]
