"""What the server benchmarks share: `pabee serve` started and stopped on 127.0.0.1, a minimal keep-alive HTTP/1.1
client on asyncio streams (little CPU taken from a server on the same cores), closed-loop clients, /metrics.

Every load is bounded in time and count and stops by itself.
"""

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOGS = Path(os.environ.get("TMPDIR", "/tmp"))


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def bodies(examples: list, **fields: Any) -> list[bytes]:
    """/predict request bodies, one text (a sentence, or a `(text, pair or None)`) each, with `fields` beside it."""
    items = [e if isinstance(e, str) else e[0] if e[1] is None else list(e) for e in examples]
    return [json.dumps({"texts": [item], **fields}).encode() for item in items]


def flags(**options: Any) -> list[str]:
    """`pabee serve` flags: `--name value` for each option (floats as `%g`), `--name` alone for True, None left out."""
    out = []
    for name, value in options.items():
        if value is True:
            out.append(f"--{name}")
        elif value is not None and value is not False:
            out += [f"--{name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return out


class Connection:
    """One keep-alive HTTP/1.1 connection; `request` returns (status, body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """One request; a kept-alive connection the server has closed meanwhile is opened again, once."""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        head += "Content-Type: application/json\r\n\r\n" if body else "\r\n"
        for reused in (self.writer is not None, False):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(head.encode() + body)
                await self.writer.drain()
                status_line = await self.reader.readuntil(b"\r\n")
                break
            except (OSError, asyncio.IncompleteReadError):
                await self.close()
                if not reused:
                    raise
        headers = {}
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        body = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":  # the server hangs up (uvicorn beyond its connection limit)
            await self.close()
        return int(status_line.split()[1]), body

    async def close(self) -> None:
        """Close, quietly if the server already dropped the connection; the next request opens a new one."""
        if self.writer is not None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                self.writer.close()
                await self.writer.wait_closed()
            self.reader = self.writer = None


async def get(port: int, path: str) -> tuple[int, bytes]:
    connection = Connection(port)
    try:
        return await connection.request("GET", path)
    finally:
        await connection.close()


def metrics(port: int) -> dict[str, float]:
    """Every `pabee_*` sample of the server's /metrics page, by name (labels included)."""
    values = {}
    for line in asyncio.run(get(port, "/metrics"))[1].decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith("pabee_"):
            values[name] = float(value)
    return values


def timed_load(port: int, requests: list[bytes], clients: int, warmup: float, duration: float, max_requests: int):
    """Closed-loop clients through a warm-up and a timed window: each client (client i draws from a generator
    seeded i) sends a random body of `requests` when its previous answer arrived, until the window ends or
    `max_requests` were sent in all. The window's answers `(sent, answered, status, body)`, all 200s (any other
    status is an error), and its seconds (shorter if `max_requests` ended it early)."""

    async def run() -> tuple[float, list[tuple], float]:
        loop, rows = asyncio.get_running_loop(), []
        start = loop.time() + warmup

        async def client(index: int) -> None:
            rng, connection = random.Random(index), Connection(port)
            try:
                while loop.time() < start + duration and len(rows) < max_requests:
                    sent = loop.time()
                    status, answer = await connection.request("POST", "/predict", rng.choice(requests))
                    rows.append((sent, loop.time(), status, answer))
            finally:
                await connection.close()

        await asyncio.gather(*(client(i) for i in range(clients)))
        return start, rows, loop.time()

    start, rows, ended = asyncio.run(run())
    if errors := [r for r in rows if r[2] != 200]:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0][2]}: {errors[0][3][:200]!r}")
    return [r for r in rows if r[0] >= start and r[1] <= start + duration], min(start + duration, ended) - start


def exit_layers(rows: list[tuple]) -> list[int]:
    """The exit layer of each answer (one text per request)."""
    return [json.loads(row[3])["predictions"][0]["exit_layer"] for row in rows]


@contextlib.contextmanager
def serving(model: str, options: list[str], log_name: str):
    """`pabee serve --model model *options` on a free port for the `with` block, once /health answers: yields
    (port, process); its output goes to $TMPDIR/`log_name`. Stopped with SIGTERM (a graceful shutdown), then
    SIGKILL if that takes over a minute."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pabee", "serve", "--model", model, "--port", str(port), *options]
    log = LOGS / log_name
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 180
        while not asyncio.run(healthy(port)):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {log}")
            time.sleep(0.3)
        yield port, server
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def healthy(port: int) -> bool:
    try:
        return (await get(port, "/health"))[0] == 200
    except OSError:
        return False


async def open_loop(port: int, requests: list[bytes], segments: list[tuple[float, float]], seed: int = 0,
                    connections: int = 200) -> list[tuple]:  # fmt: skip
    """Arrivals that do not wait for answers: for each `(seconds, rate)` segment, Poisson arrivals at `rate` a
    second, each sending a random body of `requests` on a free keep-alive connection of a pool (waiting for one
    counts as latency). The pool hands out the connection freed last, so a light load keeps few open, and holds
    fewer than `pabee serve`'s --max_connections (256): refusals are the server's admission control, not
    uvicorn's connection limit, which idle keep-alive connections count against. Rows `(scheduled, answered,
    status, body, index of the request sent)`, times relative to the start."""
    loop, rng, rows = asyncio.get_running_loop(), random.Random(seed), []
    pool: asyncio.LifoQueue = asyncio.LifoQueue()
    for _ in range(connections):
        pool.put_nowait(Connection(port))

    async def send(scheduled: float, index: int) -> None:
        connection = await pool.get()
        try:
            status, answer = await connection.request("POST", "/predict", requests[index])
        except (OSError, asyncio.IncompleteReadError):
            status, answer = 0, b""
        finally:
            pool.put_nowait(connection)
        rows.append((scheduled, loop.time() - start, status, answer, index))

    start, at, tasks = loop.time(), 0.0, []
    for seconds, rate in segments:
        end = at + seconds
        while (at := at + rng.expovariate(rate)) < end:
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks.append(asyncio.ensure_future(send(at, rng.randrange(len(requests)))))
        at = end
    await asyncio.gather(*tasks)
    while not pool.empty():
        await pool.get_nowait().close()
    return rows
