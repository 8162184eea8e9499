"""Overload and soak of `pabee serve`: does admission control hold, and does the server stay the same over time?

Overload (per `--settings` pair `max_batch_size:max_queue`, each its own server, interleaved for `--rounds` rounds):
  1. capacity: `--capacity_clients` closed-loop clients (one SST-2 dev sentence per request): requests/s X;
  2. unloaded: open-loop Poisson arrivals at `--light_load` × X (a load it answers with room to spare);
  3. overload: open-loop Poisson arrivals at `--overload` × X (4× by default) for `--duration` seconds.
  Reported: p50/p99 of accepted (200) requests, how fast 503s come back, statuses, the slowest answer of any
  kind (nothing may hang past `--request_timeout`). Open loop, because closed-loop clients slow down with the
  server and so never overload it; latencies are measured from the moment a request was due.

Soak (`--soak_seconds`, 0 to skip; the server defaults): `--soak_clients` closed-loop clients for the whole time
(waiting 1 s after a 503, as `Retry-After` asks), plus an open-loop burst at `--soak_burst` × X for 10 s every
minute; statuses, p50/p99 per minute and the server's resident memory (RSS) each minute, from the end of a 60 s
warm-up that includes two bursts.

All clients run in this one process on the same machine as the server, so at high request rates they take CPU
from it; the report gives the rates, so this can be judged. `--server_cpus 0 --client_cpus 1` pins them to
separate cores instead, as a client on another machine would be (the server then has one core: `--threads 1`).

    python benchmarks/overload.py --model runs/sst2 --settings 32:128,32:32,8:8 --rounds 2 --soak_seconds 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

from load_test import (
    ROOT,
    Connection,
    free_port,
    launch_server,
    load_average,
    percentile,
    sst2_sentences,
    stop_server,
)

__all__ = ["main"]


def start_server(args: argparse.Namespace, setting: tuple[int, int], port: int, log: Path) -> subprocess.Popen:
    """`pabee serve` with `setting` = (--max_batch_size, --max_queue)."""
    max_batch_size, max_queue = setting
    flags = ["--no_access_log", "--threads", str(args.threads), "--max_batch_size", str(max_batch_size)]
    flags += ["--max_queue", str(max_queue), "--request_timeout", str(args.request_timeout)]
    flags += ["--max_texts_per_request", str(min(64, max_queue))]
    return launch_server(args.model, flags, port, log, cpus=args.server_cpus)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Log:
    """What came back: (due time, latency s, status) of every request."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, int]] = []

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict:
        rows = [r for r in self.rows if start <= r[0] < end]
        ok = [latency for _, latency, status in rows if status == 200]
        refused = [latency for _, latency, status in rows if status == 503]
        out = {"requests": len(rows), "statuses": dict(Counter(status for _, _, status in rows))}
        out["slowest_ms"] = 1000 * max((latency for _, latency, _ in rows), default=0.0)
        if len(ok) >= 2:
            out |= {"ok_p50_ms": 1000 * percentile(ok, 50), "ok_p99_ms": 1000 * percentile(ok, 99)}
        if len(refused) >= 2:
            out |= {"refused_p50_ms": 1000 * percentile(refused, 50), "refused_p99_ms": 1000 * percentile(refused, 99)}
        return out


async def closed_loop(port: int, sentences: list[str], clients: int, until: float, log: Log) -> None:
    """`clients` clients, each sending its next request when the previous answer arrives."""
    loop = asyncio.get_running_loop()

    async def client(seed: int) -> None:
        rng, connection = random.Random(seed), Connection(port)
        try:
            while loop.time() < until:
                began = loop.time()
                status, _ = await connection.request("POST", "/predict", _body(rng, sentences))
                log.rows.append((began, loop.time() - began, status))
                if status == 503:  # a well-behaved client waits as told (the server says Retry-After: 1 s or more)
                    await asyncio.sleep(min(1.0, until - loop.time()))
        finally:
            await connection.close()

    await asyncio.gather(*(client(seed) for seed in range(clients)))


