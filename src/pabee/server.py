"""The HTTP app `pabee serve` runs (FastAPI): dynamic micro-batching and batched early exit behind `/predict`.

Concurrent requests are gathered for up to `max_wait_ms` (or until `max_batch_size` texts are waiting) and run
together with batched early exit in a single worker thread, so the event loop keeps accepting requests meanwhile.
The pipeline splits a micro-batch into length-sorted forward passes, and each request is answered as soon as the
passes holding its texts end; each caller gets exactly its own answers, in its order.

Endpoints:

- `POST /predict` with `{"texts": ["a text", ["a premise", "a hypothesis"], ...]}` (strings, or
  `[text, text_pair]` pairs, mixed freely) → `{"predictions": [{"label", "score", "exit_layer"}, ...]}`;
- `GET /health` → `{"status": "ok", ...}` (503 while shutting down);
- `GET /metrics`: Prometheus text format.

Bad requests get a JSON `{"detail": ...}` and a 4xx status: 400 body is not valid JSON; 422 wrong shape or
types, an empty list, a pair that is not two strings, an unknown field, a text that is not Unicode (a lone
surrogate escape, which the tokenizer would refuse for a whole micro-batch); 413 more than
`max_texts_per_request` texts, a text longer than `max_text_chars` characters, or an oversized body. Texts within
the limit are truncated to `max_seq_length` tokens (pairs: longer part first), as in training. If a forward
fails, the requests of its micro-batch are run again one by one, so only a request that fails alone gets a 500;
its body never holds the error, which goes to the server's log.

Holding up under load and strangers: a request that would make more than `max_queue` texts wait gets 503 with
`Retry-After` at once (waiting in a long line helps nobody); one not answered within `request_timeout` seconds
gets 504 and its texts leave the queue unrun, as do those of a client that hangs up while waiting. A body that
holds more JSON values than its texts could is refused (413) before it is parsed. /predict takes only
`Content-Type: application/json` (415), which a web page cannot send cross-site without a preflight; with
`allowed_hosts`, other `Host` headers get 400. With an API key, /predict, /metrics and /openapi.json answer 401
unless the request has `Authorization: Bearer <key>` (/docs and /redoc are off); /health stays open for load
balancers, shows no file paths, and answers 503 once `app.state.draining` is set. `/metrics` counts layers
computed and exit layers, so a shift of the mean exit layer (a slowdown attack, drifting inputs) shows.

The server keeps no state between requests, so it scales out as several uvicorn workers (`--workers`) or as
replicas behind any load balancer. `create_app` takes a ready pipeline; `pabee.serve` builds one from the
command line's flags and runs the app under uvicorn (or Ray Serve).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import hmac
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect

from .batching import BatchFailed, MicroBatcher, Overloaded, ShuttingDown, forward_thread
from .bodies import FUNCTIONS, Body, RequestError, parse_hf_body, parse_predict_body, shaped_answers
from .load_control import ExitChoice, Ladder, LoadController, Rung
from .pipeline import Example, PabeePipeline
from .settings import ExitSpec

__all__ = ["check_api_key", "create_app", "public_model_name"]

logger = logging.getLogger(__name__)
CLIENT_GONE = 499  # the status nginx logs for a client that hung up first; counted in the metrics, never sent

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DRAIN_LIMIT = 64 * 2**20  # bytes of an oversized body read (and dropped) so its client gets the 413

_TEXT = {"type": "string"}
_PAIR = {"type": "array", "items": _TEXT, "minItems": 2, "maxItems": 2}
_TEXTS = {"type": "array", "minItems": 1, "items": {"oneOf": [_TEXT, _PAIR]}}
_EXIT = {  # a request's own exit setting (`pabee.settings` keywords), or "full"
    "oneOf": [
        {"type": "string", "enum": ["full"]},
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "patience": {"type": "integer", "minimum": 0},
                "exit_criterion": {"type": "string"},
                "exit_threshold": {"type": "number"},
                "max_exit_layer": {"type": "integer", "minimum": 1},
            },
        },
    ]
}


def _body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI operation's JSON body (the handlers parse bodies themselves, to answer in their own words)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


PREDICT_OPENAPI = _body_schema(
    {
        "oneOf": [
            {
                "type": "object",
                "required": ["texts"],
                "additionalProperties": False,
                "properties": {"texts": _TEXTS, "exit": _EXIT, "return_exit_setting": {"type": "boolean"}},
            },
            {  # text-embeddings-inference's /predict
                "type": "object",
                "required": ["inputs"],
                "additionalProperties": False,
                "properties": {
                    "inputs": {"oneOf": [_TEXT, _PAIR, _TEXTS]},
                    "raw_scores": {"type": "boolean"},
                    "truncate": {"type": "boolean"},
                    "truncation_direction": {"type": "string"},
                },
            },
        ]
    }
)
HF_OPENAPI = _body_schema(  # the Hugging Face Inference API's text classification
    {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "inputs": {"oneOf": [_TEXT, {"type": "array", "minItems": 1, "items": _TEXT}]},
            "parameters": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "top_k": {"type": "integer", "minimum": 1},
                    "function_to_apply": {"type": "string", "enum": list(FUNCTIONS)},
                },
            },
        },
    }
)


class _Metrics:
    """Prometheus metrics in a registry of their own, so several apps in one process never clash."""

    def __init__(self, num_layers: int, queued: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pabee_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "pabee_request_duration_seconds", "Time to answer a /predict request.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.texts = Counter("pabee_texts", "Texts classified.", registry=r)
        self.batch_size = Histogram("pabee_batch_size", "Texts per forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram(
            "pabee_batch_requests", "Requests gathered into one forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "pabee_batch_duration_seconds", "Time of one batched forward.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_failures = Counter("pabee_batch_failures", "Forward passes that raised.", registry=r)
        self.exit_layer = Histogram(
            "pabee_exit_layer", "Layer each text exited at.", buckets=tuple(range(1, num_layers + 1)), registry=r
        )
        self.layers = Counter(
            "pabee_layers_computed", "Encoder layers run, summed over texts (a text exiting at k adds k).", registry=r
        )
        self.rejected = Counter("pabee_rejected", "/predict requests refused (503): queue full.", registry=r)
        self.timeouts = Counter("pabee_timeouts", "/predict requests past --request_timeout (504).", registry=r)
        self.dropped = Counter(
            "pabee_dropped_texts", "Texts taken out of the queue unrun (timeout, client gone).", registry=r
        )
        self.gone = Counter(
            "pabee_client_disconnects", "/predict clients that hung up before their answer.", registry=r
        )
        Gauge("pabee_queued_texts", "Texts waiting for a batch.", registry=r).set_function(queued)
        self.rung = Gauge(
            "pabee_exit_rung", "The exit ladder's rung in use (0: the top; with --latency_target_ms).", registry=r
        )
        self.switches = Counter("pabee_exit_switches", "Times the load controller changed the rung.", registry=r)
        self.by_setting = Counter("pabee_texts_by_exit_setting", "Texts answered, by exit setting.", ["setting"],
                                  registry=r)  # fmt: skip

    def batch_done(self, num_requests: int, answers: list[dict], seconds: float) -> None:
        self.batch_size.observe(len(answers))
        self.batch_requests.observe(num_requests)
        self.batch_seconds.observe(seconds)
        self.texts.inc(len(answers))
        for answer in answers:
            self.exit_layer.observe(answer["exit_layer"])
            self.by_setting.labels(answer["_setting"].title).inc()
        self.layers.inc(sum(answer["exit_layer"] for answer in answers))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def release_free_memory() -> bool:
    """Give the heap's free pages back to the operating system (glibc's `malloc_trim`); False without glibc.

    Batches of ever-changing shapes leave glibc's heap fragmented: in a soak, the bytes in use stayed flat
    (~170 MB) while the free bytes glibc kept grew from 64 to 122 MB, and the resident memory with them; trimming
    returns those pages (benchmarks/results/soak_30min.md).
    """
    try:
        _libc().malloc_trim(0)  # returns whether it released anything; either way, it ran
        return True
    except (OSError, AttributeError):
        return False


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, looked up and loaded once (`release_free_memory` runs every minute)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


async def _trim_memory(batcher: MicroBatcher, every: float) -> None:
    """`release_free_memory` every `every` seconds, in the forward thread between batches (a few ms)."""
    while True:
        await asyncio.sleep(every)
        await batcher.call_in_worker(release_free_memory)


def _lifespan(batcher: MicroBatcher, run: Callable[[list[Example]], Iterator], trim_every: float | None) -> Callable:
    """Start the micro-batcher (and warm the model up: the first request should not pay) with the app; stop it
    after uvicorn has finished the requests in flight. Meanwhile, hand free heap memory back every `trim_every`
    seconds."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        await batcher.call_in_worker(lambda: list(run([("warm up", None)], [None])))
        trimming = asyncio.create_task(_trim_memory(batcher, trim_every)) if trim_every else None
        yield
        if trimming is not None:
            trimming.cancel()
            await asyncio.gather(trimming, return_exceptions=True)
        await batcher.stop()

    return lifespan


