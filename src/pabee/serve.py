"""`pabee serve`: the command line's flags → a pipeline loaded in the forward thread → the HTTP app
(`pabee.server.create_app`) under uvicorn, with `--workers` processes; `--ray` serves the same app on Ray Serve
(`pabee.ray.serving`).

Shutdown drains: on SIGTERM, /health turns 503 at once (load balancers stop sending), the server keeps serving for
`--drain_seconds`, then stops accepting and finishes the requests in flight (up to `--graceful_timeout`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

from fastapi import FastAPI

from .arguments import API_KEY_VARIABLE, ServeArguments
from .batching import MicroBatcher, forward_thread
from .errors import PabeeError
from .load_control import LADDER_FILE, Ladder, Rung
from .pipeline import PabeePipeline
from .server import create_app
from .settings import exit_spec_from

__all__ = ["app_from_args", "drain_on_sigterm", "run_server", "warn_if_open"]

ENV_CONFIG = "PABEE_SERVE_CONFIG"  # how `--workers N` hands the settings to each worker process


def exit_ladder(args: ServeArguments, num_layers: int) -> Ladder | None:
    """The settings load may choose from: `--exit_ladder`'s, else the model folder's `exit_ladder.json` (from
    `pabee calibrate`, measured), under the `--max_disagreement` floor; None without `--latency_target_ms` or a
    ladder (then load can only queue)."""
    if args.latency_target_ms is None:
        return None
    if args.ladder_specs is not None:
        ladder = Ladder(tuple(Rung(spec) for spec in args.ladder_specs), num_layers)
    elif (Path(args.model) / LADDER_FILE).is_file():
        ladder = Ladder.from_file(Path(args.model) / LADDER_FILE, num_layers)
    else:
        return None
    return ladder.floored(args.max_disagreement / 100)


def _log_to_stderr() -> None:
    """pabee's own log lines (a switch of exit setting, a failed forward) beside uvicorn's, in its style."""
    log = logging.getLogger("pabee")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def app_from_args(args: ServeArguments, batcher_class: type[MicroBatcher] = MicroBatcher) -> FastAPI:
    """Load the model and build the app as `pabee serve` configures it."""
    _log_to_stderr()
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.workers))
    executor = forward_thread(threads)
    options = args.pipeline_options()
    pipe = executor.submit(
        partial(PabeePipeline.from_pretrained, args.model, batch_size=args.max_batch_size, **options)
    )
    pipe = pipe.result()
    return create_app(
        pipe,
        ladder=exit_ladder(args, pipe.num_layers),
        latency_target_ms=args.latency_target_ms,
        allow_request_exit=args.allow_request_exit,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_texts_per_request=args.max_texts_per_request,
        max_text_chars=args.max_text_chars,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        api_key=args.api_key,
        allowed_hosts=args.host_list,
        threads=threads,
        model_name=args.model,
        executor=executor,
        batcher_class=batcher_class,
    )


def app_from_environment() -> FastAPI:
    """uvicorn's app factory for `--workers N`: each worker reads the settings from `PABEE_SERVE_CONFIG`."""
    args = ServeArguments(**json.loads(os.environ[ENV_CONFIG]))
    return drain_on_sigterm(app_from_args(args), args.drain_seconds)


def drain_on_sigterm(app: FastAPI, seconds: float) -> FastAPI:
    """Put a drain in front of the SIGTERM and SIGINT handlers in place (uvicorn's, when called from its app
    factory): /health turns 503 at once (`app.state.draining`); after `seconds` (SIGTERM only; a second signal
    does not wait) the previous handler runs, and uvicorn stops accepting and finishes the requests in flight."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return app
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, _draining_handler(app, previous, seconds if sig == signal.SIGTERM else 0.0))
    return app


def _draining_handler(app: FastAPI, previous: Callable, seconds: float) -> Callable:
    def handle(sig: int, frame: object) -> None:
        if app.state.draining.is_set() or seconds <= 0:  # a second signal: stop waiting
            app.state.draining.set()
            previous(sig, frame)
            return
        app.state.draining.set()
        print(f"pabee serve: draining: /health answers 503; shutting down in {seconds:g} s.", file=sys.stderr)
        timer = threading.Timer(seconds, previous, (sig, frame))
        timer.daemon = True
        timer.start()

    return handle


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


def note_timeouts(args: ServeArguments) -> None:
    """Say which wins when shutdown would cut off requests the request timeout still allows."""
    if args.graceful_timeout < args.request_timeout:
        print(
            f"note: --graceful_timeout {args.graceful_timeout:g} s is shorter than --request_timeout "
            f"{args.request_timeout:g} s: at shutdown, requests still running after {args.graceful_timeout:g} s are "
            "cut off (the graceful timeout wins).",
            file=sys.stderr,
        )


def note_exit_setting(args: ServeArguments, app: FastAPI | None = None) -> None:
    """Say which exit setting every answer comes from, and how to choose a faster one that can be trusted: the
    app's pipeline's, or (Ray, whose replicas load their own) the folder's own with the flags over it."""
    from .folders import exit_setting_note, load_config

    if app is not None:
        pipe = getattr(getattr(app, "state", None), "pipeline", None)
        if pipe is None:  # an app that serves no pipeline (a test's stand-in): nothing to say
            return
        spec, own = pipe.exit_spec, pipe.model.config.exit_spec
    else:
        own = load_config(args.model).exit_spec
        spec = exit_spec_from(args.exit_keywords, own)
    print(f"pabee serve: exit setting: {exit_setting_note(args.model, spec, own)}", file=sys.stderr)


def run_server(args: ServeArguments, app_factory: Callable[[ServeArguments], FastAPI] = app_from_args) -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains (see the module docstring), then exits."""
    import uvicorn

    options = {
        "host": args.host,
        "port": args.port,
        "access_log": args.access_log,
        "timeout_graceful_shutdown": args.graceful_timeout,
        "limit_concurrency": args.max_connections,
        "log_level": "info",
    }
    warn_if_open(args)
    note_timeouts(args)
    try:
        app = app_factory(args)  # with several workers too: a bad model or option fails here, once
    except ValueError as error:
        raise PabeeError(str(error)) from None
    note_exit_setting(args, app)
    if args.workers == 1:
        # A factory: uvicorn calls it once its signal handlers are in place, so the drain goes in front of them.
        uvicorn.run(lambda: drain_on_sigterm(app, args.drain_seconds), factory=True, **options)
    else:
        del app
        os.environ[ENV_CONFIG] = json.dumps(asdict(args))
        # A worker answers uvicorn's health pings only once torch and the model have loaded: allow for that.
        options["timeout_worker_healthcheck"] = 120
        uvicorn.run("pabee.serve:app_from_environment", factory=True, workers=args.workers, **options)