async def open_loop(port: int, sentences: list[str], rate: float, start: float, until: float, log: Log) -> None:
    """Poisson arrivals at `rate` requests/s between loop times `start` and `until`, each on an idle connection."""
    loop, rng = asyncio.get_running_loop(), random.Random(int(rate * 1000))
    idle: list[Connection] = []
    tasks = []

    async def one(due: float) -> None:
        body, status = _body(rng, sentences), 0
        for attempt in range(2):  # the server may have closed an idle keep-alive connection: one retry, fresh
            connection = idle.pop() if idle and attempt == 0 else Connection(port)
            try:
                status, _ = await connection.request("POST", "/predict", body)
                idle.append(connection)
                break
            except (OSError, asyncio.IncompleteReadError):
                await connection.close_quietly()
        log.rows.append((due, loop.time() - due, status))  # status 0: no answer at all; counted, never hidden

    due = start
    while True:
        due += rng.expovariate(rate)
        if due >= until:
            break
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for connection in idle:
        await connection.close()


def _body(rng: random.Random, sentences: list[str]) -> bytes:
    return json.dumps({"texts": [rng.choice(sentences)]}).encode()


async def overload_run(args, port: int, sentences: list[str], max_queue: int) -> dict:
    """Capacity, then the light load, then the overload, on one running server.

    Capacity: as many closed-loop clients as the queue takes (at most `--capacity_clients`), so none is refused.
    """
    loop = asyncio.get_running_loop()
    warm, capacity = Log(), Log()
    clients = min(args.capacity_clients, max_queue)
    await closed_loop(port, sentences, clients, loop.time() + 3, warm)
    start = loop.time()
    await closed_loop(port, sentences, clients, start + args.duration, capacity)
    requests_per_s = sum(status == 200 for _, _, status in capacity.rows) / (loop.time() - start)
    light, heavy = Log(), Log()
    start = loop.time()
    await open_loop(port, sentences, args.light_load * requests_per_s, start, start + args.duration, light)
    start = loop.time()
    await open_loop(port, sentences, args.overload * requests_per_s, start, start + args.duration, heavy)
    result = {"capacity_req_s": requests_per_s, "capacity": capacity.summary()}
    result |= {"light": light.summary(), "overload": heavy.summary()}
    result["overload"]["answered_req_s"] = result["overload"]["statuses"].get(200, 0) / args.duration
    return result


