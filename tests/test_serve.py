"""`pabee serve`: micro-batching gives each caller its own answers, bad requests are 4xx, failures stay local."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import metric_samples

from pabee import ExitSpec
from pabee.arguments import ServeArguments
from pabee.batching import BatchFailed, MicroBatcher, ShuttingDown
from pabee.cli import main
from pabee.glue import get_task, read_glue_tsv
from pabee.load_control import Ladder, Rung
from pabee.pipeline import PabeePipeline, pipeline
from pabee.serve import app_from_args
from pabee.server import create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return pipeline(model_dir)


@pytest.fixture(scope="module")
def rte_pairs(glue_dir) -> list[list[str]]:
    return [[r["text"], r["text_pair"]] for r in read_glue_tsv(get_task("RTE"), glue_dir / "RTE" / "dev.tsv")[:8]]


def assert_answers(got: list[dict], expected: list[dict]) -> None:
    assert [(a["label"], a["exit_layer"]) for a in got] == [(a["label"], a["exit_layer"]) for a in expected]
    assert [a["score"] for a in got] == pytest.approx([a["score"] for a in expected], abs=1e-5)


def as_inputs(texts: list) -> list:
    return [tuple(t) if isinstance(t, list) else t for t in texts]


def test_health_and_a_prediction(pipe, sst2_dev_sentences, rte_pairs):
    with TestClient(create_app(pipe, threads=1, model_name="tiny")) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["labels"] == ["negative", "positive"]
        assert health.json()["num_layers"] == 4 and health.json()["model"] == "tiny"
        texts = [*sst2_dev_sentences[:6], *rte_pairs[:3]]
        response = client.post("/predict", json={"texts": texts})
        assert response.status_code == 200
        assert_answers(response.json()["predictions"], pipe(as_inputs(texts)))


def test_the_server_uses_the_pipelines_exit_options(model_dir, sst2_dev_sentences):
    static = pipeline(model_dir, exit_criterion="static", exit_threshold=2)
    with TestClient(create_app(static, threads=1)) as client:
        setting = client.get("/health").json()["exit_setting"]
        assert setting == {"patience": None, "exit_criterion": "static", "exit_threshold": 2, "max_exit_layer": None,
                           "title": "static k=2"}  # fmt: skip
        answers = client.post("/predict", json={"texts": sst2_dev_sentences[:8]}).json()["predictions"]
    assert {a["exit_layer"] for a in answers} == {2}


def test_concurrent_requests_share_batches_and_get_their_own_answers(pipe, sst2_dev_sentences, rte_pairs):
    app = create_app(pipe, max_wait_ms=300, max_batch_size=64, threads=1)
    requests = [sst2_dev_sentences[3 * i : 3 * i + 3] for i in range(10)] + [[pair] for pair in rte_pairs[:4]]
    requests.append([sst2_dev_sentences[40], rte_pairs[5], sst2_dev_sentences[41]])

    async def send_all():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                responses = await asyncio.gather(*(client.post("/predict", json={"texts": t}) for t in requests))
                metrics = await client.get("/metrics")
        return responses, metrics.text

    responses, metrics = asyncio.run(send_all())
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        assert_answers(response.json()["predictions"], pipe(as_inputs(texts)))
    samples = metric_samples(metrics)
    batches = samples[("pabee_batch_requests_count", ())]
    assert samples[("pabee_batch_requests_sum", ())] == len(requests)
    assert batches < len(requests), "concurrent requests should have shared forward passes"
    assert samples[("pabee_batch_size_sum", ())] == sum(len(t) for t in requests)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b'{"texts": ["unfinished"', 400, "The body is not valid JSON"),
        (b"\xff\xfe", 400, "The body is not valid JSON"),
        (b"[1, 2]", 422, "The body must be a JSON object"),
        (b"{}", 422, "'texts' must be a list"),
        (b'{"texts": "one string"}', 422, "'texts' must be a list"),
        (b'{"texts": ["fine", 3]}', 422, "texts[1] must be a string or a [text, text_pair] pair of two strings"),
        (b'{"texts": [null]}', 422, "texts[0] must be a string"),
        (b'{"texts": []}', 422, "'texts' is empty"),
        (b'{"texts": [["a", "b", "c"]]}', 422, "texts[0] must be a string or a [text, text_pair] pair"),
        (b'{"texts": [["only one"]]}', 422, "texts[0] must be a string or a [text, text_pair] pair"),
        (b'{"texts": [["a", 1]]}', 422, "texts[0] must be a string or a [text, text_pair] pair"),
        (b'{"texts": ["a"], "patience": 2}', 422, "Unknown field(s) 'patience'"),
        (b'{"texts": ["a", "b", "c", "d", "e", "f"]}', 413, "6 texts in one request; the limit is 5"),
        (b'{"texts": ["ok", "' + b"x" * 101 + b'"]}', 413, "texts[1] has 101 characters; the limit is 100"),
        (b'{"texts": [["ok", "' + b"x" * 101 + b'"]]}', 413, "texts[0][1] has 101 characters; the limit is 100"),
        (b'{"texts": ["fine", "ok \\ud800 text"]}', 422, "texts[1]: character 3 is a lone surrogate U+D800"),
        (b'{"texts": [["a", "\\udfff"]]}', 422, "texts[0][1]: character 0 is a lone surrogate U+DFFF"),
        (b'{"texts": ["' + b"x" * 20_000 + b'"]}', 413, "The body has"),
    ],
)
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(pipe, body, status, message):
    app = create_app(pipe, max_texts_per_request=5, max_text_chars=100, threads=1)
    with TestClient(app) as client:
        response = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status
        assert message in response.json()["detail"]
        assert client.post("/predict", json={"texts": ["still fine"]}).status_code == 200
        samples = metric_samples(client.get("/metrics").text)
    labels = (("endpoint", "/predict"), ("status", str(status)))
    assert samples[("pabee_requests_total", labels)] == 1


def test_a_failing_batch_costs_only_the_failing_request_and_the_500_tells_no_internals(
    model_dir, sst2_dev_sentences, caplog
):
    pipe = pipeline(model_dir)
    working = pipe.run_batches

    def run_batches(examples, **kwargs):
        if any(text == "boom" for text, _ in examples):
            raise RuntimeError("the forward broke at /secret/path")
        return working(examples, **kwargs)

    pipe.run_batches = run_batches
    app = create_app(pipe, max_wait_ms=300, threads=1)
    requests = [["fine", "boom"], *([s] for s in sst2_dev_sentences[:6])]

    async def send_all():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                responses = await asyncio.gather(*(client.post("/predict", json={"texts": t}) for t in requests))
                return responses, (await client.get("/metrics")).text

    responses, metrics = asyncio.run(send_all())
    failed, answered = responses[0], responses[1:]
    assert failed.status_code == 500
    assert failed.json() == {"detail": "Inference failed for this request; the server's log has the error."}
    for texts, response in zip(requests[1:], answered, strict=True):  # batched with it, answered all the same
        assert response.status_code == 200
        assert_answers(response.json()["predictions"], pipe(texts))
    assert "the forward broke at /secret/path" in caplog.text  # the operator sees it, in the log
    samples = metric_samples(metrics)
    assert samples[("pabee_batch_failures_total", ())] == 2  # the batch they shared, then the bad request alone
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "500")))] == 1
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 6


def test_a_lone_surrogate_is_a_422_naming_it_and_never_fails_its_neighbours(model_dir, sst2_dev_sentences):
    """The attack of issue 27: JSON may escape a lone surrogate, which the fast tokenizer refuses for the whole
    micro-batch; eight ordinary requests sent with it all got 500 with the tokenizer's message."""
    pipe = pipeline(model_dir)
    app = create_app(pipe, max_wait_ms=300, threads=1)
    ordinary = [[s] for s in sst2_dev_sentences[:8]]
    hostile = [["ok \ud800 text"], [["a premise", "\udfff"]]]

    async def send_all():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                bodies = [json.dumps({"texts": t}).encode() for t in [*hostile, *ordinary]]  # \ud800 as an escape
                headers = {"content-type": "application/json"}
                return await asyncio.gather(*(client.post("/predict", content=b, headers=headers) for b in bodies))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses[:2]] == [422, 422]
    assert "texts[0]: character 3 is a lone surrogate U+D800" in responses[0].json()["detail"]
    assert "texts[0][1]: character 0 is a lone surrogate U+DFFF" in responses[1].json()["detail"]
    for texts, response in zip(ordinary, responses[2:], strict=True):
        assert response.status_code == 200
        assert_answers(response.json()["predictions"], pipe(texts))


