"""`pabee.pipeline`: its answers equal the model's own, one example at a time, for every input form."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import save_tiny_text_model

from pabee import ExitSpec, build_criterion, exit_spec_from
from pabee.errors import PabeeError
from pabee.glue import get_task, read_glue_tsv
from pabee.pipeline import PabeePipeline, pipeline, plan_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def classify(model_dir):
    return pipeline(model_dir, batch_size=8)


@pytest.fixture(scope="module")
def rte_pairs(glue_dir) -> list[tuple[str, str]]:
    rows = read_glue_tsv(get_task("RTE"), glue_dir / "RTE" / "dev.tsv")[:24]
    return [(row["text"], row["text_pair"]) for row in rows]


def model_answer(pipe: PabeePipeline, text: str, pair: str | None = None, **options) -> tuple[torch.Tensor, int]:
    """The model itself on one unpadded example: its logits and exit layer."""
    encoded = pipe.tokenizer(text, pair, truncation=True, max_length=pipe.max_length, return_tensors="pt")
    with torch.inference_mode():
        out = pipe.model(**encoded, **options)
    return out.logits[0], int(out.exit_layers[0])


def assert_same_as_model(pipe: PabeePipeline, examples, answers, **options) -> None:
    assert len(answers) == len(examples)
    for example, answer in zip(examples, answers, strict=True):
        text, pair = (example, None) if isinstance(example, str) else example
        logits, exit_layer = model_answer(pipe, text, pair, **options)
        probs = torch.softmax(logits, dim=-1)
        assert answer["exit_layer"] == exit_layer
        assert answer["label"] == pipe.model.config.id2label[int(probs.argmax())]
        assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def test_pipeline_is_part_of_the_public_api():
    import pabee

    assert pabee.pipeline is pipeline and pabee.PabeePipeline is PabeePipeline
    assert {"PabeePipeline", "pipeline"} <= set(pabee.__all__)


@pytest.mark.parametrize("patience", [0, 1, 2])
def test_answers_equal_the_model_one_by_one(classify, sst2_dev_sentences, patience):
    answers = classify(sst2_dev_sentences, patience=patience)
    assert_same_as_model(classify, sst2_dev_sentences, answers, patience=patience)
    layers = {a["exit_layer"] for a in answers}
    if patience == 0:
        assert layers == {classify.num_layers}
    if patience == 1:  # exits and labels vary, so the comparison above covers the batching and reordering
        assert len(layers) > 1 and len({a["label"] for a in answers}) == 2


def test_text_pairs_and_mixed_inputs(classify, rte_pairs, sst2_dev_sentences):
    pair_answers = classify(rte_pairs)
    assert_same_as_model(classify, rte_pairs, pair_answers)
    mixed = [x for duo in zip(sst2_dev_sentences[:12], rte_pairs[:12], strict=True) for x in duo]
    assert_same_as_model(classify, mixed, classify(mixed))
    as_dicts = [{"text": a, "text_pair": b} for a, b in rte_pairs[:5]]
    assert classify(as_dicts) == pair_answers[:5]


def test_one_input_gives_one_answer_and_a_list_gives_a_list(classify, rte_pairs):
    one = classify("a gripping, funny film")
    assert set(one) == {"label", "score", "exit_layer"} and one["label"] in ("negative", "positive")
    assert classify(["a gripping, funny film"]) == [one]
    assert classify(rte_pairs[0]) == classify([rte_pairs[0]])[0]  # a tuple of two strings is one pair
    assert len(classify(["first", "second"])) == 2  # a list of two strings is two inputs
    assert classify([]) == []


def test_batch_size_and_order_do_not_change_answers(classify, sst2_dev_sentences):
    big = classify(sst2_dev_sentences, batch_size=64)
    small = classify(sst2_dev_sentences, batch_size=1)
    reverse = classify(sst2_dev_sentences[::-1], batch_size=5)[::-1]
    for other in (small, reverse):
        assert [a["exit_layer"] for a in other] == [a["exit_layer"] for a in big]
        assert [a["label"] for a in other] == [a["label"] for a in big]
        assert [a["score"] for a in other] == pytest.approx([a["score"] for a in big], abs=1e-5)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (["fine", "ok \ud800 text"], r"Input 1: character 3 is a lone surrogate U\+D800"),
        ([("a premise", "\udfff")], r"Input 0: text_pair: character 0 is a lone surrogate U\+DFFF"),
    ],
)
def test_a_text_that_is_not_unicode_is_named_not_a_tokenizer_type_error(classify, inputs, message):
    with pytest.raises(ValueError, match=message):
        classify(inputs)
    assert classify(["fine", "ok \ufffe\x00 text"])[1]["exit_layer"] >= 1  # odd but valid code points are text


def test_batches_are_planned_to_waste_little_padding():
    assert plan_batches([5, 5, 5, 5, 50], max_batch_size=8, overhead=10) == [(0, 4), (4, 5)]
    assert plan_batches([5, 5, 5, 5, 6], max_batch_size=8, overhead=10) == [(0, 5)]
    assert [end - start for start, end in plan_batches([1] * 10, max_batch_size=4, overhead=1e9)] == [2, 4, 4]
    assert plan_batches([1, 2, 3], max_batch_size=8, overhead=0) == [(0, 1), (1, 2), (2, 3)]
    assert plan_batches([], max_batch_size=8, overhead=10) == []
    lengths = sorted(torch.randint(2, 60, (100,), generator=torch.Generator().manual_seed(0)).tolist())
    ranges = plan_batches(lengths, max_batch_size=16, overhead=32)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(100))
    assert all(0 < end - start <= 16 for start, end in ranges)
    cost = sum(32 + (end - start) * lengths[end - 1] for start, end in ranges)
    fixed = sum(32 + len(lengths[i : i + 16]) * lengths[i : i + 16][-1] for i in range(0, 100, 16))
    assert cost < fixed


def test_long_texts_are_truncated_to_max_length(model_dir):
    pipe = pipeline(model_dir, max_length=16)
    text = " ".join(f"word{i}" for i in range(300))
    assert pipe.max_length == 16
    assert_same_as_model(pipe, [text], pipe([text]))
    assert len(pipe.tokenize([(text, None)])[0]["input_ids"]) == 16
    assert pipeline(model_dir, max_length=4096).max_length == 128  # capped at the model's positions


def test_regression_answers_are_the_raw_value(tmp_path, minilm_tokenizer, sst2_dev_sentences):
    pipe = pipeline(save_tiny_text_model(tmp_path, minilm_tokenizer, num_labels=1, regression_threshold=0.01))
    answers = pipe(sst2_dev_sentences[:16])
    for text, answer in zip(sst2_dev_sentences[:16], answers, strict=True):
        logits, exit_layer = model_answer(pipe, text)
        assert answer["label"] is None and answer["exit_layer"] == exit_layer
        assert answer["score"] == pytest.approx(float(logits[0]), abs=1e-5)


def test_multi_label_answers_list_the_labels_above_one_half(model_dir):
    model = pipeline(model_dir).model
    model.config.problem_type = "multi_label_classification"  # read when a pipeline is made
    pipe = pipeline(model, pipeline(model_dir).tokenizer)
    answers = pipe.format(torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, -3.0]]), torch.tensor([1, 2, 4]))
    assert [a["label"] for a in answers] == [["negative"], ["negative", "positive"], []]
    assert answers[1]["score"] == pytest.approx([torch.sigmoid(torch.tensor(0.5)).item(), 0.9526], abs=1e-4)
    assert [a["exit_layer"] for a in answers] == [1, 2, 4]


def test_exit_options_reach_the_engine_as_one_setting(model_dir, monkeypatch):
    """The engine gets one setting, built once per call from one `ExitSpec`: the model's own unless an option was
    set, for the pipeline or for one call."""
    pipeline_module = importlib.import_module("pabee.pipeline")  # `pabee.pipeline` is also the function
    pipe = pipeline(model_dir)
    own = pipe.model.config.exit_spec
    calls = []
    original = pipeline_module.infer

    def spy(runtime, inputs, setting=None, **kwargs):
        calls.append(setting)
        return original(runtime, inputs, setting, **kwargs)

    def built(spec: ExitSpec):
        return build_criterion(spec, pipe.model.config)

    monkeypatch.setattr(pipeline_module, "infer", spy)
    pipe(["a film"])
    assert calls[-1] == built(own)
    pipe(["a film"], patience=3)
    assert calls[-1] == built(exit_spec_from({"patience": 3}, own))
    fixed = pipeline(pipe.model, pipe.tokenizer, patience=2)
    fixed(["a film"])
    assert calls[-1] == built(exit_spec_from({"patience": 2}, own))
    fixed(["a film"], patience=0)
    assert calls[-1] == built(exit_spec_from({"patience": 0}, own))
    fixed(["a film"], exit_spec=ExitSpec("static", threshold=2))
    assert calls[-1] == built(ExitSpec("static", threshold=2))


def test_exit_criteria_and_the_layer_cap_reach_the_model(model_dir, sst2_dev_sentences):
    static = pipeline(model_dir, exit_criterion="static", exit_threshold=2)
    assert {a["exit_layer"] for a in static(sst2_dev_sentences)} == {2}
    plain = pipeline(model_dir)
    assert {a["exit_layer"] for a in plain(sst2_dev_sentences, patience=0, max_exit_layer=3)} == {3}
    options = {"exit_criterion": "confidence", "exit_threshold": 0.54}  # exits vary for this tiny model
    answers = plain(sst2_dev_sentences, **options)
    assert_same_as_model(plain, sst2_dev_sentences, answers, **options)
    assert len({a["exit_layer"] for a in answers}) > 1
    with pytest.raises(ValueError, match="exit_criterion='bogus' is unknown"):
        pipeline(model_dir, exit_criterion="bogus")


def test_bfloat16_and_eager_attention_load_and_batched_equals_one_by_one(model_dir, sst2_dev_sentences):
    fast = pipeline(model_dir, dtype="bfloat16", attn_implementation="eager")
    assert fast.model.dtype == torch.bfloat16
    assert fast.model.config.encoder_config._attn_implementation == "eager"
    batched = fast(sst2_dev_sentences, patience=1)
    for text, answer in zip(sst2_dev_sentences, batched, strict=True):
        logits, exit_layer = model_answer(fast, text, patience=1)
        probs = torch.softmax(logits.float(), dim=-1)
        assert answer["exit_layer"] == exit_layer
        assert answer["label"] == fast.model.config.id2label[int(probs.argmax())]
        assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-2)
    assert len({a["exit_layer"] for a in batched}) > 1


def test_bad_inputs_and_options_are_clear_errors(classify, model_dir, minilm_path, tmp_path):
    with pytest.raises(ValueError, match=r"must be a string or a \(text, text_pair\) pair of strings \(input 1\)"):
        classify(["fine", ("a", "b", "c")])
    with pytest.raises(ValueError, match=r"\(input 0\)"):
        classify([5])
    with pytest.raises(ValueError, match="Unknown exit option 'patiense'"):
        classify(["fine"], patiense=2)
    with pytest.raises(ValueError, match="patience=-1 is invalid"):
        pipeline(model_dir, patience=-1)  # checked when the pipeline is built, not on first use
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        pipeline(model_dir, batch_size=0)
    with pytest.raises(PabeeError, match="is not a model folder"):
        pipeline(tmp_path / "missing")
    with pytest.raises(PabeeError, match="holds a 'bert' model, not a PABEE model"):
        pipeline(minilm_path)
    with pytest.raises(ValueError, match="Give the tokenizer"):
        pipeline(classify.model)
    with pytest.raises(ValueError, match="dtype= applies when loading from a folder"):
        pipeline(classify.model, classify.tokenizer, dtype="bfloat16")
    with pytest.raises(PabeeError, match="Cannot load the model in .*dtype"):
        pipeline(model_dir, dtype="fp8")


@pytest.mark.slow
def test_trained_minilm_pipeline_equals_the_model(trained_minilm, minilm_tokenizer, sst2_dev_sentences):
    pipe = pipeline(trained_minilm, minilm_tokenizer, batch_size=16)
    for patience in (1, 2):
        answers = pipe(sst2_dev_sentences, patience=patience)
        assert_same_as_model(pipe, sst2_dev_sentences, answers, patience=patience)
        assert len({a["exit_layer"] for a in answers}) > 1
