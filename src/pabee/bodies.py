"""The request bodies the server takes, checked before anything is queued, in three shapes:

- pabee's own, `POST /predict`: `{"texts": ["a text", ["a premise", "a hypothesis"], ...]}`, optionally with
  `"exit"` (the request's own exit setting: the keywords of `pabee.settings`, or `"full"`) and
  `"return_exit_setting": true` (each answer says the setting it came from);
- text-embeddings-inference's, `POST /predict` too: `{"inputs": "a text"}`, `{"inputs": ["a premise",
  "a hypothesis"]}` (two strings: a pair, as TEI reads them), `{"inputs": ["a", "b", "c"]}` or
  `{"inputs": [["a premise", "a hypothesis"], ...]}`, with `raw_scores` (TEI's `truncate` and
  `truncation_direction` are accepted; texts are always truncated, longer part first);
- the Hugging Face Inference API's text classification, `POST /` (what `huggingface_hub.InferenceClient(
  base_url=...).text_classification(text)` sends): `{"inputs": "a text", "parameters": {"top_k": 2,
  "function_to_apply": "softmax"}}`, `inputs` also a list, or `{"text", "text_pair"}` mappings.

Every failure is a `RequestError` with the status to answer: 400 not JSON; 422 wrong shape or types, an unknown
field, an empty list, a text that is not Unicode; 413 too many texts or too long a text.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .pipeline import Example
from .rules import MULTI_LABEL
from .texts import text_problem

__all__ = [
    "FUNCTIONS",
    "Body",
    "RequestError",
    "label_scores",
    "parse_hf_body",
    "parse_predict_body",
    "shaped_answers",
]

FUNCTIONS = ("softmax", "sigmoid", "none")  # what `function_to_apply` may name (the transformers pipeline's)
PABEE_FIELDS = {"texts", "exit", "return_exit_setting"}
TEI_FIELDS = {"inputs", "raw_scores", "truncate", "truncation_direction"}
HF_FIELDS = {"inputs", "parameters", "options"}  # `options` (the hub's cache flags) means nothing here


class RequestError(Exception):
    """A bad request: answered with `status` and `{"detail": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Body:
    """A checked request: its texts, in which shape it came (`pabee`, `tei`, `hf`) and how to answer it."""

    examples: list[Example]
    shape: str = "pabee"
    exit: Any = None  # the request's own exit option as sent (the server checks it against its model)
    return_exit_setting: bool = False
    single: bool = False  # TEI and HF: one input, so one answer rather than a list of them
    top_k: int | None = None
    function_to_apply: str | None = None  # None: the model's own (softmax, sigmoid for multi-label, none)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string literal


def _check_item_count(body: bytes, max_texts: int) -> None:
    """413 for a body holding more JSON values than `max_texts` texts could, found without parsing it.

    Parsing builds every value: a million `{}` (3.7 MB) took 150 ms of the event loop and 90 MiB. A valid body
    has at most 2 separators per text outside its strings (between items, inside a pair) and at most 2 strings per
    text; byte counts (memchr speed) clear most bodies, and only a body with few strings is scanned string by
    string (many strings would make that scan the slow part). A few fields beside the texts are allowed for.
    """
    bound = 2 * max_texts + 16
    if body.count(b",") <= bound:
        return
    message = f"The body holds more JSON values than {max_texts} texts could; the limit is {max_texts} texts."
    if body.count(b'"') - body.count(b'\\"') > 2 * (2 * bound + 1):  # escaped quotes are not string ends
        raise RequestError(413, message)
    if _STRING.sub(b'""', body).count(b",") > bound:
        raise RequestError(413, message)


def _load(body: bytes, max_texts: int) -> dict[str, Any]:
    """The body as a JSON object (400 / 413 / 422 otherwise)."""
    _check_item_count(body, max_texts)
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"The body is not valid JSON: {error}.") from None
    except RecursionError:  # thousands of nested brackets: the parser gives up, and so do we
        raise RequestError(400, "The body is not valid JSON for this API: it is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'The body must be a JSON object like {"texts": ["a text", ...]}.')
    return payload


def _only(payload: Mapping[str, Any], allowed: set[str], shape: str) -> None:
    unknown = sorted(set(payload) - allowed)
    if unknown:
        fields = ", ".join(map(repr, sorted(allowed)))
        raise RequestError(
            422, f"Unknown field(s) {', '.join(map(repr, unknown))} in a {shape} body; it takes {fields}."
        )


def _flag(payload: Mapping[str, Any], name: str) -> bool:
    value = payload.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(422, f"'{name}' must be true or false.")
    return value


def parse_predict_body(body: bytes, max_texts: int, max_chars: int) -> Body:
    """A `POST /predict` body, pabee's shape (`texts`) or TEI's (`inputs`); `RequestError` says what is wrong."""
    payload = _load(body, max_texts)
    if "inputs" in payload and "texts" not in payload:
        _only(payload, TEI_FIELDS, "text-embeddings-inference /predict")
        single, items = _tei_items(payload["inputs"])
        examples = _examples(items, max_texts, max_chars, "inputs")
        return Body(examples, "tei", single=single, function_to_apply="none" if _flag(payload, "raw_scores") else None)
    _only(payload, PABEE_FIELDS, "/predict")
    texts = payload.get("texts")
    if not isinstance(texts, list):
        raise RequestError(422, "'texts' must be a list of strings or [text, text_pair] pairs.")
    exit_option = payload.get("exit")
    if exit_option is not None and not (exit_option == "full" or isinstance(exit_option, dict)):
        raise RequestError(422, '\'exit\' must be "full" or an object of exit options, e.g. {"patience": 2}.')
    examples = _examples(texts, max_texts, max_chars, "texts")
    return Body(examples, exit=exit_option, return_exit_setting=_flag(payload, "return_exit_setting"))


def parse_hf_body(body: bytes, max_texts: int, max_chars: int) -> Body:
    """A `POST /` body as the Hugging Face Inference API takes it for text classification."""
    payload = _load(body, max_texts)
    _only(payload, HF_FIELDS, "text classification")
    inputs = payload.get("inputs")
    single = isinstance(inputs, (str, dict))
    items = [inputs] if single else inputs
    if not isinstance(items, list):
        raise RequestError(422, '\'inputs\' must be a text, a {"text", "text_pair"} object, or a list of them.')
    items = [[item.get("text"), item.get("text_pair")] if isinstance(item, dict) else item for item in items]
    items = [item[0] if isinstance(item, list) and len(item) == 2 and item[1] is None else item for item in items]
    examples = _examples(items, max_texts, max_chars, "inputs")
    top_k, function = _parameters(payload.get("parameters"))
    return Body(examples, "hf", single=single, top_k=top_k, function_to_apply=function)


def _parameters(parameters: Any) -> tuple[int | None, str | None]:
    """`top_k` and `function_to_apply` of an HF body (None where not given)."""
    if parameters is None:
        return None, None
    if not isinstance(parameters, dict):
        raise RequestError(422, "'parameters' must be an object.")
    _only(parameters, {"top_k", "function_to_apply"}, "parameters")
    top_k, function = parameters.get("top_k"), parameters.get("function_to_apply")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise RequestError(422, f"'top_k' must be a whole number >= 1; got {top_k!r}.")
    if function is not None and function not in FUNCTIONS:
        raise RequestError(422, f"'function_to_apply' must be one of {', '.join(FUNCTIONS)}; got {function!r}.")
    return top_k, function


def _tei_items(inputs: Any) -> tuple[bool, list[Any]]:
    """TEI's `inputs` as (one input?, items): a text, a pair of two texts, or a list of texts or pairs."""
    if isinstance(inputs, str):
        return True, [inputs]
    if isinstance(inputs, list) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
        return True, [inputs]  # two texts are a pair, as TEI reads them
    if isinstance(inputs, list):
        return False, inputs
    raise RequestError(422, "'inputs' must be a text, a [text, text_pair] pair, or a list of texts or pairs.")


def _examples(items: list[Any], max_texts: int, max_chars: int, name: str) -> list[Example]:
    """Each item checked for its shape (422), size (413) and text (422), in that order over the whole list."""
    if not items:
        raise RequestError(422, f"'{name}' is empty; send at least one text.")
    if len(items) > max_texts:
        raise RequestError(413, f"{len(items)} texts in one request; the limit is {max_texts}.")
    examples = [_example(i, item, max_chars, name) for i, item in enumerate(items)]
    for i, example in enumerate(examples):  # after every size check: a 413 wherever the long text is
        _check_text(i, example, name)
    return examples


def _example(i: int, item: Any, max_chars: int, name: str) -> Example:
    """One item checked for its shape (422) and each part's length (413)."""
    if isinstance(item, str):
        parts = [item]
    elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
        parts = item
    else:
        raise RequestError(422, f"{name}[{i}] must be a string or a [text, text_pair] pair of two strings.")
    for j, part in enumerate(parts):
        if len(part) > max_chars:
            field = f"{name}[{i}]" if len(parts) == 1 else f"{name}[{i}][{j}]"
            raise RequestError(413, f"{field} has {len(part)} characters; the limit is {max_chars}.")
    return parts[0], parts[1] if len(parts) == 2 else None


def _check_text(i: int, example: Example, name: str) -> None:
    """422 naming a part that is not Unicode text: a lone surrogate escape is legal JSON, but the tokenizer would
    refuse it for the whole micro-batch, failing every request batched with this one."""
    for j, part in enumerate(example):
        if part is not None and (problem := text_problem(part)):
            field = f"{name}[{i}]" if example[1] is None else f"{name}[{i}][{j}]"
            raise RequestError(422, f"{field}: {problem}; send Unicode text (escapes \\ud800-\\udfff only in pairs).")


# --- answers, in the shape each kind of request expects -------------------------------------------------------


def shaped_answers(body: Body, answers: list[dict], labels: list[str] | None, problem: str) -> Any:
    """The response for `body`'s `answers` (each with its `_setting` and `_logits`, which only this strips):
    pabee's `{"predictions": [{"label", "score", "exit_layer"[, "exit_setting"]}]}`; TEI's list of
    `{"score", "label"}` per input, every label, best first (not wrapped for one input); the Inference API's list
    of `{"label", "score"}` lists, one per input, best first, `top_k` of them."""
    if body.shape == "pabee":
        return {"predictions": [_pabee(answer, body.return_exit_setting) for answer in answers]}
    scored = [
        label_scores(answer["_logits"], labels, problem, body.function_to_apply, body.top_k) for answer in answers
    ]
    if body.shape == "tei":
        scored = [[{"score": item["score"], "label": item["label"]} for item in items] for items in scored]
        return scored[0] if body.single else scored
    return scored


def _pabee(answer: dict, with_setting: bool) -> dict:
    public = {name: value for name, value in answer.items() if not name.startswith("_")}
    return {**public, "exit_setting": answer["_setting"].title} if with_setting else public


def label_scores(
    logits: list[float], labels: list[str] | None, problem: str, function: str | None, top_k: int | None
) -> list[dict]:
    """One answer's labels with their scores, best first, as transformers' text-classification pipeline gives
    them: softmax over the labels (sigmoid for multi-label, the value itself for regression) unless `function`
    names another, `top_k` of them (default: all)."""
    function = function or ("none" if labels is None else "sigmoid" if problem == MULTI_LABEL else "softmax")
    if function == "softmax":
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        scores = [e / sum(exps) for e in exps]
    elif function == "sigmoid":
        scores = [1 / (1 + math.exp(-x)) for x in logits]
    else:
        scores = list(logits)
    names = labels or [f"LABEL_{i}" for i in range(len(logits))]
    ranked = sorted(zip(names, scores, strict=True), key=lambda item: -item[1])
    return [{"label": name, "score": score} for name, score in ranked[:top_k]]