def test_metrics_parse_and_count_requests_texts_and_exit_layers(pipe, sst2_dev_sentences):
    other = create_app(pipe, threads=1)  # a second app in the same process keeps its own counts
    with TestClient(create_app(pipe, threads=1)) as client, TestClient(other) as other_client:
        other_client.post("/predict", json={"texts": ["only in the other app"]})
        for i in range(5):
            assert client.post("/predict", json={"texts": sst2_dev_sentences[4 * i : 4 * i + 4]}).status_code == 200
        client.get("/health")
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    exits = [a["exit_layer"] for a in pipe(sst2_dev_sentences[:20])]
    assert samples[("pabee_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 5
    assert samples[("pabee_requests_total", (("endpoint", "/health"), ("status", "200")))] == 1
    assert samples[("pabee_request_duration_seconds_count", ())] == 5
    assert samples[("pabee_texts_total", ())] == 20
    assert samples[("pabee_exit_layer_count", ())] == 20 and samples[("pabee_exit_layer_sum", ())] == sum(exits)
    assert samples[("pabee_exit_layer_bucket", (("le", "2.0"),))] == sum(e <= 2 for e in exits)
    assert samples[("pabee_batch_size_sum", ())] == 20


def echo(examples, settings=None):
    """A batch function answering all texts in one chunk."""
    return [(range(len(examples)), [{"text": text} for text, _ in examples])]


def test_micro_batcher_respects_the_batch_size_and_keeps_requests_whole():
    sizes = []

    def run(examples, settings):
        sizes.append(len(examples))
        return echo(examples)

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=4, max_wait=0.2)
        await batcher.start()
        requests = [[(f"r{i}", None)] for i in range(10)] + [[(f"big{j}", None) for j in range(6)]]
        answers = await asyncio.gather(*(batcher.submit(r) for r in requests))
        await batcher.stop()
        return requests, answers

    requests, answers = asyncio.run(scenario())
    assert answers == [[{"text": text} for text, _ in r] for r in requests]
    assert sizes == [4, 4, 2, 6]  # full batches leave at once; the 6-text request is never split


@pytest.mark.parametrize("second_chunk_fails", [False, True])
def test_micro_batcher_answers_a_request_as_soon_as_its_texts_are_done(second_chunk_fails):
    release = threading.Event()

    def run(examples, settings):
        yield [0], [{"text": examples[0][0]}]
        release.wait(10)
        if second_chunk_fails:
            raise RuntimeError("the second forward broke")
        yield range(1, len(examples)), [{"text": text} for text, _ in examples[1:]]

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=8, max_wait=0.05)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit([("a", None)]))
        second = asyncio.ensure_future(batcher.submit([("b", None), ("c", None)]))
        answer = await asyncio.wait_for(first, 10)  # while the batch's second forward is still running
        waiting = not second.done()
        release.set()
        try:
            return answer, waiting, await second
        except Exception as error:
            return answer, waiting, error
        finally:
            await batcher.stop()

    answer, waiting, second = asyncio.run(scenario())
    assert answer == [{"text": "a"}] and waiting
    if second_chunk_fails:
        assert isinstance(second, BatchFailed) and "the second forward broke" in str(second)
    else:
        assert second == [{"text": "b"}, {"text": "c"}]


