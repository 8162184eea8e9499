"""`pabee serve` under overload, strangers and hostile bodies: 503 at once, 504 on time, 401 without the key."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import metric_samples

from pabee.arguments import ServeArguments
from pabee.cli import main
from pabee.pipeline import pipeline
from pabee.serve import run_server
from pabee.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def blocked_pipe(model_dir):
    """The tiny model's pipeline whose forwards wait until the test sets `pipe.release`."""
    pipe = pipeline(model_dir)
    working, pipe.release, pipe.started = pipe.run_batches, threading.Event(), threading.Event()

    def run_batches(examples, **kwargs):
        if examples != [("warm up", None)]:
            pipe.started.set()
            assert pipe.release.wait(30), "the test never released the forward"
        return working(examples, **kwargs)

    pipe.run_batches = run_batches
    return pipe


async def _serve(app, scenario):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            return await scenario(client, app.state.batcher)


async def _until(condition, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never reached the expected state")


def test_a_full_queue_answers_503_with_retry_after_at_once(blocked_pipe):
    app = create_app(
        blocked_pipe, max_batch_size=2, max_wait_ms=0, max_texts_per_request=4, max_queue=5, api_key="k", threads=1
    )
    key = {"Authorization": "Bearer k"}

    async def scenario(client, batcher):
        post = lambda texts, headers=key: client.post("/predict", json={"texts": texts}, headers=headers)  # noqa: E731
        running = asyncio.ensure_future(post(["a", "b"]))
        await _until(blocked_pipe.started.is_set)
        queued = [asyncio.ensure_future(post([f"q{i}", "x"])) for i in range(2)]
        await _until(lambda: batcher.queued == 4)
        too_big = await asyncio.wait_for(post(["does", "not fit"]), 5)  # 4 + 2 > 5: refused by the batcher
        queued.append(asyncio.ensure_future(post(["fits"])))
        await _until(lambda: batcher.queued == 5)
        refused = await asyncio.wait_for(post(["one more"]), 5)  # the queue is full: refused before parsing
        stranger = await asyncio.wait_for(post(["one more"], headers={}), 5)
        blocked_pipe.release.set()
        answered = await asyncio.gather(running, *queued)
        return too_big, refused, stranger, answered, (await client.get("/metrics", headers=key)).text

    too_big, refused, stranger, answered, metrics = asyncio.run(_serve(app, scenario))
    for response, queued in ((too_big, 4), (refused, 5)):
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
        assert f"{queued} texts are queued and the limit is 5" in response.json()["detail"]
    assert stranger.status_code == 401  # not told how busy the server is
    assert [r.status_code for r in answered] == [200, 200, 200, 200]
    samples = metric_samples(metrics)
    assert samples[("pabee_rejected_total", ())] == 2
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "503")))] == 2
    assert samples[("pabee_queued_texts", ())] == 0


def test_a_request_past_its_timeout_gets_504_and_its_queued_texts_are_dropped(blocked_pipe):
    app = create_app(blocked_pipe, max_batch_size=2, max_wait_ms=0, request_timeout=0.3, threads=1)

    async def scenario(client, batcher):
        running = asyncio.ensure_future(client.post("/predict", json={"texts": ["a", "b"]}))
        await _until(blocked_pipe.started.is_set)
        queued = await client.post("/predict", json={"texts": ["c", "d", "e"]})  # waits behind the running one
        answers = [await running, queued, batcher.queued]
        blocked_pipe.release.set()
        answers.append(await client.post("/predict", json={"texts": ["after"]}))
        return answers, (await client.get("/metrics")).text

    (running, queued, left_in_queue, after), metrics = asyncio.run(_serve(app, scenario))
    assert running.status_code == 504 and queued.status_code == 504
    assert "--request_timeout 0.3 s" in queued.json()["detail"]
    assert left_in_queue == 0 and after.status_code == 200
    samples = metric_samples(metrics)
    assert samples[("pabee_timeouts_total", ())] == 2
    assert samples[("pabee_dropped_texts_total", ())] == 3  # the queued request's texts never ran
    assert samples[("pabee_texts_total", ())] == 3  # the started batch and "after" ran


def test_with_an_api_key_predict_and_metrics_need_it_and_health_stays_open(model_dir):
    key = "s3cret-key"
    with TestClient(create_app(pipeline(model_dir), api_key=key, threads=1)) as client:
        body = {"texts": ["a text"]}
        assert client.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"}):
            response = client.post("/predict", json=body, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]
            assert client.get("/metrics", headers=headers).status_code == 401
        good = {"Authorization": f"Bearer {key}"}
        assert client.post("/predict", json=body, headers=good).status_code == 200
        metrics = client.get("/metrics", headers=good)
        assert metrics.status_code == 200 and key not in metrics.text
        assert key not in client.get("/health").text
    samples = metric_samples(metrics.text)
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "401")))] == 3


