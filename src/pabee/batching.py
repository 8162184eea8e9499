"""Dynamic micro-batching: concurrent requests gathered into one early-exit forward, run in one model thread.

Kept apart from the HTTP layer (`server.py`), so the same app can run with another batcher. Admission control
(`admit`, `withdraw`), running a batch of whole requests (`run_requests`: answers delivered per request; a failed
batch run again request by request, so a failure costs only the request that causes it) and the lifecycle are
the batcher's own; *gathering* requests into batches is the extension point: a subclass overrides
`start_gathering`, `stop_gathering` and `gather` (on Ray Serve, `pabee.ray.serving.ServeBatcher` lets
`@serve.batch` gather and calls `run_requests`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from .pipeline import Example

__all__ = ["BatchFailed", "BatchRunner", "MicroBatcher", "Overloaded", "Request", "ShuttingDown", "forward_thread"]


class BatchFailed(Exception):
    """The forward of the batch holding a request raised."""


class ShuttingDown(Exception):
    """A request arrived after shutdown began."""


class Overloaded(Exception):
    """The queue is full: refused at once, so the client can go elsewhere instead of waiting in a long line."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after  # whole seconds until the queue has likely drained


@dataclass
class Request:
    """One caller's texts on their way through the batcher: admitted (counted as queued), then started (its batch
    took it; no longer withdrawable), then answered through `future` (its answers, or `BatchFailed`)."""

    examples: list[Example]
    future: asyncio.Future
    arrived: float
    setting: Any = None  # the caller's own setting (opaque here; None: the batcher's `choose` picks)
    answers: list[dict | None] = field(default_factory=list)
    missing: int = 0
    started: bool = False
    withdrawn: bool = False