def test_micro_batcher_retries_a_failed_batch_request_by_request():
    calls = []

    def run(examples, settings):
        calls.append([text for text, _ in examples])
        if any(text.startswith("boom") for text, _ in examples):
            raise ValueError("a bad text")
        return echo(examples)

    async def scenario():
        batcher = MicroBatcher(run, max_batch_size=16, max_wait=0.2)
        await batcher.start()
        requests = [[("a", None)], [("b", None), ("boom", None)], [("c", None), ("d", None)], [("boom2", None)]]
        outcomes = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        await batcher.stop()
        return outcomes

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == [{"text": "a"}] and outcomes[2] == [{"text": "c"}, {"text": "d"}]
    assert isinstance(outcomes[1], BatchFailed) and isinstance(outcomes[3], BatchFailed)
    assert isinstance(outcomes[1].__cause__, ValueError)  # a library caller can still see why
    assert calls == [["a", "b", "boom", "c", "d", "boom2"], ["a"], ["b", "boom"], ["c", "d"], ["boom2"]]


def test_micro_batcher_waits_at_most_max_wait_and_drains_on_stop():
    async def scenario():
        batcher = MicroBatcher(echo, max_batch_size=32, max_wait=0.15)
        await batcher.start()
        start = time.perf_counter()
        await batcher.submit([("alone", None)])
        waited = time.perf_counter() - start
        slow = MicroBatcher(echo, max_batch_size=32, max_wait=30)
        await slow.start()
        pending = asyncio.ensure_future(slow.submit([("in flight", None)]))
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        await slow.stop()  # answers what is queued at once instead of waiting out max_wait
        stopped = time.perf_counter() - start
        with pytest.raises(ShuttingDown):
            await slow.submit([("too late", None)])
        await batcher.stop()
        return waited, await pending, stopped

    waited, answer, stopped = asyncio.run(scenario())
    assert 0.14 <= waited < 5 and answer == [{"text": "in flight"}] and stopped < 5


