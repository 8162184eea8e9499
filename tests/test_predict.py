"""`pabee predict` on real GLUE files and on every input format; bad input is one line and exit code 2."""

from __future__ import annotations

import json

import pytest

from pabee.cli import main
from pabee.data import read_text_file
from pabee.glue import get_task, read_glue_tsv
from pabee.pipeline import pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def predict(*args) -> int:
    try:
        return main(["predict", *map(str, args)])
    except SystemExit as stop:  # argparse's own errors
        return stop.code


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_predict_on_the_sst2_dev_file(model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "sst2.jsonl"
    source = glue_dir / "SST-2" / "dev.tsv"
    assert predict("--model", model_dir, "--input", source, "--text_column", "sentence", "--output", out) == 0
    rows = read_jsonl(out)
    sentences = [e["text"] for e in read_glue_tsv(get_task("SST-2"), source)]
    assert len(rows) == len(sentences) == 872
    assert [r["text"] for r in rows] == sentences and [r["line"] for r in rows[:2]] == [2, 3]
    err, setting = capsys.readouterr().err.strip().splitlines()[-2:]
    expected = pipeline(model_dir)(sentences)
    assert [{k: r[k] for k in ("label", "score", "exit_layer")} for r in rows] == expected
    average = sum(r["exit_layer"] for r in rows) / len(rows)
    assert err.startswith("pabee predict: 872 examples in ") and "examples/s" in err
    assert f"average exit layer {average:.2f} of 4" in err and err.endswith(f"wrote {out}")
    # The tiny model was saved with patience 1 and never calibrated: say so, and how to check it.
    assert setting == (
        f"pabee predict: exit setting: patience 1, the model's default, not chosen on data here: check it with "
        f"`pabee calibrate --model {model_dir} ... --dry_run`, or pass --patience 0 for the full model"
    )


def test_predict_pairs_from_the_rte_dev_file(model_dir, glue_dir, tmp_path):
    out = tmp_path / "rte.jsonl"
    source = glue_dir / "RTE" / "dev.tsv"
    columns = ["--text_column", "sentence1", "--text_pair_column", "sentence2"]
    assert predict("--model", model_dir, "--input", source, *columns, "--output", out, "--patience", "0") == 0
    rows = read_jsonl(out)
    pairs = [(e["text"], e["text_pair"]) for e in read_glue_tsv(get_task("RTE"), source)]
    assert [(r["text"], r["text_pair"]) for r in rows] == pairs
    assert {r["exit_layer"] for r in rows} == {4}  # patience 0 is the full model
    expected = pipeline(model_dir, patience=0)(pairs)
    assert [r["label"] for r in rows] == [a["label"] for a in expected]


def test_every_input_format_gives_the_same_answers(model_dir, sst2_dev_sentences, tmp_path, capsys):
    texts = [s for s in sst2_dev_sentences[:20] if "\t" not in s and '"' not in s]
    pair = ("A man is playing a guitar.", "Someone plays music.")
    files = {
        "in.txt": "\n".join(texts) + "\n\n" + "\t".join(pair) + "\n",
        "in.tsv": "text\ttext_pair\n" + "".join(f"{t}\t\n" for t in texts) + "\t".join(pair) + "\n",
        "in.csv": "id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts)),
        "in.jsonl": "".join(json.dumps({"text": t}) + "\n" for t in texts)
        + json.dumps({"text": pair[0], "text_pair": pair[1]})
        + "\n",
    }
    expected = pipeline(model_dir)([*texts, pair])
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        out = tmp_path / f"{name}.jsonl"
        assert predict("--model", model_dir, "--input", tmp_path / name, "--output", out) == 0, name
        rows = read_jsonl(out)
        assert [r["text"] for r in rows[: len(texts)]] == texts, name
        answers = [{k: r[k] for k in ("label", "score", "exit_layer")} for r in rows]
        if name == "in.tsv":  # an empty text_pair cell is a pair with an empty second text
            assert rows[0]["text_pair"] == "" and answers[-1] == expected[-1]
        elif name == "in.csv":
            assert answers == expected[:-1]
        else:
            assert answers == expected and rows[-1]["text_pair"] == pair[1]
    assert read_jsonl(tmp_path / "in.txt.jsonl")[-1]["line"] == len(texts) + 2  # the blank line is skipped


def test_without_output_the_lines_go_to_stdout(model_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("a fine film\na dull film\n", encoding="utf-8")
    assert predict("--model", model_dir, "--input", source, "--patience", "0") == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["text"] for r in rows] == ["a fine film", "a dull film"]
    assert all(r["exit_layer"] == 4 for r in rows)
    assert "exit setting: full model (set by the flags; the model's own: patience 1)" in captured.err


def test_exit_options_from_the_command_line(model_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("a fine film\na dull film\nan odd one\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    argv = ["--model", model_dir, "--input", source, "--output", out]
    assert predict(*argv, "--exit_criterion", "static", "--exit_threshold", "3") == 0
    assert {r["exit_layer"] for r in read_jsonl(out)} == {3}
    assert "exit setting: static k=3 (set by the flags; the model's own: patience 1)" in capsys.readouterr().err
    assert predict(*argv, "--overwrite", "--patience", "0", "--max_exit_layer", "2") == 0
    assert {r["exit_layer"] for r in read_jsonl(out)} == {2}
    assert predict(*argv, "--overwrite", "--dtype", "bfloat16", "--attn_implementation", "eager") == 0
    assert len(read_jsonl(out)) == 3
    assert predict(*argv, "--overwrite", "--exit_criterion", "bogus") == 2
    assert "exit_criterion='bogus' is unknown" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_model", "--model {tmp}/nowhere is not a folder"),
        ("not_a_model", "is not a model folder (no config.json)"),
        ("missing_input", "Missing input file {tmp}/nothing.txt"),
        ("taken_output", "--output {tmp}/taken.jsonl exists; pass --overwrite to replace it"),
        ("bad_json", "bad.jsonl, line 2: not valid JSON"),
        ("no_text_field", "bad.jsonl, line 1: 'text' is missing or not a string"),
        ("pair_not_string", "bad.jsonl, line 1: 'text_pair' is not a string"),
        ("no_text_column", "the header must name a 'text' column (found ['sentence', 'label'])"),
        ("ragged_row", "bad.tsv, line 3: the number of columns differs from the header"),
        ("three_fields", "bad.txt, line 1: 3 tab-separated fields"),
        ("empty", "bad.txt holds no examples"),
        ("suffix", "unsupported file type '.xml'"),
        ("bad_patience", "patience=-2 is invalid"),
        ("bad_batch_size", "batch_size=0 is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(case, message, model_dir, tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("fine\n", encoding="utf-8")
    args = {"--model": model_dir, "--input": good}
    extra: list[str] = []
    contents = {
        "bad_json": ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n'),
        "no_text_field": ("bad.jsonl", '{"sentence": "ok"}\n'),
        "pair_not_string": ("bad.jsonl", '{"text": "ok", "text_pair": 3}\n'),
        "no_text_column": ("bad.tsv", "sentence\tlabel\nfine\t1\n"),
        "ragged_row": ("bad.tsv", "text\tlabel\nfine\t1\nbad\n"),
        "three_fields": ("bad.txt", "a\tb\tc\n"),
        "empty": ("bad.txt", "\n\n"),
        "suffix": ("bad.xml", "<a/>"),
    }
    if case in contents:
        name, text = contents[case]
        (tmp_path / name).write_text(text, encoding="utf-8")
        args["--input"] = tmp_path / name
    elif case == "missing_model":
        args["--model"] = tmp_path / "nowhere"
    elif case == "not_a_model":
        args["--model"] = tmp_path
    elif case == "missing_input":
        args["--input"] = tmp_path / "nothing.txt"
    elif case == "taken_output":
        (tmp_path / "taken.jsonl").write_text("keep me\n")
        extra = ["--output", str(tmp_path / "taken.jsonl")]
    elif case == "bad_patience":
        extra = ["--patience", "-2"]
    elif case == "bad_batch_size":
        extra = ["--batch_size", "0"]
    argv = [x for kv in args.items() for x in kv] + extra
    assert predict(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pabee predict: error: ") and len(err.splitlines()) == 1
    assert message.format(tmp=tmp_path) in err
    if case == "taken_output":
        assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"
        assert predict(*argv, "--overwrite") == 0 and read_jsonl(tmp_path / "taken.jsonl")[0]["text"] == "fine"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("in.jsonl", b'{"text": "fine"}\n{"text": "ok \\ud800 text"}\n{"text": "dull"}\n', "lone surrogate U+D800"),
        ("in.txt", b"fine\nok \xff text\ndull\n", "not valid UTF-8 text (byte 0xFF"),
    ],
)
def test_a_line_that_is_not_text_costs_only_that_line(model_dir, tmp_path, capsys, name, content, problem):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out.jsonl"
    assert predict("--model", model_dir, "--input", tmp_path / name, "--output", out) == 0
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert f"character 3 is {'a ' if 'surrogate' in problem else ''}{problem}" in rows[1]["error"]
    assert rows[1]["label"] is None and rows[1]["exit_layer"] is None
    expected = pipeline(model_dir)(["fine", "dull"])
    assert [{k: r[k] for k in ("label", "score", "exit_layer")} for r in (rows[0], rows[2])] == expected
    err = capsys.readouterr().err
    assert "2 examples in" in err and '1 line(s) not classified, marked "error" in the output (first: line 2' in err


def test_read_text_file_keeps_line_numbers_and_pairs(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("one\n\ntwo\tthree\r\n", encoding="utf-8")
    rows = read_text_file(path)
    assert [(r.line, r.text, r.text_pair) for r in rows] == [(1, "one", None), (3, "two", "three")]


def test_the_exit_setting_says_where_it_came_from(tmp_path):
    from pabee import ExitSpec
    from pabee.folders import exit_setting_note

    full, confident = ExitSpec("patience", patience=0), ExitSpec("confidence", threshold=0.8)
    assert exit_setting_note(tmp_path, full, full).startswith("full model, the model's default; for fewer layers")
    assert f"`pabee calibrate --model {tmp_path} --task_name TASK" in exit_setting_note(tmp_path, full, full)
    assert "not chosen on data here" in exit_setting_note(tmp_path, confident, confident)
    (tmp_path / "calibration.md").write_text("# Calibration\n")
    assert exit_setting_note(tmp_path, confident, confident) == (
        f"confidence 0.8, the model's default, chosen by `pabee calibrate` ({tmp_path / 'calibration.md'})"
    )
    capped = ExitSpec("patience", patience=2, max_exit_layer=4)
    assert exit_setting_note(tmp_path, capped, full) == (
        "patience 2, at most 4 layers (set by the flags; the model's own: full model)"
    )
