"""`pabee serve`: the command line's flags → a pipeline loaded in the forward thread → the HTTP app
(`pabee.server.create_app`) under uvicorn, with `--workers` processes; `--ray` serves the same app on Ray Serve
(`pabee.ray.serving`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

from fastapi import FastAPI

from .arguments import API_KEY_VARIABLE, ServeArguments
from .batching import MicroBatcher, forward_thread
from .errors import PabeeError
from .pipeline import PabeePipeline
from .server import create_app

__all__ = ["app_from_args", "run_server", "warn_if_open"]

ENV_CONFIG = "PABEE_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker process


def app_from_args(args: ServeArguments, batcher_class: type[MicroBatcher] = MicroBatcher) -> FastAPI:
    """Load the model and build the app as `pabee serve` configures it."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    executor = forward_thread(threads)
    options = args.pipeline_options()
    pipe = executor.submit(
        partial(PabeePipeline.from_pretrained, args.model, batch_size=args.max_batch_size, **options)
    )
    pipe = pipe.result()
    return create_app(
        pipe,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_texts_per_request=args.max_texts_per_request,
        max_text_chars=args.max_text_chars,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        threads=threads,
        model_name=args.model,
        executor=executor,
        batcher_class=batcher_class,
    )


def app_from_environment() -> FastAPI:
    """uvicorn's app factory for `--workers N`: each worker reads the settings from `PABEE_SERVE_CONFIG`."""
    return app_from_args(ServeArguments(**json.loads(os.environ[ENV_CONFIG])))


def _is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def warn_if_open(args: ServeArguments) -> None:
    """Say so when the server listens beyond this machine without an API key."""
    if args.api_key is None and not _is_loopback(args.host):
        print(
            f"warning: serving {args.host}:{args.port} without an API key: anyone who can reach it may use it "
            f"(set --api_key or ${API_KEY_VARIABLE}).",
            file=sys.stderr,
        )


def run_server(args: ServeArguments, app_factory: Callable[[ServeArguments], FastAPI] = app_from_args) -> None:
    """Serve until SIGINT/SIGTERM; shutdown stops accepting, finishes in-flight requests, then exits."""
    import uvicorn

    options = {
        "host": args.host,
        "port": args.port,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": args.graceful_timeout,
        "log_level": "info",
    }
    warn_if_open(args)
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