def check_api_key(api_key: str) -> None:
    """A key every HTTP client can send: visible ASCII, no spaces (header values are ASCII in practice; a key
    with other characters would be refused on every request, so it is refused at start instead)."""
    if not api_key or not all("!" <= char <= "~" for char in api_key):
        raise ValueError(
            "the API key must be visible ASCII characters without spaces (HTTP clients send header values as "
            "ASCII); choose another key, e.g. from `openssl rand -hex 24`."
        )


def public_model_name(name: str) -> str:
    """What /health shows of the model: a hub name as it is, a local folder by its last part (no file paths)."""
    path = Path(name)
    return path.name if path.is_absolute() or path.exists() else name


def _check_limits(max_texts: int, max_chars: int, threads: int | None, request_timeout: float | None) -> None:
    for name, value in (("max_texts_per_request", max_texts), ("max_text_chars", max_chars)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid; use a whole number >= 1.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is invalid; use a whole number >= 1.")
    if request_timeout is not None and request_timeout <= 0:
        raise ValueError(f"request_timeout={request_timeout} is invalid; use a number of seconds > 0.")


def _batch_failed(metrics: _Metrics) -> Callable[[BaseException], None]:
    """Count a failed forward and log its error here, on the server: the client only hears that it failed."""

    def on_failure(error: BaseException) -> None:
        metrics.batch_failures.inc()
        logger.error("A forward failed: %s: %s", type(error).__name__, error, exc_info=error)

    return on_failure


def create_app(
    pipeline: PabeePipeline,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_texts_per_request: int = 64,
    max_text_chars: int = 5000,
    max_queue: int | None = None,
    request_timeout: float | None = None,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] | None = None,
    threads: int | None = None,
    model_name: str | None = None,
    executor: ThreadPoolExecutor | None = None,
    batcher_class: type[MicroBatcher] = MicroBatcher,
    trim_memory_every: float | None = 60.0,
    ladder: Ladder | None = None,
    latency_target_ms: float | None = None,
    allow_request_exit: bool = False,
) -> FastAPI:
    """The FastAPI app serving `pipeline` (its exit setting answers every request that brings none). With
    `latency_target_ms`, each micro-batch's setting is chosen by load from `ladder`, its top rung the pipeline's
    (`pabee.load_control`); with `allow_request_exit`, a request's own `"exit"` is honoured as sent.

    `max_queue` (texts) and `request_timeout` (seconds) bound the waiting (503 / 504 beyond them; None: no
    bound); with `api_key`, /predict, /metrics and /openapi.json need `Authorization: Bearer <api_key>` (and
    /docs, /redoc are off); with `allowed_hosts`, a request whose `Host` is not listed gets 400 (DNS rebinding).
    The micro-batcher starts and stops with the app's lifespan: run it under uvicorn, or in tests inside
    `with TestClient(app)`. `executor` is the thread the pipeline was loaded in (`forward_thread`); without
    one, a new thread with `threads` torch threads runs the batches. `batcher_class` gathers them (Ray Serve's:
    `pabee.ray.serving.ServeBatcher`). Setting `app.state.draining` (a `threading.Event`, safe from a signal
    handler) turns /health to 503 while requests are still served, so load balancers stop sending. Every
    `trim_memory_every` seconds (None: never) the heap's free pages go back to the system (`release_free_memory`)."""
    _check_limits(max_texts_per_request, max_text_chars, threads, request_timeout)
    if api_key is not None:
        check_api_key(api_key)

    metrics = _Metrics(pipeline.num_layers, queued=lambda: batcher.queued)
    choice = _exit_choice(pipeline, ladder, latency_target_ms, allow_request_exit, metrics)
    run = _batch_function(pipeline, choice, max_batch_size)

    batcher = batcher_class(
        run,
        max_batch_size,
        max_wait_ms / 1000,
        on_batch=_batch_done(metrics, choice),
        on_failure=_batch_failed(metrics),
        on_withdraw=metrics.dropped.inc,
        executor=executor or forward_thread(threads),
        max_queue=max_queue,
        choose=choice.choose if choice.controller is not None else None,
    )
    limits = {"max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms, "max_queue": max_queue,
              "max_texts_per_request": max_texts_per_request, "max_text_chars": max_text_chars,
              "request_timeout": request_timeout}  # fmt: skip
    info = _health_info(pipeline, model_name, limits, choice, latency_target_ms)
    lifespan = _lifespan(batcher, run, trim_memory_every)
    app = _build_app(pipeline, batcher, lifespan, metrics, info, api_key, allowed_hosts, choice)
    app.state.exit_choice = choice
    return app


