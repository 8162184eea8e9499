"""Serving on Ray Serve: `pabee serve --ray --replicas N`, or `pabee.ray.deployment(model, ...)` in your own app.

Each replica runs the very app `pabee serve` runs (`pabee.server.create_app`: same routes, limits, errors, API key
and metrics), with one difference inside: `ServeBatcher` lets Ray Serve's `@serve.batch` gather concurrent
requests into batches, while the admission control (`--max_queue` → 503, `--request_timeout` → 504, queued texts
withdrawn) stays ours. Ray Serve's proxy spreads requests over the replicas; `/metrics` answers for the replica
that takes the request (Ray's own metrics cover the cluster).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve

from ..arguments import ServeArguments
from ..batching import MicroBatcher, Request
from ..errors import PabeeError
from ..serve import app_from_args, note_exit_setting, warn_if_open

__all__ = ["PabeeServer", "ServeBatcher", "deployment", "run_ray_server"]

APP_NAME = "pabee"


def _texts(requests: list[Request]) -> int:
    return sum(len(request.examples) for request in requests)


class ServeBatcher(MicroBatcher):
    """`MicroBatcher` with `@serve.batch` gathering the requests: admission control, accounting and running stay
    the micro-batcher's (`run_requests`); only the gathering hooks differ.

    A batch holds whole requests and at most `max_batch_size` texts (`serve.batch`'s `batch_size_fn` counts
    texts); a request larger than that runs alone, as with `MicroBatcher`. A request cancelled before its batch
    starts leaves the queue unrun (`serve.batch` skips cancelled callers).
    """

    async def start_gathering(self) -> None:
        self._batched = serve.batch(
            max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.max_wait, batch_size_fn=_texts
        )(self._run_gathered)

    async def stop_gathering(self) -> None:
        """Ray Serve drains the replica's requests itself before it stops the replica."""

    async def gather(self, request: Request) -> list[dict]:
        if len(request.examples) > self.max_batch_size:  # serve.batch refuses an item larger than its batches
            outcome = (await self._run_gathered([request]))[0]
        else:
            outcome = await self._batched(request)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _run_gathered(self, requests: list[Request]) -> list[list[dict] | BaseException]:
        """One `serve.batch` batch: each request's answers, or the error that ended its batch, per request."""
        await self.run_requests(requests)
        return [_outcome(request.future) for request in requests]


def _outcome(future: asyncio.Future) -> list[dict] | BaseException:
    """A finished request's answers or error, as a value `serve.batch` can hand back to its caller."""
    if future.cancelled():  # its caller is gone and reads nothing
        return asyncio.CancelledError()
    return future.exception() or future.result()


@serve.ingress()
class PabeeServer:
    """A Ray Serve replica: loads the model, then serves `pabee serve`'s app with `ServeBatcher`."""

    def __init__(self, args: ServeArguments) -> None:
        self.args = args

    def __serve_build_asgi_app__(self) -> FastAPI:
        return app_from_args(self.args, batcher_class=ServeBatcher)


def _replica_threads(args: ServeArguments) -> int:
    """Torch threads (and Ray CPUs) per replica: `--threads`, else this machine's cores shared by the replicas."""
    return args.threads or max(1, (os.cpu_count() or 1) // args.replicas)


def _application(args: ServeArguments) -> serve.Application:
    threads = _replica_threads(args)
    return serve.deployment(
        PabeeServer,
        name=APP_NAME,
        num_replicas=args.replicas,
        ray_actor_options={"num_cpus": threads},
        # Let every request reach a replica, where --max_queue decides (503 at once) instead of Ray's queue.
        max_ongoing_requests=args.max_queue + args.max_batch_size,
        max_queued_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.graceful_timeout,
    ).bind(replace(args, threads=threads))


def deployment(model: str, **options: Any) -> serve.Application:
    """A Ray Serve application serving `model` as `pabee serve` does; `options` are its flags as keywords
    (`replicas`, `threads`, `max_batch_size`, `max_queue`, `request_timeout`, `api_key`, `patience`, ...).

    Example:
        >>> serve.run(pabee.ray.deployment("runs/sst2", replicas=2, threads=1), route_prefix="/")
    """
    options.pop("ray", None)
    return _application(ServeArguments(model=model, ray=True, **options))


def _check_cpus(args: ServeArguments) -> None:
    threads = _replica_threads(args)
    available = int(ray.cluster_resources().get("CPU", 0))
    if args.replicas * threads > available:
        raise PabeeError(
            f"{args.replicas} replicas x {threads} threads need {args.replicas * threads} CPUs; the Ray cluster has "
            f"{available}. Use fewer --replicas or --threads."
        )


def run_ray_server(args: ServeArguments) -> None:
    """Serve on Ray Serve until SIGINT/SIGTERM, then shut the application down (in-flight requests finish)."""
    from .batch_predict import connect

    if not os.path.isdir(args.model):
        raise PabeeError(f"--model {args.model} is not a folder.")
    warn_if_open(args)
    note_exit_setting(args)
    connect(args.ray_address)
    _check_cpus(args)
    serve.start(http_options={"host": args.host, "port": args.port})
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(_application(args), name=APP_NAME, route_prefix="/")
        print(
            f"pabee serve: {args.replicas} replica(s) on Ray Serve at http://{args.host}:{args.port}; Ctrl-C stops.",
            file=sys.stderr,
            flush=True,
        )
        stop.wait()
    finally:
        serve.shutdown()
