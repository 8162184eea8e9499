"""Request bodies in their three shapes, and answers in the shape each expects."""

from __future__ import annotations

import json
import math

import pytest

from pabee import ExitSpec
from pabee.bodies import Body, RequestError, label_scores, parse_hf_body, parse_predict_body, shaped_answers


def _parse(parse, payload) -> Body | RequestError:
    try:
        return parse(json.dumps(payload).encode(), 4, 100)
    except RequestError as error:
        return error


def test_pabee_tei_and_inference_api_bodies_become_the_same_texts():
    ours = _parse(
        parse_predict_body, {"texts": ["a", ["b", "c"]], "exit": {"patience": 2}, "return_exit_setting": True}
    )
    assert ours == Body([("a", None), ("b", "c")], "pabee", {"patience": 2}, True)
    assert _parse(parse_predict_body, {"inputs": "a"}) == Body([("a", None)], "tei", single=True)
    assert _parse(parse_predict_body, {"inputs": ["a", "b"]}).examples == [("a", "b")]  # two texts: a pair
    assert _parse(parse_predict_body, {"inputs": ["a", "b", "c"]}).examples == [("a", None), ("b", None), ("c", None)]
    raw = _parse(parse_predict_body, {"inputs": [["a", "b"]], "raw_scores": True, "truncate": True})
    assert raw.examples == [("a", "b")] and raw.function_to_apply == "none" and not raw.single
    hub = _parse(parse_hf_body, {"inputs": "a", "parameters": {"top_k": 1, "function_to_apply": "sigmoid"}})
    assert hub == Body([("a", None)], "hf", single=True, top_k=1, function_to_apply="sigmoid")
    pairs = _parse(parse_hf_body, {"inputs": [{"text": "a", "text_pair": "b"}, {"text": "c"}], "options": {}})
    assert pairs.examples == [("a", "b"), ("c", None)]


@pytest.mark.parametrize(
    ("parse", "payload", "status", "message"),
    [
        (parse_predict_body, {"texts": ["a"], "inputs": "b"}, 422, "Unknown field(s) 'inputs'"),
        (parse_predict_body, {"inputs": "a", "parameters": {}}, 422, "Unknown field(s) 'parameters'"),
        (parse_predict_body, {"texts": ["a"], "exit": 3}, 422, "'exit' must be \"full\" or an object"),
        (parse_predict_body, {"texts": ["a"], "return_exit_setting": "yes"}, 422, "must be true or false"),
        (parse_predict_body, {"inputs": 3}, 422, "'inputs' must be a text"),
        (parse_predict_body, {"inputs": ["a"] * 5}, 413, "5 texts in one request; the limit is 4"),
        (parse_hf_body, {"inputs": "a", "parameters": {"top_k": 0}}, 422, "'top_k' must be a whole number >= 1"),
        (parse_hf_body, {"inputs": "a", "parameters": {"temperature": 2}}, 422, "Unknown field(s) 'temperature'"),
        (parse_hf_body, {"inputs": [{"text": 1}]}, 422, "inputs[0] must be a string"),
        (parse_hf_body, {"inputs": "x" * 101}, 413, "inputs[0] has 101 characters; the limit is 100"),
    ],
)
def test_a_bad_body_of_any_shape_is_a_4xx_naming_the_field(parse, payload, status, message):
    error = _parse(parse, payload)
    assert isinstance(error, RequestError) and error.status == status and message in error.message


def test_label_scores_follow_the_text_classification_pipeline():
    logits, labels = [2.0, 0.0, -1.0], ["a", "b", "c"]
    ranked = label_scores(logits, labels, "single_label_classification", None, None)
    total = sum(math.exp(x) for x in logits)
    assert [r["label"] for r in ranked] == ["a", "b", "c"] and ranked[0]["score"] == pytest.approx(math.exp(2) / total)
    assert label_scores(logits, labels, "single_label_classification", None, 1) == ranked[:1]
    sig = label_scores([0.0, 3.0], ["x", "y"], "multi_label_classification", None, None)
    assert sig == [{"label": "y", "score": pytest.approx(1 / (1 + math.exp(-3)))}, {"label": "x", "score": 0.5}]
    assert label_scores([1.5, -2.0], ["x", "y"], "single_label_classification", "none", None)[0]["score"] == 1.5
    assert label_scores([3.7], None, "regression", None, None) == [{"label": "LABEL_0", "score": 3.7}]


def test_answers_take_the_shape_of_their_request():
    answer = {"label": "b", "score": 0.7, "exit_layer": 2, "_setting": ExitSpec("patience", patience=2),
              "_logits": [0.0, 0.85]}  # fmt: skip
    ours = shaped_answers(
        Body([("t", None)], return_exit_setting=True), [answer], ["a", "b"], "single_label_classification"
    )
    assert ours == {"predictions": [{"label": "b", "score": 0.7, "exit_layer": 2, "exit_setting": "patience 2"}]}
    tei = shaped_answers(Body([("t", None)], "tei", single=True), [answer], ["a", "b"], "single_label_classification")
    assert [item["label"] for item in tei] == ["b", "a"] and list(tei[0]) == ["score", "label"]
    hub = shaped_answers(
        Body([("t", None)] * 2, "hf", top_k=1), [answer, answer], ["a", "b"], "single_label_classification"
    )
    assert [[item["label"] for item in items] for items in hub] == [["b"], ["b"]]