def _batch_done(metrics: _Metrics, choice: ExitChoice) -> Callable[[int, list[dict], float, Any], None]:
    """After each batch: the metrics, and the controller learns its rung's rate (when every text ran on it)."""

    def done(requests: int, answers: list[dict], seconds: float, chosen: ExitSpec | None) -> None:
        metrics.batch_done(requests, answers, seconds)
        at_chosen = sum(answer["_setting"] == chosen for answer in answers)
        choice.observe(chosen, at_chosen, len(answers), seconds)

    return done


def _exit_choice(
    pipeline: PabeePipeline, ladder: Ladder | None, latency_target_ms: float | None, allow: bool, metrics: _Metrics
) -> ExitChoice:
    """The server's exit settings: the pipeline's, or a ladder walked by load, and whether clients may choose."""
    if latency_target_ms is None:
        if ladder is not None:
            raise ValueError("An exit ladder is walked by load: give latency_target_ms too.")
        return ExitChoice(pipeline.exit_spec, pipeline.model.config, allow_request_exit=allow)
    ladder = (ladder or Ladder((Rung(pipeline.exit_spec),), pipeline.num_layers)).with_top(pipeline.exit_spec)

    def switched(previous: int, rung: int, waiting: float) -> None:
        metrics.switches.inc()
        logger.info(
            "exit setting: %s -> %s (a request arriving now would wait %.0f ms; target %.0f ms)",
            ladder.rungs[previous].spec.title, ladder.rungs[rung].spec.title, 1000 * waiting, latency_target_ms,
        )  # fmt: skip

    controller = LoadController(ladder, latency_target_ms / 1000, on_switch=switched)
    metrics.rung.set_function(lambda: controller.rung)
    return ExitChoice(pipeline.exit_spec, pipeline.model.config, controller, allow_request_exit=allow)