def test_layers_computed_counts_each_texts_exit_layer(model_dir, sst2_dev_sentences):
    pipe = pipeline(model_dir)
    with TestClient(create_app(pipe, threads=1)) as client:
        client.post("/predict", json={"texts": sst2_dev_sentences[:12]})
        samples = metric_samples(client.get("/metrics").text)
    assert samples[("pabee_layers_computed_total", ())] == sum(a["exit_layer"] for a in pipe(sst2_dev_sentences[:12]))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"texts": ' + b"[" * 100_000, "nested too deeply"),
    ],
)
def test_deeply_nested_json_is_a_400_not_a_crash(model_dir, body, message):
    app = create_app(pipeline(model_dir), max_texts_per_request=64, max_text_chars=5000, threads=1)
    with TestClient(app) as client:
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400 and message in response.json()["detail"]


def test_an_oversized_streamed_body_gets_413_after_being_read(model_dir):
    app = create_app(pipeline(model_dir), max_texts_per_request=2, max_text_chars=10, threads=1)

    def chunks():  # no content-length: the server finds out while reading
        for _ in range(100):
            yield b"x" * 10_000

    with TestClient(app) as client:
        response = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and "the limit is" in response.json()["detail"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max_queue", "8"], "--max_queue=8 is smaller than --max_texts_per_request=64"),
        (["--request_timeout", "0"], "--request_timeout=0.0 is invalid"),
        (["--api_key", " "], "--api_key is empty"),
    ],
)
def test_bad_limits_are_one_line_and_exit_code_2(argv, message, capsys):
    assert main(["serve", "--model", "m", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_the_api_key_comes_from_the_environment_when_not_given(monkeypatch):
    monkeypatch.setenv("PABEE_API_KEY", "from-env")
    assert ServeArguments(model="m").api_key == "from-env"
    assert ServeArguments(model="m", api_key="flag").api_key == "flag"


@pytest.mark.parametrize(("host", "key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", "k", False)])
def test_serving_a_non_local_address_without_a_key_warns(monkeypatch, capsys, host, key, warned):
    monkeypatch.delenv("PABEE_API_KEY", raising=False)
    monkeypatch.setattr("uvicorn.run", lambda app, **options: None)
    run_server(ServeArguments(model="m", host=host, api_key=key), app_factory=lambda args: object())
    assert ("without an API key" in capsys.readouterr().err) == warned


def test_the_default_host_is_local_only():
    assert ServeArguments(model="m").host == "127.0.0.1"


# --- clients that hang up, floods, strangers and browsers (issue 27) ---------------------------------------------


async def _post_then_hang_up(app, texts: list[str], hang_up: asyncio.Event) -> list[dict]:
    """POST /predict straight over ASGI; the client disconnects once `hang_up` is set. The messages sent back."""
    messages = [{"type": "http.request", "body": json.dumps({"texts": texts}).encode(), "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await hang_up.wait()
        return {"type": "http.disconnect"}

    sent = []

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"test"), (b"content-type", b"application/json")]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http"}
    scope |= {"path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "", "headers": headers}
    await app(scope | {"client": ("127.0.0.1", 1), "server": ("test", 80)}, receive, send)
    return sent


def test_a_client_that_hangs_up_takes_its_queued_texts_with_it(blocked_pipe):
    app = create_app(blocked_pipe, max_batch_size=2, max_wait_ms=0, threads=1)
    ran = []
    working = blocked_pipe.run_batches
    blocked_pipe.run_batches = lambda examples, **kw: (ran.extend(t for t, _ in examples), working(examples, **kw))[1]

    async def scenario(client, batcher):
        running = asyncio.ensure_future(client.post("/predict", json={"texts": ["a", "b"]}))
        await _until(blocked_pipe.started.is_set)
        hang_up = asyncio.Event()
        leaving = asyncio.ensure_future(_post_then_hang_up(app, ["gone 1", "gone 2", "gone 3"], hang_up))
        await _until(lambda: batcher.queued == 3)
        hang_up.set()
        try:
            await asyncio.wait_for(leaving, 5)
        finally:
            queued_after = batcher.queued
            blocked_pipe.release.set()
        await running
        after = await client.post("/predict", json={"texts": ["after"]})
        return queued_after, after, (await client.get("/metrics")).text

    queued_after, after, metrics = asyncio.run(_serve(app, scenario))
    assert queued_after == 0 and after.status_code == 200
    assert not [text for text in ran if text.startswith("gone")]  # never computed for nobody
    samples = metric_samples(metrics)
    assert samples[("pabee_dropped_texts_total", ())] == 3
    assert samples[("pabee_client_disconnects_total", ())] == 1
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "499")))] == 1


