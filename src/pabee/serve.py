"""`pabee serve`: an HTTP server (FastAPI on uvicorn) with dynamic micro-batching and batched early exit.

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
types, an empty list, a pair that is not two strings, an unknown field; 413 more than `max_texts_per_request`
texts, a text longer than `max_text_chars` characters, or an oversized body. Texts within the limit are
truncated to `max_seq_length` tokens (pairs: longer part first), as in training. If a forward fails, the
requests of that batch get a 500 and the server carries on.

The server keeps no state between requests, so it scales out as several uvicorn workers (`--workers`) or as
replicas behind any load balancer.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from .errors import PabeeError
from .pipeline import ATTENTION_KERNELS, DEFAULT_MAX_LENGTH, DTYPES, EXIT_OPTIONS, Example, PabeePipeline

ENV_CONFIG = "PABEE_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker process
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ServeArguments:
    """Flags of `pabee serve`."""

    model: str = field(metadata={"help": "Fine-tuned PABEE model folder (e.g. the --output_dir of run-glue)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    patience: int | None = field(default=None, metadata={"help": "Patience (0 = full model). Default: the model's."})
    exit_criterion: str | None = field(default=None, metadata={"help": "Exit rule, where the model supports it."})
    exit_threshold: float | None = field(default=None, metadata={"help": "The exit rule's threshold."})
    max_exit_layer: int | None = field(default=None, metadata={"help": "No example uses more layers than this."})
    max_batch_size: int = field(
        default=32, metadata={"help": "Most texts gathered into one micro-batch (run as padding-aware forwards)."}
    )
    max_wait_ms: float = field(
        default=5.0, metadata={"help": "How long the first request of a micro-batch waits for company."}
    )
    max_texts_per_request: int = field(default=64, metadata={"help": "More texts in one request: 413."})
    max_text_chars: int = field(default=5000, metadata={"help": "A longer text (or pair part): 413."})
    max_seq_length: int = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per text (pair); longer ones are truncated."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch threads per worker (default: cores / workers)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights' dtype (default: as saved, float32). bfloat16 about doubles throughput on CPUs with "
            "bfloat16 instructions, for slightly different numbers.",
            "choices": list(DTYPES),
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: the model's, sdpa).", "choices": list(ATTENTION_KERNELS)},
    )
    workers: int = field(default=1, metadata={"help": "uvicorn worker processes, each with its own model copy."})
    access_log: bool = field(default=True, metadata={"help": "Log every request (--no_access_log to turn off)."})
    graceful_timeout: float = field(
        default=30.0, metadata={"help": "Seconds shutdown waits for in-flight requests before closing."}
    )

    def exit_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EXIT_OPTIONS if getattr(self, name) is not None}


class RequestError(Exception):
    """A bad request: answered with `status` and `{"detail": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BatchFailed(Exception):
    """The forward of the batch holding a request raised."""


class ShuttingDown(Exception):
    """A request arrived after shutdown began."""


def parse_predict_body(body: bytes, max_texts: int, max_chars: int) -> list[Example]:
    """Validate a `/predict` body; `RequestError` (400/413/422) says what is wrong and where."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RequestError(400, f"The body is not valid JSON: {error}.") from None
    if not isinstance(payload, dict):
        raise RequestError(422, 'The body must be a JSON object like {"texts": ["a text", ...]}.')
    unknown = sorted(set(payload) - {"texts"})
    if unknown:
        raise RequestError(422, f"Unknown field(s) {', '.join(map(repr, unknown))}; the only field is 'texts'.")
    texts = payload.get("texts")
    if not isinstance(texts, list):
        raise RequestError(422, "'texts' must be a list of strings or [text, text_pair] pairs.")
    if not texts:
        raise RequestError(422, "'texts' is empty; send at least one text.")
    if len(texts) > max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; the limit is {max_texts}.")
    examples: list[Example] = []
    for i, item in enumerate(texts):
        if isinstance(item, str):
            parts = [item]
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            parts = item
        else:
            raise RequestError(422, f"texts[{i}] must be a string or a [text, text_pair] pair of two strings.")
        for part in parts:
            if len(part) > max_chars:
                raise RequestError(413, f"texts[{i}] has {len(part)} characters; the limit is {max_chars}.")
        examples.append((parts[0], parts[1] if len(parts) == 2 else None))
    return examples


@dataclass
class _Pending:
    examples: list[Example]
    future: asyncio.Future
    arrived: float
    answers: list[dict | None] = field(default_factory=list)
    missing: int = 0


# The batch function: texts → chunks `(positions among the texts, their answers)` as its forward passes end.
BatchRunner = Callable[[list[Example]], Iterable[tuple[Sequence[int], list[dict]]]]


def forward_thread(threads: int | None = None) -> ThreadPoolExecutor:
    """The one thread that runs the model, with `threads` torch threads.

    Load the model in this thread too (`forward_thread().submit(PabeePipeline.from_pretrained, ...)`): torch's
    OpenMP gives every thread that runs a parallel op its own team of threads, and once the teams together
    outnumber the cores, idle team threads sleep instead of spinning, so each op waits to wake them. On 2 cores,
    one team was 1.2–1.3x as fast as two in float32 and 1.6–1.9x in bfloat16 (`benchmarks/results/thread_pools.md`).
    """
    initializer = (lambda: torch.set_num_threads(threads)) if threads else None
    return ThreadPoolExecutor(1, thread_name_prefix="pabee-forward", initializer=initializer)


class MicroBatcher:
    """Gathers concurrent requests into batches and runs each batch in one worker thread.

    A batch closes when `max_batch_size` texts are waiting or `max_wait` seconds after its first request
    arrived, whichever comes first; requests are never split, so one request larger than `max_batch_size` runs
    alone. Requests that arrive while a batch runs form the next one.

    The batch function yields its answers in chunks as its forward passes end (shortest texts first), and a
    request is answered as soon as all of its texts are: its client can send the next request while the rest of
    the batch is still running, so the worker thread need not sit idle between batches.

    Args:
        run: the batch function; runs in the worker thread.
        on_batch: called on the event loop after each successful batch with
            `(num_requests, answers, seconds)`; for metrics.
        executor: the single worker thread to run batches in (default: a new one); see `forward_thread`.
    """

    def __init__(
        self,
        run: BatchRunner,
        max_batch_size: int,
        max_wait: float,
        on_batch: Callable[[int, list[dict], float], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait < 0:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1 and max_wait={max_wait} >= 0.")
        self.run, self.max_batch_size, self.max_wait = run, max_batch_size, max_wait
        self.on_batch, self.on_failure = on_batch, on_failure
        self._executor = executor or forward_thread()
        self._pending: deque[_Pending] = deque()
        self._waiting = 0  # texts in _pending
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="pabee-micro-batcher")

    async def call_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the forward thread (e.g. a warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, examples: list[Example]) -> list[dict]:
        """Queue one request's texts; returns their answers (raises `BatchFailed` or `ShuttingDown`)."""
        if self._closing or self._task is None:
            raise ShuttingDown("The server is shutting down.")
        loop = asyncio.get_running_loop()
        pending = _Pending(examples, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._waiting += len(examples)
        self._wakeup.set()
        return await pending.future

    async def stop(self) -> None:
        """Answer everything already queued, then stop the loop and the worker thread."""
        self._closing = True
        if self._task is not None:
            self._wakeup.set()
            await self._task
        self._executor.shutdown(wait=True)

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _take_batch(self) -> list[_Pending]:
        batch, size = [], 0
        while self._pending:
            pending = self._pending[0]
            if batch and size + len(pending.examples) > self.max_batch_size:
                break
            self._pending.popleft()
            self._waiting -= len(pending.examples)
            if pending.future.done():  # the client went away while waiting
                continue
            batch.append(pending)
            size += len(pending.examples)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wait(None)
                continue
            deadline = self._pending[0].arrived + self.max_wait
            while self._waiting < self.max_batch_size and not self._closing:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await self._wait(remaining)
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        owners = []  # position in the batch → (request, index among its texts)
        for pending in batch:
            pending.answers, pending.missing = [None] * len(pending.examples), len(pending.examples)
            owners += [(pending, i) for i in range(len(pending.examples))]
        examples = [e for pending in batch for e in pending.examples]
        answers: list[dict | None] = [None] * len(examples)
        missing = len(examples)
        start = time.perf_counter()

        def deliver(positions: Sequence[int], chunk: list[dict]) -> None:  # on the event loop
            nonlocal missing
            for position, answer in zip(positions, chunk, strict=True):
                if answers[position] is None:
                    missing -= 1
                pending, i = owners[position]
                answers[position] = pending.answers[i] = answer
                pending.missing -= 1
                if pending.missing == 0 and not pending.future.done():
                    pending.future.set_result(pending.answers)
            if missing == 0 and self.on_batch is not None:  # before any of these callers hears back
                self.on_batch(len(batch), answers, time.perf_counter() - start)

        def work() -> None:  # in the worker thread; `deliver` calls run on the loop in order, before it resumes
            for positions, chunk in self.run(examples):
                loop.call_soon_threadsafe(deliver, positions, chunk)

        try:
            await loop.run_in_executor(self._executor, work)
            if missing:
                raise RuntimeError("the batch function left some texts without an answer")
        except Exception as error:  # one bad batch must not take the server down
            if self.on_failure is not None:
                self.on_failure(error)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(BatchFailed(f"{type(error).__name__}: {error}"))


class _Metrics:
    """Prometheus metrics in a registry of their own, so several apps in one process never clash."""

    def __init__(self, num_layers: int) -> None:
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

    def batch_done(self, num_requests: int, answers: list[dict], seconds: float) -> None:
        self.batch_size.observe(len(answers))
        self.batch_requests.observe(num_requests)
        self.batch_seconds.observe(seconds)
        self.texts.inc(len(answers))
        for answer in answers:
            self.exit_layer.observe(answer["exit_layer"])


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def create_app(
    pipeline: PabeePipeline,
    *,
    max_batch_size: int = 32,
    max_wait_ms: float = 5.0,
    max_texts_per_request: int = 64,
    max_text_chars: int = 5000,
    threads: int | None = None,
    model_name: str | None = None,
    executor: ThreadPoolExecutor | None = None,
) -> FastAPI:
    """The FastAPI app serving `pipeline` (its exit options apply to every request).

    The micro-batcher starts and stops with the app's lifespan: run it under uvicorn, or in tests inside
    `with TestClient(app)`. `executor` is the thread the pipeline was loaded in (`forward_thread`); without
    one, a new thread with `threads` torch threads runs the batches.
    """
    for name, value in (("max_texts_per_request", max_texts_per_request), ("max_text_chars", max_text_chars)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid; use a whole number >= 1.")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} is invalid; use a whole number >= 1.")
    metrics = _Metrics(pipeline.num_layers)
    # Each JSON-escaped character takes at most 6 bytes; beyond that the body cannot be a valid request.
    max_body = 6 * max_texts_per_request * (2 * max_text_chars + 8) + 4096

    def run(examples: list[Example]) -> Iterator[tuple[list[int], list[dict]]]:
        for rows, logits, exit_layers in pipeline.run_batches(examples, batch_size=max_batch_size):
            yield rows, pipeline.format(logits, exit_layers)

    batcher = MicroBatcher(
        run,
        max_batch_size,
        max_wait_ms / 1000,
        on_batch=metrics.batch_done,
        on_failure=lambda error: metrics.batch_failures.inc(),
        executor=executor or forward_thread(threads),
    )
    info = {
        "model": model_name or str(getattr(pipeline.model.config, "name_or_path", "")),
        "labels": pipeline.labels,
        "num_layers": pipeline.num_layers,
        "exit_options": pipeline.exit_options,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_texts_per_request": max_texts_per_request,
        "max_text_chars": max_text_chars,
        "max_seq_length": pipeline.max_length,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        await batcher.call_in_worker(lambda: list(run([("warm up", None)])))  # the first request should not pay
        yield
        await batcher.stop()  # uvicorn has finished the in-flight requests by now

    app = FastAPI(title="pabee", summary="PABEE early-exit classification", lifespan=lifespan)
    app.state.pipeline, app.state.batcher, app.state.metrics = pipeline, batcher, metrics

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body:
            raise RequestError(413, f"The body has {declared} bytes; the limit is {max_body}.")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise RequestError(413, f"The body is larger than the limit of {max_body} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        try:
            examples = parse_predict_body(await read_body(request), max_texts_per_request, max_text_chars)
            answers = await batcher.submit(examples)
            response: Response = JSONResponse({"predictions": answers})
        except RequestError as error:
            response = _error(error.status, error.message)
        except BatchFailed as error:
            response = _error(500, f"Inference failed for the batch holding this request ({error}).")
        except ShuttingDown as error:
            response = _error(503, str(error))
        metrics.requests.labels("/predict", str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health() -> Response:
        if batcher.closing:
            metrics.requests.labels("/health", "503").inc()
            return JSONResponse({"status": "shutting down", **info}, status_code=503)
        metrics.requests.labels("/health", "200").inc()
        return JSONResponse({"status": "ok", **info})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        metrics.requests.labels("/metrics", "200").inc()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def app_from_args(args: ServeArguments) -> FastAPI:
    """Load the model and build the app as `pabee serve` configures it."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    executor = forward_thread(threads)
    pipe = executor.submit(
        PabeePipeline.from_pretrained,
        args.model,
        batch_size=args.max_batch_size,
        max_length=args.max_seq_length,
        exit_options=args.exit_options(),
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    ).result()
    return create_app(
        pipe,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_texts_per_request=args.max_texts_per_request,
        max_text_chars=args.max_text_chars,
        threads=threads,
        model_name=args.model,
        executor=executor,
    )


def app_from_environment() -> FastAPI:
    """uvicorn's app factory for `--workers N`: each worker reads the settings from `PABEE_SERVE_CONFIG`."""
    return app_from_args(ServeArguments(**json.loads(os.environ[ENV_CONFIG])))


def run_server(args: ServeArguments, app_factory: Callable[[ServeArguments], FastAPI] = app_from_args) -> None:
    """Serve until SIGINT/SIGTERM; shutdown stops accepting, finishes in-flight requests, then exits."""
    import uvicorn

    _check_serve_args(args)
    options = {
        "host": args.host,
        "port": args.port,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": args.graceful_timeout,
        "log_level": "info",
    }
    try:
        app = app_factory(args)  # with several workers too: a bad model or option fails here, once
    except ValueError as error:
        raise PabeeError(str(error)) from None
    if args.workers == 1:
        uvicorn.run(app, **options)
    else:
        del app
        os.environ[ENV_CONFIG] = json.dumps(asdict(args))
        # A worker answers uvicorn's health pings only once torch and the model have loaded: allow for that.
        options["timeout_worker_healthcheck"] = 120
        uvicorn.run("pabee.serve:app_from_environment", factory=True, workers=args.workers, **options)


def _check_serve_args(args: ServeArguments) -> None:
    checks: Sequence[tuple[str, float, float]] = (
        ("--max_batch_size", args.max_batch_size, 1),
        ("--max_wait_ms", args.max_wait_ms, 0),
        ("--max_texts_per_request", args.max_texts_per_request, 1),
        ("--max_text_chars", args.max_text_chars, 1),
        ("--max_seq_length", args.max_seq_length, 2),
        ("--workers", args.workers, 1),
        ("--port", args.port, 0),
    )
    for flag, value, low in checks:
        if value < low:
            raise PabeeError(f"{flag} {value} is invalid; use a number >= {low}.")
    if args.threads is not None and args.threads < 1:
        raise PabeeError(f"--threads {args.threads} is invalid; use a whole number >= 1.")