def _batch_function(pipeline: PabeePipeline, choice: ExitChoice, max_batch_size: int) -> Callable:
    """The batcher's batch function: the texts grouped by the setting each runs (its request's, or the one the
    server chose), each group as padding-aware forwards; every answer keeps its setting and its logits (`_setting`,
    `_logits`) for the response and the metrics, which strip them."""

    def run(examples: list[Example], settings: list[ExitSpec | None]) -> Iterator[tuple[list[int], list[dict]]]:
        groups: dict[ExitSpec, list[int]] = {}
        for position, spec in enumerate(settings):
            groups.setdefault(spec or choice.current, []).append(position)
        for spec, positions in groups.items():
            texts = [examples[i] for i in positions]
            for rows, logits, exit_layers in pipeline.run_batches(texts, batch_size=max_batch_size, exit_spec=spec):
                answers = pipeline.format(logits, exit_layers)
                for answer, row in zip(answers, logits.tolist(), strict=True):
                    answer["_setting"], answer["_logits"] = spec, row
                yield [positions[r] for r in rows], answers

    return run


def _health_info(
    pipeline: PabeePipeline,
    model_name: str | None,
    limits: dict[str, Any],
    choice: ExitChoice,
    latency_target_ms: float | None,
) -> dict[str, Any]:
    """What /health shows that does not change: the model, its labels, the limits, how exit settings are chosen
    (never the API key, nor a path). The setting in use is added per call."""
    info = {
        "model": public_model_name(model_name or str(getattr(pipeline.model.config, "name_or_path", ""))),
        "labels": pipeline.labels,
        "num_layers": pipeline.num_layers,
        **limits,
        "max_seq_length": pipeline.max_length,
        "allow_request_exit": choice.allow_request_exit,
    }
    if choice.controller is not None:
        info |= {"latency_target_ms": latency_target_ms, "exit_ladder": choice.controller.ladder.describe()}
    return info


