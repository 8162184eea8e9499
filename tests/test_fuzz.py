"""Fuzzing `pabee serve`: the request parser under any JSON or bytes (hypothesis), the HTTP API under bodies,
headers and paths generated from its OpenAPI schema, valid and invalid (schemathesis): never a 5xx.

Texts draw from every code point, lone surrogates included (hypothesis' default text leaves them out, and they are
what broke whole micro-batches), plus the odd ones: NUL, noncharacters, BOM, bidi overrides, combining marks."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from pabee.bodies import RequestError, parse_predict_body
from pabee.pipeline import pipeline
from pabee.server import create_app

MAX_TEXTS, MAX_CHARS = 4, 50

ODD = ["\x00", "\ufffe", "\uffff", "\ufeff", "\u202e", "\u0301", "\u2028", "\U0010ffff", "\U000e0001", "\r"]
# Every code point but surrogates, the odd ones often; then a lone surrogate somewhere in a quarter of the texts
# (joined by hand: hypothesis' st.text leaves surrogates out, and mixed into its alphabet they came up in 1 of 300).
valid_texts = st.lists(st.characters(exclude_categories=["Cs"]) | st.sampled_from(ODD), max_size=(MAX_CHARS - 1) // 2)
valid_texts = valid_texts.map("".join)
surrogates = st.characters(categories=["Cs"])
texts = st.one_of(valid_texts, valid_texts, valid_texts, st.tuples(valid_texts, surrogates, valid_texts).map("".join))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
items = texts | st.tuples(texts, texts).map(list)


def has_surrogate(item: str | list[str]) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for part in ([item] if isinstance(item, str) else item) for c in part)


def parse(body: bytes) -> list | RequestError:
    try:
        return parse_predict_body(body, MAX_TEXTS, MAX_CHARS).examples
    except RequestError as error:
        return error


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries({"texts": json_values}),
        st.fixed_dictionaries({"texts": st.lists(json_values, max_size=6)}),
    )
)
def test_any_json_is_parsed_or_refused_with_a_4xx(value):
    result = parse(json.dumps(value).encode())
    if isinstance(result, RequestError):
        assert result.status in (400, 413, 422) and result.message
    else:
        assert 1 <= len(result) <= MAX_TEXTS
        assert all(isinstance(t, str) and (p is None or isinstance(p, str)) for t, p in result)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_parsed_or_refused_with_a_4xx(body):
    result = parse(body)
    assert not isinstance(result, RequestError) or result.status in (400, 413, 422)


@settings(max_examples=300, deadline=None)
@given(st.lists(items, min_size=1, max_size=MAX_TEXTS))
def test_every_valid_request_gives_back_exactly_its_texts_and_a_lone_surrogate_is_a_422(request_texts):
    result = parse(json.dumps({"texts": request_texts}).encode())  # ensure_ascii: a lone surrogate as \\udXXX
    bad = [i for i, item in enumerate(request_texts) if has_surrogate(item)]
    if bad:
        assert isinstance(result, RequestError) and result.status == 422
        assert result.message.startswith(f"texts[{bad[0]}]") and "lone surrogate" in result.message
    else:
        assert result == [(t, None) if isinstance(t, str) else (t[0], t[1]) for t in request_texts]


@settings(max_examples=100, deadline=None)
@given(st.lists(items, min_size=1, max_size=MAX_TEXTS), st.integers(0, MAX_TEXTS - 1), st.integers(1, 30))
def test_a_text_one_character_too_long_is_413_wherever_it_is(request_texts, position, extra):
    request_texts = list(request_texts)
    request_texts[position % len(request_texts)] = "x" * (MAX_CHARS + extra)
    result = parse(json.dumps({"texts": request_texts}).encode())
    assert isinstance(result, RequestError) and result.status == 413


@pytest.fixture(scope="module")
def fuzzed_app(model_dir, one_torch_thread):
    """The tiny model's app behind a test client, for the whole module (hypothesis calls a test many times)."""
    from fastapi.testclient import TestClient

    app = create_app(pipeline(model_dir), max_texts_per_request=MAX_TEXTS, max_text_chars=MAX_CHARS, threads=1)
    with TestClient(app) as client:
        yield client


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(items, min_size=1, max_size=MAX_TEXTS))
def test_any_code_points_through_the_app_are_answered_or_a_422_never_a_5xx(fuzzed_app, request_texts):
    body = json.dumps({"texts": request_texts}).encode()
    response = fuzzed_app.post("/predict", content=body, headers={"content-type": "application/json"})
    if any(has_surrogate(item) for item in request_texts):
        assert response.status_code == 422 and "lone surrogate" in response.json()["detail"]
    else:
        assert response.status_code == 200 and len(response.json()["predictions"]) == len(request_texts)


@pytest.fixture
def api_schema(model_dir, one_torch_thread):
    """The tiny model's app, reached over ASGI (schemathesis runs its lifespan, and ends it with the test), with
    small limits to hit."""
    app = create_app(pipeline(model_dir), max_texts_per_request=MAX_TEXTS, max_text_chars=MAX_CHARS, threads=1)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_generated_from_the_openapi_schema_gets_a_5xx(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "GET /health", "GET /metrics"}
    statuses: dict[int, int] = {}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.label != "POST /predict":
            continue  # nothing to make invalid in a GET without parameters

        @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call()
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        call()
    assert statuses and max(statuses) < 500
    if mode == GenerationMode.POSITIVE:
        assert statuses.get(200, 0) > 0  # valid bodies were answered, not just refused
    else:
        assert any(400 <= status < 500 for status in statuses)