def test_serve_without_the_server_packages_says_how_to_install_them(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve", "--model", "anything"]) == 2
    assert 'pip install "pabee[serve]"' in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--model", "m"],
        ["predict", "--model", "m", "--input", "x"],
        ["bench"],
        ["run-glue", "--output_dir", "o"],
    ],
)
def test_an_unknown_flag_is_one_line_and_exits_2(argv, capsys):
    command = argv[0]
    assert main([*argv, "--bogus_flag", "1"]) == 2
    err = capsys.readouterr().err
    assert err == f"pabee {command}: error: unrecognized arguments: --bogus_flag 1 (see pabee {command} --help)\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--model", "m", "--max_batch_size", "0"], "--max_batch_size=0 is invalid"),
        (["serve", "--model", "m", "--max_wait_ms=-1"], "--max_wait_ms=-1.0 is invalid"),
        (["serve", "--model", "m", "--threads", "0"], "--threads=0 is invalid"),
        (["predict", "--model", "m", "--input", "x", "--max_exit_layer", "0"], "max_exit_layer=0 is invalid"),
        (
            ["serve", "--model", "m", "--latency_target_ms", "100", "--exit_ladder", "full;patience=2.5"],
            "'patience=2.5': a patience is a whole number",
        ),
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def server_process(argv: list, log_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`pabee serve ARGV --port <free>` in a process of its own, yielded once /health answers 200; killed on exit
    if it is still running. Its output goes to `log_path`."""
    port = free_port()
    command = [sys.executable, "-m", "pabee", "serve", *map(str, argv), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, "the server exited early"
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
            yield server, url
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()


def test_the_model_is_loaded_and_run_in_the_forward_thread(model_dir, sst2_dev_sentences, monkeypatch):
    """Loading in one thread and running in another starts two OpenMP teams, 1.2-1.9x slower on 2 cores."""
    threads = {}
    real_load = PabeePipeline.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        threads["load"] = threading.current_thread().name
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(PabeePipeline, "from_pretrained", classmethod(load))
    app = app_from_args(ServeArguments(model=model_dir, threads=1, dtype="bfloat16"))
    real_run = app.state.pipeline.run_batches

    def run_batches(*args, **kwargs):
        threads["run"] = threading.current_thread().name
        yield from real_run(*args, **kwargs)

    monkeypatch.setattr(app.state.pipeline, "run_batches", run_batches)
    with TestClient(app) as client:
        answer = client.post("/predict", json={"texts": sst2_dev_sentences[:3]})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    assert threads["load"].startswith("pabee-forward") and threads["run"] == threads["load"]
    assert app.state.pipeline.model.dtype == torch.bfloat16


@pytest.mark.slow
def test_real_server_process_answers_and_finishes_in_flight_requests_on_shutdown(model_dir, tmp_path):
    argv = ["--model", model_dir, "--threads", "1", "--max_wait_ms", "1000"]
    with server_process(argv, tmp_path / "server.log") as (server, url):
        answer = httpx.post(f"{url}/predict", json={"texts": ["a fine film"]}, timeout=30)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("negative", "positive")

        # A request waits ~1 s for company in the micro-batcher; shutdown begins meanwhile and must finish it.
        result = {}
        client = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/predict", json={"texts": ["in flight"]}, timeout=30))
        )
        client.start()
        time.sleep(0.4)
        server.send_signal(signal.SIGTERM)
        client.join(60)
        assert result["r"].status_code == 200 and len(result["r"].json()["predictions"]) == 1
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
    output = (tmp_path / "server.log").read_text()
    assert "Application startup complete" in output and "Application shutdown complete" in output
    assert output.index("Shutting down") < output.rindex('"POST /predict HTTP/1.1" 200')  # finished after it


@pytest.mark.slow
def test_several_workers_each_load_the_model_and_answer(model_dir, sst2_dev_sentences, tmp_path):
    argv = ["--model", model_dir, "--workers", "2", "--threads", "1"]
    with server_process(argv, tmp_path / "server.log") as (server, url):
        expected = pipeline(model_dir)(sst2_dev_sentences[:6])
        for _ in range(4):  # a new connection per request, so both workers get some
            answers = [
                httpx.post(f"{url}/predict", json={"texts": [text]}, timeout=30).json()["predictions"][0]
                for text in sst2_dev_sentences[:6]
            ]
            assert_answers(answers, expected)
        assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) in (0, -signal.SIGTERM)
    output = (tmp_path / "server.log").read_text()
    workers = re.findall(r"Started server process \[(\d+)\]", output)
    assert len(set(workers)) == 2, output
    assert output.count("Application startup complete") == 2 and output.count("Application shutdown complete") == 2


def test_sigterm_turns_health_to_503_at_once_and_shutdown_follows_after_the_drain(model_dir):
    """`drain_on_sigterm` in front of a stand-in for uvicorn's handler (the handler is called, no signal sent)."""
    from pabee.serve import drain_on_sigterm

    stopped = threading.Event()
    originals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda sig, frame: stopped.set())  # uvicorn's handle_exit, as it were
    try:
        app = drain_on_sigterm(create_app(pipeline(model_dir), threads=1), 0.5)
        with TestClient(app) as client:
            assert client.get("/health").status_code == 200
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert client.post("/predict", json={"texts": ["still served"]}).status_code == 200
            assert not stopped.is_set()  # uvicorn keeps accepting during the drain
            assert stopped.wait(5)
    finally:
        for sig, handler in originals.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_a_draining_server_says_503_on_health_serves_meanwhile_then_finishes(model_dir, tmp_path):
    argv = ["--model", model_dir, "--threads", "1", "--max_wait_ms", "1500", "--drain_seconds", "3"]
    with server_process(argv, tmp_path / "server.log") as (server, url):
        result = {}
        client = threading.Thread(
            target=lambda: result.update(r=httpx.post(f"{url}/predict", json={"texts": ["in flight"]}, timeout=30))
        )
        client.start()
        time.sleep(0.3)
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(f"{url}/health", timeout=5)  # a new connection: the server still accepts
        assert health.status_code == 503 and health.json()["status"] == "draining"
        late = httpx.post(f"{url}/predict", json={"texts": ["sent while draining"]}, timeout=30)
        assert late.status_code == 200
        client.join(60)
        assert result["r"].status_code == 200
        assert server.wait(60) in (0, -signal.SIGTERM)
    output = (tmp_path / "server.log").read_text()
    assert "draining: /health answers 503; shutting down in 3 s" in output
    assert "Application shutdown complete" in output


