"""`pabee add-exits`: exits on a user's own classifier whose full depth answers exactly as that classifier did."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BACKBONE_TYPES, random_batch, read_tsv_column, tiny_encoder_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from pabee import PabeeForSequenceClassification
from pabee.cli import main
from pabee.exit_training import ExitLoss, cache_exit_inputs


def _classifier(model_type: str, num_labels: int, folder) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_encoder_config(model_type)
    config.num_labels = num_labels
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("num_labels", [3, 1])
@pytest.mark.parametrize("model_type", BACKBONE_TYPES)
def test_full_depth_is_the_classifier_itself(model_type, num_labels, tmp_path):
    original = _classifier(model_type, num_labels, tmp_path / "plain")
    model = PabeeForSequenceClassification.from_classifier(tmp_path / "plain")
    assert model.config.original_head and len(model.classifiers) == model.num_layers - 1
    batch = random_batch()
    if model_type == "distilbert":
        batch.pop("token_type_ids")
    with torch.no_grad():
        reference = original(**batch).logits
        torch.testing.assert_close(model(**batch, patience=0).logits, reference, rtol=0, atol=1e-6)
        every = model(**batch, output_all_logits=True).all_logits
        torch.testing.assert_close(every[:, -1], reference, rtol=0, atol=1e-6)
        model.save_pretrained(tmp_path / "exits")
        again = PabeeForSequenceClassification.from_pretrained(tmp_path / "exits").eval()
        torch.testing.assert_close(again(**batch, patience=0).logits, reference, rtol=0, atol=1e-6)
        assert every.shape == (8, model.num_layers, num_labels)


def _tiny_bert_classifier(folder, tokenizer, num_labels: int = 2):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=128, num_labels=num_labels)  # fmt: skip
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_exits_learn_the_classifiers_answers_and_nothing_else_moves(tmp_path, minilm_tokenizer, glue_dir):
    _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer)
    texts = [(s, None) for s in read_tsv_column(glue_dir / "SST-2" / "dev.tsv", "sentence", limit=400)]
    model = PabeeForSequenceClassification.from_classifier(tmp_path / "plain")
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifiers.")}
    cache = cache_exit_inputs(model, minilm_tokenizer, texts, progress=False)
    assert cache.states.shape == (400, 3, 32) and cache.teacher.shape == (400, 2)
    loss = ExitLoss(model, temperature=2.0, label_weight=0.0)
    with torch.no_grad():
        initial = float(loss(cache.states, cache.teacher)["loss"])
    from transformers import TrainingArguments

    from pabee.exit_training import train_exits

    args = TrainingArguments(output_dir=str(tmp_path / "t"), num_train_epochs=20, per_device_train_batch_size=64,
                             learning_rate=1e-2, save_strategy="no", report_to=[], disable_tqdm=True)  # fmt: skip
    train_exits(model, cache, args, temperature=2.0, label_weight=0.0)
    with torch.no_grad():
        assert float(loss(cache.states, cache.teacher)["loss"]) < 0.5 * initial
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone and head frozen


@pytest.fixture(scope="module")
def sentences(glue_dir) -> list[str]:
    """The 872 SST-2 dev sentences: texts for the exits to learn from and to certify on."""
    return read_tsv_column(glue_dir / "SST-2" / "dev.tsv", "sentence")


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["add-exits", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _certified_run(tmp_path, sentences, capsys, texts: int, epochs: int, bound: int) -> tuple[int, str, str]:
    """add-exits on the first `texts` sentences of `tmp_path/plain`, certified on the next 400, into tmp_path/exits."""
    (tmp_path / "texts.txt").write_text("\n".join(sentences[:texts]) + "\n")
    (tmp_path / "held_out.txt").write_text("\n".join(sentences[texts : texts + 400]) + "\n")
    return _run(capsys, "--model", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "exits"), "--input_file",
                str(tmp_path / "texts.txt"), "--num_train_epochs", str(epochs), "--max_disagreement", str(bound),
                "--calibration_file", str(tmp_path / "held_out.txt"))  # fmt: skip


def test_add_exits_command_on_texts_then_certified_setting(tmp_path, minilm_tokenizer, sentences, capsys):
    original = _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer)
    out = tmp_path / "exits"
    code, stdout, err = _certified_run(tmp_path, sentences, capsys, texts=300, epochs=3, bound=10)
    assert code == 0, err
    assert "at full depth it answers as" in stdout and "certified" in stdout
    record = json.loads((out / "add_exits.json").read_text())
    assert record["data"]["examples"] == 300 and not record["data"]["labelled"]
    assert not list(out.glob("checkpoint-*")) and not (out / "exit_cache.safetensors").exists()
    assert (out / "calibration.json").is_file() and (out / "exit_ladder.json").is_file()
    model = PabeeForSequenceClassification.from_pretrained(out).eval()
    batch = minilm_tokenizer(sentences[:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, patience=0).logits, original(**batch).logits, rtol=0, atol=1e-6)
    # the same command again: the folder is finished, so it is refused, not overwritten
    code, _, err = _run(capsys, "--model", str(tmp_path / "plain"), "--output_dir", str(out), "--input_file",
                        str(tmp_path / "texts.txt"))  # fmt: skip
    assert code == 2 and "exists and is not empty" in err
    # the folder is a PABEE model like any other: predict answers with the certified setting
    assert main(["predict", "--model", str(out), "--input", str(tmp_path / "held_out.txt"), "--output",
                 str(tmp_path / "answers.jsonl")]) == 0  # fmt: skip
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 400 and "chosen by `pabee calibrate`" in capsys.readouterr().err
    assert {answer["exit_layer"] for answer in answers} <= {1, 2, 3, 4}


def test_an_unfinished_run_resumes_from_its_cache(tmp_path, minilm_tokenizer, sentences, capsys):
    _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer)
    (tmp_path / "texts.txt").write_text("\n".join(sentences[:100]) + "\n")
    argv = ["--model", str(tmp_path / "plain"), "--output_dir", str(tmp_path / "exits"), "--input_file",
            str(tmp_path / "texts.txt"), "--num_train_epochs", "2"]  # fmt: skip
    from pabee import add_exits

    real_train = add_exits.train_exits

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    add_exits.train_exits = interrupted
    try:
        code, _, err = _run(capsys, *argv)
    finally:
        add_exits.train_exits = real_train
    assert code == 130 and (tmp_path / "exits" / "exit_cache.safetensors").is_file()
    assert _run(capsys, *argv, "--learning_rate", "0.01")[0] == 2  # another run's settings: refused
    code, _, err = _run(capsys, *argv)
    assert code == 0, err
    assert json.loads((tmp_path / "exits" / "add_exits.json").read_text())["resumed"] is True


def test_bad_models_are_one_line_and_nothing_is_written(tmp_path, minilm_path, minilm_tokenizer, capsys):
    _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer)
    (tmp_path / "texts.txt").write_text("a fine film\ndull\n")
    PabeeForSequenceClassification.from_classifier(tmp_path / "plain").save_pretrained(tmp_path / "pabee")
    broken = tmp_path / "broken"
    _tiny_bert_classifier(broken, minilm_tokenizer)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, broken / "model.safetensors")
    from transformers import GPT2Config, GPT2ForSequenceClassification

    GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    cases = {
        str(minilm_path): "is not a sequence classifier (its config names BertModel)",
        str(tmp_path / "pabee"): "is already a PABEE model",
        str(tmp_path / "gpt2"): "no adapter for 'gpt2'",
        str(broken): "weights missing from the checkpoint: classifier.bias",
        str(tmp_path / "nowhere"): "no Hugging Face model there",
    }
    capsys.readouterr()  # the set-up's progress bars
    for model, message in cases.items():
        out = tmp_path / "out"
        code, _, err = _run(capsys, "--model", model, "--output_dir", str(out), "--input_file",
                            str(tmp_path / "texts.txt"))  # fmt: skip
        last = err.strip().splitlines()[-1]  # after transformers' own loading bar, where a model was read
        assert code == 2 and message in last and last.startswith("pabee add-exits: error:"), err
        assert "Traceback" not in err and err.count("error") == 1
        assert not out.exists()


def test_an_exported_add_exits_model_answers_as_the_classifier(tmp_path, minilm_tokenizer, sentences):
    pytest.importorskip("onnxruntime")
    from pabee import ExitSpec, infer, load_runtime
    from pabee.onnx_export import export_onnx

    original = _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer)
    model = PabeeForSequenceClassification.from_classifier(tmp_path / "plain")
    model.save_pretrained(tmp_path / "exits")
    minilm_tokenizer.save_pretrained(tmp_path / "exits")
    runtime = load_runtime(export_onnx(tmp_path / "exits", tmp_path / "onnx"))
    batch = dict(minilm_tokenizer(sentences[:16], padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = original(**batch).logits
        torch.testing.assert_close(infer(runtime, batch, None).logits, reference, rtol=0, atol=1e-4)
        spec = ExitSpec("patience", patience=1)
        assert torch.equal(infer(runtime, batch, spec).exit_layers, model(**batch, patience=1).exit_layers)


def test_a_regression_classifier_certifies_among_the_rules_it_can_use(tmp_path, minilm_tokenizer, sentences, capsys):
    _tiny_bert_classifier(tmp_path / "plain", minilm_tokenizer, num_labels=1)
    code, _, err = _certified_run(tmp_path, sentences, capsys, texts=200, epochs=2, bound=20)
    assert code == 0, err
    report = json.loads((tmp_path / "exits" / "calibration.json").read_text())
    assert {row["criterion"] for row in report["rows"]} == {"patience"}  # confidence needs classes: left out