def test_connections_are_capped_and_shutdown_waits_as_long_as_a_request_may_take(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **options: seen.update(options))
    run_server(ServeArguments(model="m"), app_factory=lambda args: object())
    assert seen["limit_concurrency"] == 256 and seen["timeout_graceful_shutdown"] == 60.0
    run_server(ServeArguments(model="m", max_connections=8, graceful_timeout=10), app_factory=lambda args: object())
    assert seen["limit_concurrency"] == 8 and seen["timeout_graceful_shutdown"] == 10
    assert "--graceful_timeout 10 s is shorter than --request_timeout 60 s" in capsys.readouterr().err


def test_a_body_of_a_million_empty_objects_is_refused_without_being_parsed():
    """3.7 MB that json.loads turns into a million dicts: 150 ms of the event loop and 90 MiB, before the 413."""
    import time
    import tracemalloc

    from pabee.bodies import RequestError, parse_predict_body

    body = b'{"texts": [' + b",".join([b"{}"] * 1_000_000) + b"]}"
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(RequestError) as refused:
        parse_predict_body(body, 64, 5000)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert refused.value.status == 413 and "the limit is 64 texts" in refused.value.message
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MiB"
    assert seconds < 0.1, f"{seconds * 1000:.0f} ms"  # ~5 ms here; parsing took 150 ms


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"texts": ["\u00e9a, b" * 800] * 64}).encode(),  # many commas and escapes inside the strings
        json.dumps({"texts": [['x\\", y' * 700, "z, " * 1600]] * 64}).encode(),
        b'{"texts": ["a", "b"], "options": ["x", "y", "z"]}',
    ],
)
def test_cheap_refusals_do_not_refuse_valid_bodies_with_many_commas_in_their_texts(body):
    from pabee.bodies import RequestError, parse_predict_body

    try:
        parse_predict_body(body, 64, 5000)
    except RequestError as error:
        assert error.status == 422 and "Unknown field" in error.message


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        (None, 415),
        ("text/plain", 415),  # what a web page may send cross-site without a preflight
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/json", 200),
        ("Application/JSON; charset=utf-8", 200),
    ],
)
def test_predict_takes_only_json_so_a_web_page_cannot_post_without_a_preflight(model_dir, content_type, status):
    headers = {"content-type": content_type} if content_type else {}
    with TestClient(create_app(pipeline(model_dir), threads=1)) as client:
        response = client.post("/predict", content=b'{"texts": ["a text"]}', headers=headers)
    assert response.status_code == status
    if status == 415:
        assert "Content-Type: application/json" in response.json()["detail"]


def test_allowed_hosts_refuse_other_host_headers(model_dir):
    app = create_app(pipeline(model_dir), allowed_hosts=["localhost", "127.0.0.1"], threads=1)
    with TestClient(app, base_url="http://localhost") as client:
        assert client.get("/health").status_code == 200
        assert client.post("/predict", json={"texts": ["a"]}).status_code == 200
        rebound = {"host": "attacker.example"}  # a DNS name pointed at 127.0.0.1 after the page loaded
        assert client.post("/predict", json={"texts": ["a"]}, headers=rebound).status_code == 400
        assert client.get("/health", headers=rebound).status_code == 400
    assert ServeArguments(model="m", allowed_hosts="localhost, 127.0.0.1").host_list == ["localhost", "127.0.0.1"]


def test_with_an_api_key_the_api_description_needs_it_too(model_dir):
    with TestClient(create_app(pipeline(model_dir), api_key="k3y", threads=1)) as client:
        assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 401
        schema = client.get("/openapi.json", headers={"Authorization": "Bearer k3y"})
        assert schema.status_code == 200 and "/predict" in schema.json()["paths"]
    with TestClient(create_app(pipeline(model_dir), threads=1)) as client:  # without a key, all open as before
        assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_health_shows_no_file_paths(model_dir):
    with TestClient(create_app(pipeline(model_dir), model_name=str(model_dir), threads=1)) as client:
        health = client.get("/health")
    assert health.json()["model"] == model_dir.name and str(model_dir.parent) not in health.text
    with TestClient(create_app(pipeline(model_dir), threads=1)) as client:  # the name from the config
        assert str(model_dir.parent) not in client.get("/health").text


@pytest.mark.parametrize("key", ["clé-secrète", "two words", "tab\tkey"])
def test_a_key_no_http_client_can_send_is_refused_at_start(key, model_dir, capsys, monkeypatch):
    monkeypatch.setattr("uvicorn.run", lambda *args, **options: pytest.fail("the server started with that key"))
    assert main(["serve", "--model", str(model_dir), "--api_key", key]) == 2
    err = capsys.readouterr().err.strip()
    assert "--api_key must be visible ASCII characters without spaces" in err and "\n" not in err
    with pytest.raises(ValueError, match="visible ASCII"):
        create_app(pipeline(model_dir), api_key=key, threads=1)