@pytest.mark.slow
def test_health_answers_within_50_ms_while_bodies_of_a_million_values_arrive(model_dir, tmp_path):
    """Ten 3.7 MB bodies a second, each a million `{}`: parsed on the event loop, each held it for ~150 ms."""
    junk = b'{"texts": [' + b",".join([b"{}"] * 1_000_000) + b"]}"  # under the body limit
    statuses, stop = [], threading.Event()

    def flood(url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.wait(0.1):
                headers = {"content-type": "application/json"}
                statuses.append(client.post("/predict", content=junk, headers=headers).status_code)

    with server_process(["--model", model_dir, "--threads", "1"], tmp_path / "server.log") as (server, url):
        flooder = threading.Thread(target=flood, args=(url,))
        flooder.start()
        latencies = []
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                start = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)
        stop.set()
        flooder.join(60)
    p95 = sorted(latencies)[int(0.95 * len(latencies))]
    assert len(statuses) >= 10 and set(statuses) == {413}
    assert p95 < 0.05, f"p95 {p95 * 1000:.0f} ms"


def test_free_heap_memory_goes_back_to_the_system_between_batches(model_dir, monkeypatch):
    """The soak's growth was free memory glibc kept (fragmentation), not objects: the server trims it regularly."""
    from pabee import server

    assert server.release_free_memory() is True  # glibc here
    trimmed = []
    monkeypatch.setattr(server, "release_free_memory", lambda: trimmed.append(threading.current_thread().name))
    with TestClient(create_app(pipeline(model_dir), threads=1, trim_memory_every=0.05)) as client:
        time.sleep(0.4)
        assert client.post("/predict", json={"texts": ["still answered"]}).status_code == 200
    assert len(trimmed) >= 3 and all(name.startswith("pabee-forward") for name in trimmed)  # in the forward thread