def _build_app(
    pipeline: PabeePipeline,
    batcher: MicroBatcher,
    lifespan: Callable,
    metrics: _Metrics,
    info: dict[str, Any],
    api_key: str | None,
    allowed_hosts: Sequence[str] | None,
    choice: ExitChoice,
) -> FastAPI:
    """The app around the batcher: routes, then the middleware (the host check outermost)."""
    key = api_key.encode() if api_key else None
    hidden = {"docs_url": None, "redoc_url": None, "openapi_url": None} if key else {}  # behind the key below
    app = FastAPI(title="pabee", summary="PABEE early-exit classification", lifespan=lifespan, **hidden)
    app.state.pipeline, app.state.batcher, app.state.metrics = pipeline, batcher, metrics
    app.state.draining = threading.Event()
    _add_routes(app, _Answering(batcher, metrics, info, choice, pipeline), key)
    if key:
        _add_keyed_schema(app, metrics, key)
    app.add_middleware(_RefuseWhenFull, batcher=batcher, metrics=metrics, api_key=key)
    if allowed_hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
    return app


async def _read_body(request: Request, max_body: int) -> bytes:
    """The body, or 413 when it is larger than `max_body` bytes (declared or streamed).

    An oversized body is still read to its end (and dropped), up to `DRAIN_LIMIT` bytes: a server that answers
    and closes while the client is still sending makes the client see a connection reset, not the 413.
    """
    declared = request.headers.get("content-length")
    too_large = declared is not None and declared.isdigit() and int(declared) > max_body
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        too_large = too_large or size > max_body
        if too_large and size > DRAIN_LIMIT:
            break
        if not too_large:
            chunks.append(chunk)
    if too_large:
        raise RequestError(413, f"The body has {declared or f'over {max_body}'} bytes; the limit is {max_body}.")
    return b"".join(chunks)


def _authorized(authorization: str | None, api_key: bytes | None) -> bool:
    """Whether an `Authorization` header value is `Bearer <api_key>` (always true without a key)."""
    if api_key is None:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest takes as long for a near miss as for a far one, so timing tells nothing about the key.
    # Headers arrive decoded as latin-1: encoding back gives the bytes the client sent.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"), api_key)


def _is_json(content_type: str | None) -> bool:
    """`application/json`, any parameters (`; charset=utf-8`) allowed. Browsers may send a cross-site POST
    without asking first only as form or text types; requiring JSON makes them ask (a CORS preflight), and this
    server answers no preflight, so a web page cannot make a visitor's browser use a server on their machine."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "application/json"


def _refusal(error: Overloaded, metrics: _Metrics) -> JSONResponse:
    """The 503 with `Retry-After` for a request the queue cannot take, counted wherever it is refused."""
    metrics.rejected.inc()
    return _error(503, str(error), {"Retry-After": str(error.retry_after)})


def _unauthorized() -> JSONResponse:
    return _error(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", {"WWW-Authenticate": "Bearer"})


class _ClientGone(Exception):
    """The client hung up before its answer."""


async def _unless_client_leaves(request: Request, work: Awaitable[list[dict]]) -> list[dict]:
    """`work`'s result, or `_ClientGone` as soon as the client disconnects; `work` is then cancelled, which takes
    the request's texts out of the queue if their batch has not started (they would be computed for nobody)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((answer, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not answer.done():
            answer.cancel()
            await asyncio.gather(answer, return_exceptions=True)  # withdrawn before we go on
    if answer.cancelled():
        raise _ClientGone
    return answer.result()


