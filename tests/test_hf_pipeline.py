"""The registered `transformers` task "early-exit-classification" answers like `pabee.pipeline`."""

from __future__ import annotations

import pytest
import transformers

import pabee
from pabee.glue import get_task, read_glue_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ours(model_dir):
    return pabee.pipeline(model_dir)


def assert_same(got: list[dict], expected: list[dict]) -> None:
    assert [(a["label"], a["exit_layer"]) for a in got] == [(a["label"], a["exit_layer"]) for a in expected]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in expected], abs=1e-5)


@pytest.mark.parametrize("batch_size", [1, 8])
def test_the_task_answers_like_pabee_pipeline(model_dir, ours, sst2_dev_sentences, batch_size):
    classify = transformers.pipeline("early-exit-classification", model=model_dir, patience=1, device="cpu")
    assert isinstance(classify, pabee.EarlyExitClassificationPipeline)
    expected = ours(sst2_dev_sentences, patience=1)
    assert len({a["exit_layer"] for a in expected}) > 1  # exits vary, so batching is really checked
    assert_same(classify(sst2_dev_sentences, batch_size=batch_size), expected)
    assert_same(classify(sst2_dev_sentences[:4], patience=None), expected[:4])  # None keeps the pipeline's
    full = classify(sst2_dev_sentences[:8], patience=0, batch_size=batch_size)  # a per-call setting wins
    assert {a["exit_layer"] for a in full} == {ours.num_layers}


def test_pairs_top_k_and_plain_text_classification(model_dir, ours, glue_dir):
    rows = read_glue_tsv(get_task("RTE"), glue_dir / "RTE" / "dev.tsv")[:6]
    pairs = [{"text": r["text"], "text_pair": r["text_pair"]} for r in rows]
    classify = transformers.pipeline("early-exit-classification", model=model_dir, device="cpu")
    assert_same(classify(pairs), ours(pairs))
    every_label = classify(pairs[0], top_k=None)
    assert {a["label"] for a in every_label} == set(ours.labels)
    assert len({a["exit_layer"] for a in every_label}) == 1
    assert sum(a["score"] for a in every_label) == pytest.approx(1.0, abs=1e-5)
    plain = transformers.pipeline("text-classification", model=model_dir, device="cpu")
    assert [a["label"] for a in plain(pairs, truncation=True, max_length=128)] == [a["label"] for a in ours(pairs)]