def test_the_server_says_which_exit_setting_answers(model_dir, capsys):
    from pabee.arguments import ServeArguments
    from pabee.serve import note_exit_setting

    note_exit_setting(ServeArguments(model=str(model_dir)))
    err = capsys.readouterr().err
    assert err.startswith("pabee serve: exit setting: patience 1, the model's default, not chosen on data here")
    note_exit_setting(ServeArguments(model=str(model_dir), patience=0))
    assert "exit setting: full model (set by the flags; the model's own: patience 1)" in capsys.readouterr().err


# --- exit settings per request, chosen by load, and the clients users already have (issue 42) ------------------


def test_requests_with_different_exit_settings_share_batches_and_each_gets_its_own_answers(pipe, sst2_dev_sentences):
    app = create_app(pipe, max_wait_ms=300, max_batch_size=64, threads=1, allow_request_exit=True)
    texts = sst2_dev_sentences[:24]
    options = [
        None,
        {"patience": 0},
        "full",
        {"exit_criterion": "static", "exit_threshold": 2},
        {"exit_criterion": "confidence", "exit_threshold": 0.55},
        {"patience": 2, "max_exit_layer": 3},
    ]
    bodies = [{"texts": texts[4 * i : 4 * i + 4], "return_exit_setting": True} | ({"exit": o} if o else {})
              for i, o in enumerate(options)]  # fmt: skip
    with TestClient(app) as client:
        batches_before = _batches(client)
        with concurrent_requests(client, bodies) as responses:
            pass
        assert _batches(client) - batches_before < len(bodies)  # they shared micro-batches
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200
        spec = app.state.exit_choice.for_request(body.get("exit")) or pipe.exit_spec
        alone = pipe(body["texts"], exit_spec=spec)  # the same texts run alone, with the same setting
        got = response.json()["predictions"]
        assert_answers(got, alone)
        assert {a["exit_setting"] for a in got} == {spec.title}


