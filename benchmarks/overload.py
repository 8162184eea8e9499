"""Overload and soak of `pabee serve` (overload*.md, soak_15min.md): does admission control hold, and does the
server stay the same over time?

Overload, per `--settings` pair `max_batch_size:max_queue` (a server each, interleaved over `--rounds`): capacity X
with `--capacity_clients` closed-loop clients (one SST-2 dev sentence per request), then open-loop Poisson arrivals
at `--light_load` × X and at `--overload` × X for `--duration` seconds each (open loop: closed-loop clients slow
down with the server and never overload it; latency counts from when a request was due). Reported: p50/p99 of
accepted requests, how fast 503s come back, statuses, the slowest answer (none may pass `--request_timeout`).

Soak (`--soak_seconds`, 0 to skip; server defaults): `--soak_clients` closed-loop clients (1 s wait after a 503,
as `Retry-After` asks), plus a 10 s burst at `--soak_burst` × X every minute; statuses, p50/p99 and the server's
RSS per minute, after a 60 s warm-up with two bursts. The clients share the server's cores unless pinned apart
(`--server_cpus 0 --client_cpus 1`, the server then with `--threads 1`).

    python benchmarks/overload.py --model runs/sst2 --settings 32:128,32:32,8:8 --rounds 2 --soak_seconds 300
"""

import asyncio
import json
import os
import random
import statistics
from collections import Counter
from pathlib import Path

import common
import serving


def server_options(args, max_batch_size: int, max_queue: int) -> list[str]:
    options = serving.flags(no_access_log=True, threads=args.threads, request_timeout=args.request_timeout)
    queue = serving.flags(max_batch_size=max_batch_size, max_queue=max_queue, max_texts_per_request=min(64, max_queue))
    return options + queue


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def summary(rows: list[tuple], start: float = float("-inf"), end: float = float("inf")) -> dict:
    """Statuses, the slowest answer and the latency percentiles of 200s and 503s among the requests due (sent) from
    `start` to `end`; rows are `(due, answered, status, ...)`."""
    rows = [(due, done - due, status) for due, done, status, *_ in rows if start <= due < end]
    out = {"requests": len(rows), "statuses": dict(Counter(status for _, _, status in rows))}
    out["slowest_ms"] = 1000 * max((latency for _, latency, _ in rows), default=0.0)
    for name, status in (("ok", 200), ("refused", 503)):
        latencies = [latency for _, latency, s in rows if s == status]
        if len(latencies) >= 2:
            out |= {f"{name}_p{q}_ms": 1000 * serving.percentile(latencies, q) for q in (50, 99)}
    return out


async def closed_loop(port: int, requests: list[bytes], clients: int, until: float) -> list[tuple]:
    """Clients that wait as told after a 503 (the server says Retry-After: 1 s or more)."""
    return await serving.closed_loop(port, requests, clients, until, retry_after=True)


async def open_loop(port: int, requests: list[bytes], rate: float, start: float, until: float) -> list[tuple]:
    """Poisson arrivals at `rate` requests/s between loop times `start` and `until`, each on an idle connection;
    rows `(due, answered, status)`, status 0 for no answer at all (counted, never hidden)."""
    loop, rng = asyncio.get_running_loop(), random.Random(int(rate * 1000))
    idle: list[serving.Connection] = []
    rows, tasks = [], []

    async def one(due: float) -> None:
        connection, status = idle.pop() if idle else serving.Connection(port), 0
        try:  # `request` opens again, once, a kept-alive connection the server closed while it was idle
            status, _ = await connection.request("POST", "/predict", rng.choice(requests))
            idle.append(connection)
        except (OSError, asyncio.IncompleteReadError):
            await connection.close()
        rows.append((due, loop.time(), status))

    due = start
    while (due := due + rng.expovariate(rate)) < until:
        await asyncio.sleep(max(0.0, due - loop.time()))
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    for connection in idle:
        await connection.close()
    return rows