# The batch function: texts and each text's setting → chunks `(positions among the texts, their answers)` as its
# forward passes end.
BatchRunner = Callable[[list[Example], list[Any]], Iterable[tuple[Sequence[int], list[dict]]]]
# Picks the setting of a batch's texts that came without one, from the texts waiting (the batch's included) and
# the seconds its oldest request has waited.
Chooser = Callable[[int, float], Any]


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

    Admission control: with `max_queue`, a request that would make more than `max_queue` texts wait is refused
    at once with `Overloaded` (a request always fits an empty queue). A caller that stops waiting (a timeout,
    a client gone) takes its texts out of the queue if their batch has not started, so they cost nothing.

    Each request may carry its own setting (opaque to the batcher: an exit setting, for the server); for those
    that do not, `choose` picks one per batch from the queue it sees, and `run` gets every text's setting.

    Args:
        run: the batch function `(texts, settings)`; runs in the worker thread.
        on_batch: called on the event loop after each successful batch with
            `(num_requests, answers, seconds, chosen)` (`chosen`: what `choose` picked, None if it did not run);
            for metrics.
        choose: the setting of the texts that came without one (default: None, which `run` takes as its own).
        executor: the single worker thread to run batches in (default: a new one); see `forward_thread`.
    """

    def __init__(
        self,
        run: BatchRunner,
        max_batch_size: int,
        max_wait: float,
        on_batch: Callable[[int, list[dict], float, Any], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        executor: ThreadPoolExecutor | None = None,
        max_queue: int | None = None,
        on_withdraw: Callable[[int], None] | None = None,
        choose: Chooser | None = None,
    ) -> None:
        if max_batch_size < 1 or max_wait < 0 or (max_queue is not None and max_queue < 1):
            raise ValueError(
                f"max_batch_size={max_batch_size} and max_queue={max_queue} must be >= 1, max_wait={max_wait} >= 0."
            )
        self.run, self.max_batch_size, self.max_wait, self.max_queue = run, max_batch_size, max_wait, max_queue
        self.on_batch, self.on_failure, self.on_withdraw, self.choose = on_batch, on_failure, on_withdraw, choose
        self._texts_per_second: float | None = None  # recent throughput, for Retry-After
        self._executor = executor or forward_thread()
        self._pending: deque[Request] = deque()  # admitted, waiting for the gathering loop
        self._waiting = 0  # texts admitted whose batch has not started
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._open = False  # accepting requests: from start() on

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def queued(self) -> int:
        """Texts waiting for a batch (not yet started)."""
        return self._waiting

    @property
    def full(self) -> bool:
        """No request of any size would be admitted now."""
        return self.max_queue is not None and self._waiting >= self.max_queue

    def overloaded(self) -> Overloaded:
        """The refusal for a request that does not fit the queue now."""
        return Overloaded(
            f"The server is busy: {self._waiting} texts are queued and the limit is {self.max_queue}; retry later.",
            self.retry_after(),
        )

    def retry_after(self) -> int:
        """Whole seconds (>= 1) the queued texts will likely take at the recent throughput."""
        if not self._texts_per_second:
            return 1
        return max(1, math.ceil(self._waiting / self._texts_per_second))

    # --- lifecycle ------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Accept requests from now on."""
        self._open = True
        await self.start_gathering()

    async def stop(self) -> None:
        """Refuse new requests, answer everything already admitted, then stop the worker thread."""
        self._closing = True
        await self.stop_gathering()
        self._executor.shutdown(wait=True)

    async def call_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the forward thread (e.g. a warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, examples: list[Example], setting: Any = None) -> list[dict]:
        """One request's texts (with its own `setting`, or None) → their answers (raises `BatchFailed`,
        `Overloaded`, `ShuttingDown`). A caller that stops waiting (a timeout, a client gone) takes its texts out
        of the queue if their batch has not started."""
        request = self.admit(examples, setting)
        try:
            return await self.gather(request)
        except asyncio.CancelledError:
            self.withdraw(request)
            raise

    # --- admission control -----------------------------------------------------------------------------------

    def admit(self, examples: list[Example], setting: Any = None) -> Request:
        """Refuse a request now (`ShuttingDown`, `Overloaded`) or count its texts as queued and return it."""
        if self._closing or not self._open:
            raise ShuttingDown("The server is shutting down.")
        if self.max_queue is not None and self._waiting and self._waiting + len(examples) > self.max_queue:
            raise self.overloaded()
        self._waiting += len(examples)
        loop = asyncio.get_running_loop()
        return Request(examples, loop.create_future(), loop.time(), setting)

    def withdraw(self, request: Request) -> None:
        """Uncount a request that leaves before its batch started (nothing to do once it has started)."""
        if request.started or request.withdrawn:
            return
        request.withdrawn = True
        self._waiting -= len(request.examples)
        if self.on_withdraw is not None:
            self.on_withdraw(len(request.examples))

    def _begin(self, request: Request) -> None:
        """A batch takes the request: it stops counting as queued and can no longer be withdrawn."""
        if not request.started and not request.withdrawn:
            self._waiting -= len(request.examples)
        request.started = True

    def _record_rate(self, texts: int, seconds: float) -> None:
        """Keep a moving average of the throughput, which `retry_after` turns into seconds to wait."""
        rate = texts / max(seconds, 1e-6)
        previous = self._texts_per_second
        self._texts_per_second = rate if previous is None else 0.8 * previous + 0.2 * rate

    # --- gathering: the extension point ----------------------------------------------------------------------

    async def start_gathering(self) -> None:
        """Begin gathering admitted requests into batches (here: a loop on the event loop)."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="pabee-micro-batcher")

    async def stop_gathering(self) -> None:
        """Return once every admitted request has been run (called after new ones are refused)."""
        if self._task is not None:
            self._wakeup.set()
            await self._task

    async def gather(self, request: Request) -> list[dict]:
        """Put an admitted request into a batch and return its answers once `run_requests` has run that batch."""
        self._pending.append(request)
        self._wakeup.set()
        try:
            return await request.future
        except asyncio.CancelledError:
            if not request.started:  # else its batch runs anyway and the answers are dropped
                self._pending.remove(request)
            raise

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        with suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _take_batch(self) -> list[Request]:
        batch, size = [], 0
        while self._pending:
            request = self._pending[0]
            if batch and size + len(request.examples) > self.max_batch_size:
                break
            self._pending.popleft()
            self._begin(request)
            if request.future.done():  # the client went away while waiting
                continue
            batch.append(request)
            size += len(request.examples)
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
                await self.run_requests(batch)

    # --- running a batch -------------------------------------------------------------------------------------

    async def run_requests(self, requests: list[Request]) -> None:
        """Run whole admitted requests as one batch in the forward thread. Each request's `future` gets its answers
        as soon as all of its texts are done (shortest texts first). If the batch function raises, the requests
        still unanswered are run again one by one, so only a request that fails alone gets `BatchFailed`: one bad
        request cannot fail its neighbours. Nothing is raised here, so one bad batch never takes the server down."""
        for request in requests:
            self._begin(request)
        waiting = self._waiting  # still queued behind this batch
        batch = [request for request in requests if not request.future.done()]
        chosen = self._choose(batch, waiting) if batch else None
        error = await self._run_together(batch, chosen) if batch else None
        if error is None:
            return
        for request in [request for request in batch if not request.future.done()]:
            alone = error if len(batch) == 1 else await self._run_together([request], chosen)
            if alone is not None and not request.future.done():
                failed = BatchFailed(f"{type(alone).__name__}: {alone}")
                failed.__cause__ = alone
                request.future.set_exception(failed)

    def _choose(self, batch: list[Request], waiting: int) -> Any:
        """What `choose` picks for this batch's texts that came without a setting (None: no chooser, or none
        came without one), from every text waiting, this batch's included, and its oldest request's age."""
        if self.choose is None or all(request.setting is not None for request in batch):
            return None
        texts = waiting + sum(len(request.examples) for request in batch)
        oldest = asyncio.get_running_loop().time() - min(request.arrived for request in batch)
        return self.choose(texts, oldest)

    async def _run_together(self, batch: list[Request], chosen: Any = None) -> Exception | None:
        """Run `batch`'s texts as one call of the batch function (texts without a setting of their own take
        `chosen`), answering each request as its texts are done; the error the call raised (reported to
        `on_failure`), or None."""
        loop = asyncio.get_running_loop()
        owners = []  # position in the batch → (request, index among its texts)
        for request in batch:
            request.answers, request.missing = [None] * len(request.examples), len(request.examples)
            owners += [(request, i) for i in range(len(request.examples))]
        examples = [e for request in batch for e in request.examples]
        settings = [request.setting if request.setting is not None else chosen
                    for request in batch for _ in request.examples]  # fmt: skip
        answers: list[dict | None] = [None] * len(examples)
        missing = len(examples)
        start = time.perf_counter()

        def deliver(positions: Sequence[int], chunk: list[dict]) -> None:  # on the event loop
            nonlocal missing
            for position, answer in zip(positions, chunk, strict=True):
                if answers[position] is None:
                    missing -= 1
                request, i = owners[position]
                answers[position] = request.answers[i] = answer
                request.missing -= 1
                if request.missing == 0 and not request.future.done():
                    request.future.set_result(request.answers)
            if missing == 0:  # before any of these callers hears back
                seconds = time.perf_counter() - start
                self._record_rate(len(answers), seconds)
                if self.on_batch is not None:
                    self.on_batch(len(batch), answers, seconds, chosen)

        def work() -> None:  # in the worker thread; `deliver` calls run on the loop in order, before it resumes
            for positions, chunk in self.run(examples, settings):
                loop.call_soon_threadsafe(deliver, positions, chunk)

        try:
            await loop.run_in_executor(self._executor, work)
            if missing:
                raise RuntimeError("the batch function left some texts without an answer")
        except Exception as error:  # one bad batch must not take the server down
            if self.on_failure is not None:
                self.on_failure(error)
            return error
        return None
