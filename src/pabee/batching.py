"""Dynamic micro-batching: concurrent requests gathered into one early-exit forward, run in one model thread.

Kept apart from the HTTP layer (`serve.py`) so any front end (FastAPI here, Ray Serve later) can share it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import torch

from .pipeline import Example

__all__ = ["BatchFailed", "BatchRunner", "MicroBatcher", "ShuttingDown", "forward_thread"]


class BatchFailed(Exception):
    """The forward of the batch holding a request raised."""


class ShuttingDown(Exception):
    """A request arrived after shutdown began."""


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