async def overload_run(args, port: int, requests: list[bytes], max_queue: int) -> dict:
    """Capacity, then the light load, then the overload, on one running server.

    Capacity: as many closed-loop clients as the queue takes (at most `--capacity_clients`), so none is refused.
    """
    loop = asyncio.get_running_loop()
    clients = min(args.capacity_clients, max_queue)
    await closed_loop(port, requests, clients, loop.time() + 3)  # warm-up
    start = loop.time()
    capacity = await closed_loop(port, requests, clients, start + args.duration)
    requests_per_s = sum(row[2] == 200 for row in capacity) / (loop.time() - start)
    start = loop.time()
    light = await open_loop(port, requests, args.light_load * requests_per_s, start, start + args.duration)
    start = loop.time()
    heavy = await open_loop(port, requests, args.overload * requests_per_s, start, start + args.duration)
    result = {"capacity_req_s": requests_per_s, "capacity": summary(capacity)}
    result |= {"light": summary(light), "overload": summary(heavy)}
    result["overload"]["answered_req_s"] = result["overload"]["statuses"].get(200, 0) / args.duration
    return result


async def soak_run(args, port: int, requests: list[bytes], capacity: float, pid: int) -> dict:
    """Closed-loop clients for `soak_seconds`, a burst every minute, memory each minute."""
    loop, rate = asyncio.get_running_loop(), args.soak_burst * capacity
    now = loop.time()
    await asyncio.gather(  # batches at their largest, twice, before the RSS is read
        closed_loop(port, requests, args.soak_clients, now + 60),
        open_loop(port, requests, rate, now + 10, now + 20),
        open_loop(port, requests, rate, now + 40, now + 50),
    )
    start = loop.time()
    rss = [rss_mb(pid)]

    async def sample_memory() -> None:
        for minute in range(1, int(args.soak_seconds // 60) + 1):
            await asyncio.sleep(start + 60 * minute - loop.time())
            rss.append(rss_mb(pid))

    starts = range(30, int(args.soak_seconds) - 10, 60)
    bursts = [open_loop(port, requests, rate, start + t, start + t + 10) for t in starts]
    clients = closed_loop(port, requests, args.soak_clients, start + args.soak_seconds)
    clients, _, *burst_rows = await asyncio.gather(clients, sample_memory(), *bursts)
    minutes = [summary(clients, start + 60 * m, start + 60 * (m + 1)) for m in range(int(args.soak_seconds // 60))]
    for minute, memory in zip(minutes, rss[1:], strict=False):
        minute["rss_mb"] = memory
    return {
        "seconds": args.soak_seconds,
        "clients": args.soak_clients,
        "burst_req_s": rate,
        "closed_loop": summary(clients),
        "bursts": summary([row for rows in burst_rows for row in rows]),
        "per_minute": minutes,
        "rss_mb_start": rss[0],
        "rss_mb_end": rss_mb(pid),
    }


def render(report: dict) -> str:
    hw = report["provenance"]["hardware"]
    lines = ["# Overload and soak of `pabee serve`", "", f"`{report['provenance']['command']}`", ""]
    lines += [f"Machine: {hw.get('cpu')}, {hw.get('cpu_count')} cores, flags {hw.get('cpu_flags')}.", ""]
    cores = "server_cpus" in report  # reports before pinning did not say
    cores = f" Cores: server {report['server_cpus']}, load clients {report['client_cpus']}." if cores else ""
    lines += [
        f"Model `{report['model']}`, server `--threads {report['threads']} --request_timeout "
        f"{report['request_timeout']}`; one SST-2 dev sentence per "
        f"request. Open-loop Poisson arrivals at {report['light_load']}× (light) and {report['overload']}× "
        "(overload) the capacity measured with closed-loop clients just before, on the same server; batch:queue is "
        "`--max_batch_size`:`--max_queue`. Medians over "
        f"{report['rounds']} interleaved rounds; per-round values in the JSON.{cores}",
        "",
    ]
    head = ["batch:queue", "capacity req/s", "light p99 ms", "overload: answered req/s", "accepted p50 / p99 ms"]
    head += ["p99 / light p99", "503s", "503 p99 ms", "other statuses", "slowest ms"]
    rows = []
    for queue, r in report["overload_results"].items():
        others = {k: v for k, v in r["statuses"].items() if k not in ("200", "503")} or "none"
        rows.append([queue, f"{r['capacity_req_s']:.1f}", f"{r['light_p99_ms']:.0f}", f"{r['answered_req_s']:.1f}"])
        rows[-1] += [f"{r['ok_p50_ms']:.0f} / {r['ok_p99_ms']:.0f}", f"{r['p99_ratio']:.2f}", r["refused"]]
        rows[-1] += [f"{r['refused_p99_ms']:.1f}", others, f"{r['slowest_ms']:.0f}"]
    lines += [*common.table(head, rows), "", report["verdict"], ""]
    if report.get("soak"):
        lines += _soak_markdown(report["soak"])
    return "\n".join(lines) + "\n"


def _statuses(statuses: dict) -> str:
    """`{200: n, 503: m}` (the JSON's keys are strings; the report shows them as the numbers they are)."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in statuses.items()) + "}"


def _soak_markdown(soak: dict) -> list[str]:
    growth, closed = soak["rss_mb_end"] / soak["rss_mb_start"] - 1, soak["closed_loop"]
    lines = [
        "## Soak",
        "",
        f"{soak['clients']} closed-loop clients for {soak['seconds']:.0f} s, plus a 10 s open-loop burst of "
        f"{soak['burst_req_s']:.0f} requests/s every minute (from 30 s on); server defaults (--max_queue "
        f"{soak['max_queue']}).",
        "",
        f"- Closed-loop clients: statuses {_statuses(closed['statuses'])}, p50 {closed['ok_p50_ms']:.0f} ms, "
        f"p99 {closed['ok_p99_ms']:.0f} ms, slowest {closed['slowest_ms']:.0f} ms.",
        f"- Bursts: statuses {_statuses(soak['bursts']['statuses'])}, slowest {soak['bursts']['slowest_ms']:.0f} ms.",
        f"- Server RSS {soak['rss_mb_start']:.0f} MB after warm-up → {soak['rss_mb_end']:.0f} MB at the end "
        f"({growth:+.1%}; target < +10%: {'met' if growth < 0.10 else 'missed'}).",
        "",
    ]
    head = ["minute", "closed-loop requests", "statuses", "p50 ms", "p99 ms", "RSS MB at its end"]
    rows = [
        [i + 1, m["requests"], _statuses(m["statuses"])]
        + [f"{m.get(k, 0):.0f}" for k in ("ok_p50_ms", "ok_p99_ms", "rss_mb")]
        for i, m in enumerate(soak["per_minute"])
    ]
    return lines + common.table(head, rows)


def summarize(runs: dict[str, list[dict]], args) -> tuple[dict, str]:
    """Medians over rounds per setting, and the verdict on the targets."""
    table, verdicts = {}, []
    for queue, rounds in runs.items():
        over, light = [r["overload"] for r in rounds], [r["light"] for r in rounds]
        row = {"capacity_req_s": statistics.median(r["capacity_req_s"] for r in rounds)}
        row["light_p99_ms"] = statistics.median(r["ok_p99_ms"] for r in light)
        row |= {k: statistics.median(o[k] for o in over) for k in ("answered_req_s", "ok_p50_ms", "ok_p99_ms")}
        row["p99_ratio"] = statistics.median(o["ok_p99_ms"] / r["ok_p99_ms"] for o, r in zip(over, light, strict=True))
        row["refused"] = sum(o["statuses"].get(503, 0) for o in over)
        row["refused_p99_ms"] = statistics.median(o.get("refused_p99_ms", float("nan")) for o in over)
        row["slowest_ms"] = max(o["slowest_ms"] for o in over)
        row["statuses"] = dict(sum((Counter({str(k): v for k, v in o["statuses"].items()}) for o in over), Counter()))
        table[queue] = row
        met = row["p99_ratio"] <= 2 and row["slowest_ms"] <= 1000 * args.request_timeout
        verdicts.append(f"{queue}: p99 {row['p99_ratio']:.2f}× light p99 ({'met' if met else 'missed'})")
    verdict = (
        f"Target: under {args.overload}× the load, accepted requests' p99 ≤ 2× the p99 at {args.light_load}× load, "
        f"the rest 503 at once, nothing past --request_timeout. " + "; ".join(verdicts) + "."
    )
    return table, verdict


def measure(args) -> dict:
    from pabee.provenance import portable_path

    if args.client_cpus:
        os.sched_setaffinity(0, args.client_cpus)
    requests = serving.bodies(common.sst2_sentences(args.glue_dir))
    settings = {name: tuple(int(x) for x in name.split(":")) for name in args.settings.split(",")}
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for round_ in range(args.rounds):
        for name, (batch, queue) in settings.items():
            log = f"pabee_overload_{name.replace(':', '_')}.log"
            with serving.serving(args.model, server_options(args, batch, queue), log, args.server_cpus) as (port, _):
                result = asyncio.run(overload_run(args, port, requests, queue))
            result["load_average_after"] = serving.load_average()
            runs[name].append(result)
            print(f"round {round_ + 1}, {name}: {json.dumps(result)}", flush=True)
    table, verdict = summarize(runs, args)
    soak = None
    if args.soak_seconds > 0:
        defaults = (32, 128)  # pabee serve's own
        capacity = statistics.median(r["capacity_req_s"] for r in runs.get("32:128", next(iter(runs.values()))))
        options = server_options(args, *defaults)
        with serving.serving(args.model, options, "pabee_soak.log", args.server_cpus) as (port, server):
            soak = asyncio.run(soak_run(args, port, requests, capacity, server.pid))
        soak["max_queue"] = defaults[1]
        print(f"soak: {json.dumps(soak)}", flush=True)
    return common.report(
        model=portable_path(args.model),
        **{k: getattr(args, k) for k in ("threads", "request_timeout", "rounds")},
        **{k: getattr(args, k) for k in ("light_load", "overload", "duration")},
        **{k: sorted(getattr(args, k) or []) or "all" for k in ("server_cpus", "client_cpus")},
        overload_results=table,
        verdict=verdict,
        runs=runs,
        soak=soak,
        provenance={
            "model": portable_path(args.model),
            "data": portable_path(Path(args.glue_dir).resolve() / "SST-2" / "dev.tsv"),
        },
    )


def main() -> None:
    parser = common.parser(__doc__, "overload", model="runs/sst2", rounds=2)
    parser.add_argument("--settings", default="32:128,32:32,8:8", help="Pairs max_batch_size:max_queue.")
    parser.add_argument("--request_timeout", type=float, default=10.0)
    parser.add_argument("--capacity_clients", type=int, default=32)
    parser.add_argument("--light_load", type=float, default=0.5, help="Light load, as a share of the capacity.")
    parser.add_argument("--overload", type=float, default=4.0, help="Overload, as a multiple of the capacity.")
    parser.add_argument("--duration", type=float, default=20.0, help="Seconds of each phase.")
    parser.add_argument("--soak_seconds", type=float, default=300.0)
    parser.add_argument("--soak_clients", type=int, default=64)
    parser.add_argument("--soak_burst", type=float, default=2.0, help="Soak bursts, as a multiple of the capacity.")
    cpus = lambda text: {int(cpu) for cpu in text.split(",")}  # noqa: E731
    parser.add_argument("--server_cpus", type=cpus, help="Cores the server may use, e.g. 0 (default: all).")
    parser.add_argument("--client_cpus", type=cpus, help="Cores the load clients may use, e.g. 1 (default: all).")
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