class _Answering:
    """What answering a request needs: the batcher, the metrics, the limits, the exit choice, the labels."""

    def __init__(
        self, batcher: MicroBatcher, metrics: _Metrics, info: dict[str, Any], choice: ExitChoice, pipeline: Any
    ) -> None:
        self.batcher, self.metrics, self.info, self.choice = batcher, metrics, info, choice
        self.labels, self.problem = pipeline.labels, pipeline.model.config.problem
        # Each JSON-escaped character takes at most 6 bytes; beyond that the body cannot be a valid request.
        self.max_body = 6 * info["max_texts_per_request"] * (2 * info["max_text_chars"] + 8) + 4096

    async def answer(self, request: Request, parse: Callable[[bytes, int, int], Body]) -> Response:
        """Parse, queue and answer one request (every failure as its JSON status)."""
        try:
            if not _is_json(request.headers.get("content-type")):
                raise RequestError(415, "Send the body as JSON with 'Content-Type: application/json'.")
            body = parse(await _read_body(request, self.max_body), self.info["max_texts_per_request"],
                         self.info["max_text_chars"])  # fmt: skip
            setting = self._setting(body)
            answers = await _unless_client_leaves(request, self.batcher.submit(body.examples, setting))
            return JSONResponse(shaped_answers(body, answers, self.labels, self.problem))
        except RequestError as error:
            return _error(error.status, error.message)
        except Overloaded as error:
            return _refusal(error, self.metrics)
        except BatchFailed:  # the error itself is in the server's log, never in a response
            return _error(500, "Inference failed for this request; the server's log has the error.")
        except ShuttingDown as error:
            return _error(503, str(error))
        except (_ClientGone, ClientDisconnect):
            self.metrics.gone.inc()
            return Response(status_code=CLIENT_GONE)  # for the metrics: nobody is there to receive it

    def _setting(self, body: Body) -> ExitSpec | None:
        """The request's own exit setting (403 when clients may not choose, 422 when it does not fit)."""
        try:
            return self.choice.for_request(body.exit)
        except PermissionError as error:
            raise RequestError(403, str(error)) from None
        except ValueError as error:
            raise RequestError(422, f"'exit': {error}") from None

    def health(self) -> dict[str, Any]:
        current = self.choice.current
        return {**self.info, "exit_setting": {**current.keywords(), "title": current.title}}


class _RefuseWhenFull:
    """ASGI middleware: a /predict arriving while the queue is full gets its 503 before FastAPI parses anything.

    Under a flood most requests are refused, and on a small machine the CPU that refusing takes is the model's:
    the cheaper a refusal, the more of the capacity is left for the requests that were admitted.
    """

    def __init__(self, app: Any, batcher: MicroBatcher, metrics: _Metrics, api_key: bytes | None) -> None:
        self.app, self.batcher, self.metrics, self.key = app, batcher, metrics, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in ("/predict", "/") or not self.batcher.full:
            return await self.app(scope, receive, send)
        authorization = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        if not _authorized(authorization, self.key):
            return await self.app(scope, receive, send)  # a stranger hears 401, not how busy we are
        await _refusal(self.batcher.overloaded(), self.metrics)(scope, receive, send)
        self.metrics.requests.labels(scope["path"], "503").inc()


def _add_routes(app: FastAPI, answering: _Answering, key: bytes | None) -> None:
    """`POST /predict` (pabee's and TEI's bodies), `POST /` (the Inference API's), `GET /health` and
    `GET /metrics`, as the module docstring describes."""
    batcher, metrics, timeout = answering.batcher, answering.metrics, answering.info["request_timeout"]

    async def answered(request: Request, endpoint: str, parse: Callable[[bytes, int, int], Body]) -> Response:
        start = time.perf_counter()
        if not _authorized(request.headers.get("authorization"), key):
            response = _unauthorized()
        else:
            try:
                async with asyncio.timeout(timeout):
                    response = await answering.answer(request, parse)
            except TimeoutError:
                metrics.timeouts.inc()
                response = _error(504, f"No answer within --request_timeout {timeout} s; the request was dropped.")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.post("/predict", openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request) -> Response:
        return await answered(request, "/predict", parse_predict_body)

    @app.post("/", openapi_extra=HF_OPENAPI)
    async def text_classification(request: Request) -> Response:
        return await answered(request, "/", parse_hf_body)

    @app.get("/health")
    async def health() -> Response:
        status = "shutting down" if batcher.closing else "draining" if app.state.draining.is_set() else "ok"
        code = 200 if status == "ok" else 503
        metrics.requests.labels("/health", str(code)).inc()
        return JSONResponse({"status": status, **answering.health()}, status_code=code)

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if not _authorized(request.headers.get("authorization"), key):
            metrics.requests.labels("/metrics", "401").inc()
            return _unauthorized()
        metrics.requests.labels("/metrics", "200").inc()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _add_keyed_schema(app: FastAPI, metrics: _Metrics, key: bytes) -> None:
    """With an API key, the OpenAPI schema is for key holders only (it maps the API for a stranger), and the
    browser pages /docs and /redoc, which cannot send the key, are off."""

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> Response:
        if not _authorized(request.headers.get("authorization"), key):
            metrics.requests.labels("/openapi.json", "401").inc()
            return _unauthorized()
        return JSONResponse(app.openapi())