def _batches(client) -> float:
    return metric_samples(client.get("/metrics").text)[("pabee_batch_requests_count", ())]


@contextmanager
def concurrent_requests(client, bodies: list[dict]):
    """POST every body to /predict at once (threads), yielding the responses in order once all are back."""
    responses: list = [None] * len(bodies)

    def post(i: int) -> None:
        responses[i] = client.post("/predict", json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    yield responses


@pytest.mark.parametrize(
    ("allow", "exit_option", "status", "message"),
    [
        (False, {"patience": 2}, 403, "--allow_request_exit"),
        (True, {"patients": 2}, 422, "'exit': Unknown exit option 'patients'"),
        (True, {"exit_criterion": "static"}, 422, "'exit': the 'static' rule needs a threshold"),
        (True, {"exit_criterion": "static", "exit_threshold": 7}, 422, "static exit at layer 7 is impossible"),
        (True, {"patience": -1}, 422, "'exit': patience=-1 is invalid"),
        (True, {"patience": 1.5}, 422, "'exit': patience=1.5 is invalid: use a whole number"),
        (True, "fastest", 422, "'exit' must be \"full\" or an object"),
        (True, [1], 422, "'exit' must be \"full\" or an object"),
    ],
)
def test_a_bad_exit_option_is_named_and_refused(pipe, allow, exit_option, status, message):
    with TestClient(create_app(pipe, threads=1, allow_request_exit=allow)) as client:
        response = client.post("/predict", json={"texts": ["a film"], "exit": exit_option})
        assert response.status_code == status and message in response.json()["detail"]
        assert client.post("/predict", json={"texts": ["a film"]}).status_code == 200


def test_under_load_the_server_walks_down_its_ladder_and_never_below_the_floor(pipe, sst2_dev_sentences):
    ladder = Ladder(
        (Rung(ExitSpec("static", threshold=3), 0.01, 3.0), Rung(ExitSpec("static", threshold=2), 0.02, 2.0),
         Rung(ExitSpec("static", threshold=1), 0.10, 1.0)), 4,
    ).floored(0.05)  # static k=1 changed 10% of the answers: never chosen  # fmt: skip
    full = pipeline(pipe.model, pipe.tokenizer, patience=0)  # the server's own setting: the top of the ladder
    app = create_app(full, threads=1, max_wait_ms=20, ladder=ladder, latency_target_ms=0.01)
    bodies = [{"texts": sst2_dev_sentences[i : i + 4], "return_exit_setting": True} for i in range(0, 64, 4)]
    with TestClient(app) as client:
        assert client.get("/health").json()["exit_setting"]["title"] == "full model"  # the pipeline's own on top
        for _ in range(3):  # a target no batch can meet: every decision steps down, as far as the floor allows
            with concurrent_requests(client, bodies) as responses:
                assert all(r.status_code == 200 for r in responses)
            time.sleep(0.6)  # the controller's dwell time
        settings = {a["exit_setting"] for r in responses for a in r.json()["predictions"]}
        health = client.get("/health").json()
        samples = metric_samples(client.get("/metrics").text)
    assert health["exit_setting"]["title"] == "static k=2" and settings <= {"full model", "static k=3", "static k=2"}
    assert [rung["setting"] for rung in health["exit_ladder"]] == ["full model", "static k=3", "static k=2"]
    assert samples[("pabee_exit_switches_total", ())] >= 1 and samples[("pabee_exit_rung", ())] == 2
    assert not any("static k=1" in str(labels) for _, labels in samples)


def test_text_embeddings_inference_and_inference_api_bodies(pipe, rte_pairs):
    texts = ["a gripping, funny film", "dull and long", "it was fine"]
    with TestClient(create_app(pipe, threads=1)) as client:
        ours = client.post("/predict", json={"texts": texts}).json()["predictions"]
        tei = client.post("/predict", json={"inputs": texts}).json()
        one = client.post("/predict", json={"inputs": texts[0]}).json()
        pair = client.post("/predict", json={"inputs": rte_pairs[0]}).json()
        raw = client.post("/predict", json={"inputs": texts[0], "raw_scores": True, "truncate": True}).json()
        hub = client.post("/", json={"inputs": texts, "parameters": {"top_k": 1}}).json()
        hub_all = client.post("/", json={"inputs": texts[0]}).json()
        refused = client.post("/", json={"inputs": texts[0], "parameters": {"function_to_apply": "tanh"}})
    assert [items[0]["label"] for items in tei] == [a["label"] for a in ours]
    assert [items[0]["score"] for items in tei] == pytest.approx([a["score"] for a in ours], abs=1e-6)
    assert [i["label"] for i in one] == [i["label"] for i in tei[0]] and len(one) == 2  # alone, as in the batch
    assert [i["score"] for i in one] == pytest.approx([i["score"] for i in tei[0]], abs=1e-6)
    assert sum(item["score"] for item in one) == pytest.approx(1.0)
    assert set(one[0]) == {"score", "label"} and len(pair) == 2  # a two-text list is a pair, as TEI reads it
    assert [item["label"] for item in raw] == [item["label"] for item in one] and sum(i["score"] for i in raw) != 1
    assert [[item["label"] for item in items] for items in hub] == [[a["label"]] for a in ours]
    assert [[i["label"] for i in items] for items in hub_all] == [[i["label"] for i in one]]
    assert refused.status_code == 422 and "function_to_apply" in refused.json()["detail"]


def test_the_hubs_own_inference_client_reads_the_servers_answers(model_dir, tmp_path):
    from huggingface_hub import InferenceClient

    with server_process(["--model", model_dir, "--threads", "1"], tmp_path / "server.log") as (_, url):
        client = InferenceClient(base_url=url)
        answer = client.text_classification("a gripping, funny film")
        top = client.text_classification("a gripping, funny film", top_k=1)
        ours = httpx.post(f"{url}/predict", json={"texts": ["a gripping, funny film"]}, timeout=30).json()
    assert [item.label for item in answer] in (["positive", "negative"], ["negative", "positive"])
    assert answer[0].score >= answer[1].score and sum(item.score for item in answer) == pytest.approx(1.0)
    assert [item.label for item in top] == [ours["predictions"][0]["label"]]
    assert top[0].score == pytest.approx(ours["predictions"][0]["score"], abs=1e-6)


@pytest.mark.parametrize(
    ("rung", "message"),
    [
        (ExitSpec("static", threshold=20), "static exit at layer 20 is impossible"),
        (ExitSpec("confidence", threshold=1.5), "threshold 1.5 is invalid for 'confidence'"),
        (ExitSpec("patience", patience=-1), "patience=-1 is invalid"),
    ],
)
def test_a_ladder_setting_the_model_cannot_run_stops_the_server_at_start(pipe, rung, message):
    # Otherwise it would start, then fail every batch once load walked down to that rung.
    ladder = Ladder((Rung(rung),), pipe.num_layers)
    with pytest.raises(ValueError, match=rf"exit ladder's setting '{re.escape(rung.title)}'.*{re.escape(message)}"):
        create_app(pipe, threads=1, ladder=ladder, latency_target_ms=100)