async def soak_run(args, port: int, sentences: list[str], capacity: float, pid: int) -> dict:
    """Closed-loop clients for `soak_seconds`, a burst every minute, memory each minute."""
    loop = asyncio.get_running_loop()
    warm, rate = Log(), args.soak_burst * capacity
    now = loop.time()
    await asyncio.gather(  # batches at their largest, twice, before the RSS is read
        closed_loop(port, sentences, args.soak_clients, now + 60, warm),
        open_loop(port, sentences, rate, now + 10, now + 20, warm),
        open_loop(port, sentences, rate, now + 40, now + 50, warm),
    )
    start = loop.time()
    rss = [rss_mb(pid)]

    async def sample_memory() -> None:
        for minute in range(1, int(args.soak_seconds // 60) + 1):
            await asyncio.sleep(start + 60 * minute - loop.time())
            rss.append(rss_mb(pid))

    clients, bursts = Log(), Log()
    burst_tasks = [
        open_loop(port, sentences, rate, start + t, start + t + 10, bursts)
        for t in range(30, int(args.soak_seconds) - 10, 60)
    ]
    end = start + args.soak_seconds
    await asyncio.gather(closed_loop(port, sentences, args.soak_clients, end, clients), sample_memory(), *burst_tasks)
    minutes = [clients.summary(start + 60 * m, start + 60 * (m + 1)) for m in range(int(args.soak_seconds // 60))]
    for minute, memory in zip(minutes, rss[1:], strict=False):
        minute["rss_mb"] = memory
    return {
        "seconds": args.soak_seconds,
        "clients": args.soak_clients,
        "burst_req_s": rate,
        "closed_loop": clients.summary(),
        "bursts": bursts.summary(),
        "per_minute": minutes,
        "rss_mb_start": rss[0],
        "rss_mb_end": rss_mb(pid),
    }


def render_markdown(report: dict) -> str:
    lines = ["# Overload and soak of `pabee serve`", "", f"`{report['provenance']['command']}`", ""]
    hw = report["provenance"]["hardware"]
    lines += [f"Machine: {hw.get('cpu')}, {hw.get('cpu_count')} cores, flags {hw.get('cpu_flags')}.", ""]
    lines += [
        f"Model `{report['model']}`, server `--threads {report['threads']} --request_timeout "
        f"{report['request_timeout']}`; one SST-2 dev sentence per "
        f"request. Open-loop Poisson arrivals at {report['light_load']}× (light) and {report['overload']}× "
        "(overload) the capacity measured with closed-loop clients just before, on the same server; batch:queue is "
        "`--max_batch_size`:`--max_queue`. Medians over "
        f"{report['rounds']} interleaved rounds; per-round values in the JSON. Cores: server "
        f"{report.get('server_cpus', 'all')}, load clients {report.get('client_cpus', 'all')}.",
        "",
        "| batch:queue | capacity req/s | light p99 ms | overload: answered req/s | accepted p50 / p99 ms | "
        "p99 / light p99 | 503s | 503 p99 ms | other statuses | slowest ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for queue, row in report["overload_results"].items():
        statuses = {k: v for k, v in row["statuses"].items() if k not in ("200", "503")}
        lines.append(
            f"| {queue} | {row['capacity_req_s']:.1f} | {row['light_p99_ms']:.0f} | {row['answered_req_s']:.1f} | "
            f"{row['ok_p50_ms']:.0f} / {row['ok_p99_ms']:.0f} | {row['p99_ratio']:.2f} | {row['refused']} | "
            f"{row['refused_p99_ms']:.1f} | {statuses or 'none'} | {row['slowest_ms']:.0f} |"
        )
    lines += ["", report["verdict"], ""]
    if report.get("soak"):
        lines += _soak_markdown(report["soak"])
    return "\n".join(lines) + "\n"


def _soak_markdown(soak: dict) -> list[str]:
    growth, closed = soak["rss_mb_end"] / soak["rss_mb_start"] - 1, soak["closed_loop"]
    lines = [
        "## Soak",
        "",
        f"{soak['clients']} closed-loop clients for {soak['seconds']:.0f} s, plus a 10 s open-loop burst of "
        f"{soak['burst_req_s']:.0f} requests/s every minute (from 30 s on); server defaults (--max_queue "
        f"{soak['max_queue']}).",
        "",
        f"- Closed-loop clients: statuses {closed['statuses']}, p50 {closed['ok_p50_ms']:.0f} ms, "
        f"p99 {closed['ok_p99_ms']:.0f} ms, slowest {closed['slowest_ms']:.0f} ms.",
        f"- Bursts: statuses {soak['bursts']['statuses']}, slowest {soak['bursts']['slowest_ms']:.0f} ms.",
        f"- Server RSS {soak['rss_mb_start']:.0f} MB after warm-up → {soak['rss_mb_end']:.0f} MB at the end "
        f"({growth:+.1%}; target < +10%: {'met' if growth < 0.10 else 'missed'}).",
        "",
        "| minute | closed-loop requests | statuses | p50 ms | p99 ms | RSS MB at its end |",
        "|---|---|---|---|---|---|",
    ]
    for i, minute in enumerate(soak["per_minute"]):
        lines.append(
            f"| {i + 1} | {minute['requests']} | {minute['statuses']} | {minute.get('ok_p50_ms', 0):.0f} | "
            f"{minute.get('ok_p99_ms', 0):.0f} | {minute.get('rss_mb', 0):.0f} |"
        )
    return lines


def summarize(runs: dict[str, list[dict]], args) -> tuple[dict, str]:
    """Medians over rounds per setting, and the verdict on the targets."""
    table, verdicts = {}, []
    for queue, rounds in runs.items():

        def med(f, rounds=rounds) -> float:
            return statistics.median(f(r) for r in rounds)

        row = {
            "capacity_req_s": med(lambda r: r["capacity_req_s"]),
            "light_p99_ms": med(lambda r: r["light"]["ok_p99_ms"]),
            "answered_req_s": med(lambda r: r["overload"]["answered_req_s"]),
            "ok_p50_ms": med(lambda r: r["overload"]["ok_p50_ms"]),
            "ok_p99_ms": med(lambda r: r["overload"]["ok_p99_ms"]),
            "p99_ratio": med(lambda r: r["overload"]["ok_p99_ms"] / r["light"]["ok_p99_ms"]),
            "refused": sum(r["overload"]["statuses"].get(503, 0) for r in rounds),
            "refused_p99_ms": med(lambda r: r["overload"].get("refused_p99_ms", float("nan"))),
            "slowest_ms": max(r["overload"]["slowest_ms"] for r in rounds),
        }
        statuses = Counter()
        for r in rounds:
            statuses.update({str(k): v for k, v in r["overload"]["statuses"].items()})
        row["statuses"] = dict(statuses)
        table[queue] = row
        met = row["p99_ratio"] <= 2 and row["slowest_ms"] <= 1000 * args.request_timeout
        verdicts.append(f"{queue}: p99 {row['p99_ratio']:.2f}× light p99 ({'met' if met else 'missed'})")
    verdict = (
        f"Target: under {args.overload}× the load, accepted requests' p99 ≤ 2× the p99 at {args.light_load}× load, "
        f"the rest 503 at once, nothing past --request_timeout. " + "; ".join(verdicts) + "."
    )
    return table, verdict


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sst2", help="Fine-tuned PABEE folder (SST-2).")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument(
        "--settings", default="32:128,32:32,8:8", help="Comma-separated max_batch_size:max_queue pairs to compare."
    )
    parser.add_argument("--request_timeout", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="Server torch threads.")
    parser.add_argument("--capacity_clients", type=int, default=32)
    parser.add_argument("--light_load", type=float, default=0.5, help="Light load, as a share of the capacity.")
    parser.add_argument("--overload", type=float, default=4.0, help="Overload, as a multiple of the capacity.")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds of each phase.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--soak_seconds", type=float, default=300.0)
    parser.add_argument("--soak_clients", type=int, default=64)
    parser.add_argument("--soak_burst", type=float, default=2.0, help="Soak bursts, as a multiple of the capacity.")
    parser.add_argument("--server_cpus", type=_cpus, help="Cores the server may use, e.g. 0 (default: all).")
    parser.add_argument("--client_cpus", type=_cpus, help="Cores the load clients may use, e.g. 1 (default: all).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "overload"))
    return parser.parse_args()


def _cpus(text: str) -> set[int]:
    return {int(cpu) for cpu in text.split(",")}


def main() -> None:
    args = parse_args()
    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    sys.path.insert(0, str(ROOT / "src"))
    from pabee.provenance import provenance, write_atomic, write_json

    sentences = sst2_sentences(Path(args.glue_dir))
    settings = {name: tuple(int(x) for x in name.split(":")) for name in args.settings.split(",")}
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, setting in settings.items():
            port = free_port()
            server = start_server(args, setting, port, logs / f"pabee_overload_{name.replace(':', '_')}.log")
            try:
                result = asyncio.run(overload_run(args, port, sentences, setting[1]))
            finally:
                stop_server(server)
            result["load_average_after"] = load_average()
            runs[name].append(result)
            print(f"round {round_ + 1}, {name}: {json.dumps(result)}", flush=True)
    table, verdict = summarize(runs, args)
    soak = None
    if args.soak_seconds > 0:
        defaults, port = (32, 128), free_port()  # pabee serve's own defaults
        server = start_server(args, defaults, port, logs / "pabee_soak.log")
        try:
            capacity = statistics.median(r["capacity_req_s"] for r in runs.get("32:128", next(iter(runs.values()))))
            soak = asyncio.run(soak_run(args, port, sentences, capacity, server.pid))
            soak["max_queue"] = defaults[1]
        finally:
            stop_server(server)
        print(f"soak: {json.dumps(soak)}", flush=True)
    report = {
        **{k: getattr(args, k) for k in ("model", "threads", "request_timeout", "rounds")},
        **{k: getattr(args, k) for k in ("light_load", "overload", "duration")},
        **{k: sorted(getattr(args, k) or []) or "all" for k in ("server_cpus", "client_cpus")},
        "overload_results": table,
        "verdict": verdict,
        "runs": runs,
        "soak": soak,
        "provenance": provenance(model=args.model, data=str(Path(args.glue_dir) / "SST-2" / "dev.tsv")),
    }
    out = Path(args.output)
    write_json(out.with_suffix(".json"), report)
    markdown = render_markdown(report)
    write_atomic(out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
