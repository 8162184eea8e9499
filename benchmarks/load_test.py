"""Load test of `pabee serve`: throughput and latency under concurrent clients, for three server settings.

For each setting the script starts `pabee serve` on 127.0.0.1 (a free port), lets `--clients` closed-loop
clients send requests of one real SST-2 dev sentence each (a client sends its next request when the previous
answer arrives), discards a warm-up, measures for `--duration` seconds (at most `--max_requests` requests), reads
the server's /metrics, and stops the server. Everything is bounded in time and count and stops by itself.

Settings:
  - micro-batching + early exit: the server defaults (`--max_batch_size 32 --max_wait_ms 5`), `--patience P`;
  - micro-batching, no early exit: the same with patience 0 (the full model);
  - batch size 1 + early exit: `--max_batch_size 1`, each request a forward of its own (the research code's mode).

The settings are interleaved for `--rounds` rounds, so a background load on the machine hits them alike; each
round ends with the model alone (no HTTP, a fresh process, same threads) on batches of `--clients` random
sentences and on single sentences: the most batching itself can give on this machine at that moment.
The clients are a minimal HTTP/1.1 client on asyncio streams (keep-alive), to take as little CPU as possible
from the server on the same machine. Results: `--output`.json (all numbers, provenance) and .md (rendered).

    python benchmarks/load_test.py --model runs/sst2_bench_model --rounds 3       # made by benchmarks/bench_sst2.sh
    python benchmarks/load_test.py --rounds 3 --dtype bfloat16 --output benchmarks/results/serve_sst2_bf16
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
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

import model_alone as model_alone_script  # benchmarks/model_alone.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def sst2_sentences(glue_dir: Path) -> list[str]:
    with open(glue_dir / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as f:
        return [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


class Connection:
    """One keep-alive HTTP/1.1 connection; `post` returns (status, body)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()

    async def close_quietly(self) -> None:
        """Close a connection the server may already have dropped."""
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await self.close()


async def drive(port: int, sentences: list[str], clients: int, warmup: float, duration: float, max_requests: int):
    """Closed-loop clients; returns the latencies (s) and exit layers of requests completed in the timed window."""
    latencies: list[float] = []
    exit_layers: list[int] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    start_timing = loop.time() + warmup
    stop = start_timing + duration
    sent = 0

    async def client(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        connection = Connection(port)
        try:
            while loop.time() < stop and sent < max_requests:
                sent += 1
                body = json.dumps({"texts": [rng.choice(sentences)]}).encode()
                began = loop.time()
                status, answer = await connection.request("POST", "/predict", body)
                ended = loop.time()
                if status != 200:
                    errors.append(f"{status}: {answer[:200]!r}")
                    continue
                if began >= start_timing and ended <= stop:
                    latencies.append(ended - began)
                    exit_layers.append(json.loads(answer)["predictions"][0]["exit_layer"])
        finally:
            await connection.close()

    await asyncio.gather(*(client(seed) for seed in range(clients)))
    measured = min(stop, loop.time()) - start_timing
    return latencies, exit_layers, errors, measured


def metrics_text(port: int) -> str:
    """The server's /metrics page (Prometheus text)."""

    async def get() -> bytes:
        connection = Connection(port)
        try:
            return (await connection.request("GET", "/metrics"))[1]
        finally:
            await connection.close()

    return asyncio.run(get()).decode()


def scrape_metrics(port: int) -> dict[str, float]:
    """Sums and counts of the server's batch-size and exit-layer histograms."""
    values = {}
    for line in metrics_text(port).splitlines():
        name, _, value = line.partition(" ")
        if name in ("pabee_batch_size_sum", "pabee_batch_size_count", "pabee_batch_duration_seconds_sum"):
            values[name] = float(value)
    return values


def start_server(args: argparse.Namespace, setting: dict, port: int, log: Path) -> subprocess.Popen:
    flags = ["--threads", str(args.threads), "--no_access_log", "--patience", str(setting["patience"])]
    flags += ["--max_batch_size", str(setting["max_batch_size"]), "--max_wait_ms", str(setting["max_wait_ms"])]
    for flag in ("dtype", "attn_implementation"):
        if getattr(args, flag):
            flags += [f"--{flag}", getattr(args, flag)]
    return launch_server(args.model, flags, port, log)


def launch_server(
    model: str, flags: list[str], port: int, log: Path, cpus: set[int] | None = None
) -> subprocess.Popen:
    """`pabee serve --model model --port port *flags`, returned once /health answers (its output in `log`);
    the benchmarks beside this script start their servers through it. `cpus`: the cores it may run on."""
    cmd = [sys.executable, "-m", "pabee", "serve", "--model", model, "--port", str(port), *flags]
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # before any thread exists, so all inherit it
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=pin)  # noqa: SIM115
    deadline = time.monotonic() + 180

    async def healthy() -> bool:
        connection = Connection(port)
        try:
            return (await connection.request("GET", "/health"))[0] == 200
        except OSError:
            return False
        finally:
            await connection.close()

    while not asyncio.run(healthy()):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the server did not start; see {log}")
        time.sleep(0.3)
    return server


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL if it takes over a minute."""
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


def run_setting(args, setting: dict, sentences: list[str], log: Path) -> dict:
    port = free_port()
    load_before = load_average()
    server = start_server(args, setting, port, log)
    try:
        before = scrape_metrics(port)
        began = time.monotonic()
        latencies, exits, errors, measured = asyncio.run(
            drive(port, sentences, args.clients, args.warmup, args.duration, args.max_requests)
        )
        driven = time.monotonic() - began
        metrics = scrape_metrics(port)
    finally:
        stop_server(server)
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return {
        "requests": len(latencies),
        "seconds": measured,
        "throughput": len(latencies) / measured,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "avg_exit_layer": statistics.fmean(exits),
        "avg_batch_size": metrics["pabee_batch_size_sum"] / metrics["pabee_batch_size_count"],
        # Share of the run the forward thread was busy with batches: near 1, only a faster forward helps.
        "forward_busy": (metrics["pabee_batch_duration_seconds_sum"] - before["pabee_batch_duration_seconds_sum"])
        / driven,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def model_alone(args: argparse.Namespace, seconds: float = 10.0) -> dict:
    """The ceiling without HTTP: the same pipeline in a fresh process, loaded and run in one worker thread like
    the server, on batches of `--clients` random sentences and on one sentence at a time; sentences/s of each."""
    argv = ["--model", args.model, "--glue_dir", args.glue_dir, "--batch", str(args.clients)]
    argv += ["--seconds", str(seconds), "--warmup", "3", "--patience", str(args.patience)]
    argv += ["--max_batch_size", str(args.max_batch_size), "--threads", str(args.threads)]
    for flag in ("dtype", "attn_implementation"):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    out = model_alone_script.measure(argv)
    out["ratio"] = out["batched_per_s"] / out["single_per_s"]
    return out


def combine(runs: list[dict]) -> dict:
    """Rounds of one setting: throughput and latency percentiles as medians over rounds."""
    keys = ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "avg_exit_layer", "avg_batch_size", "forward_busy")
    out = {key: statistics.median(run[key] for run in runs) for key in keys}
    out["requests"] = sum(run["requests"] for run in runs)
    out["p99_over_p50"] = out["p99_ms"] / out["p50_ms"]
    return out


def per_round_ratios(runs: dict[str, list[dict]]) -> list[float]:
    """Micro-batching + early exit over batch size 1, within each round: the machine's speed drifts (a shared
    VM), and settings run minutes apart feel the drift less when compared within a round."""
    micro, _, single = runs.values()
    return [m["throughput"] / s["throughput"] for m, s in zip(micro, single, strict=True)]


def _onnx_precision(model: str) -> str | None:
    """The precision of a `pabee export` folder (the server then runs ONNX Runtime), else None."""
    from pabee.onnx_export import MANIFEST, is_onnx_folder

    return json.loads((Path(model) / MANIFEST).read_text())["precision"] if is_onnx_folder(model) else None


def _runtime(report: dict) -> str:
    if report.get("onnx_precision"):
        return f"ONNX Runtime, {report['onnx_precision']} (a `pabee export` folder)"
    return (
        f"torch, weights {report.get('dtype') or 'float32'}, attention {report.get('attn_implementation') or 'sdpa'}"
    )


def render_markdown(report: dict) -> str:
    p = report["provenance"]
    s = report["settings"]
    lines = [
        "# `pabee serve` load test: SST-2 sentences, one per request",
        "",
        f"Model: `{p['model']}` ({report['num_layers']} layers). {report['clients']} concurrent closed-loop clients, "
        f"{report['duration']:.0f} s measured after {report['warmup']:.0f} s warm-up per setting and round, "
        f"{report['rounds']} round(s) interleaved (medians over rounds); server `--threads {report['threads']}`, "
        f"{_runtime(report)}.  ",
        f"Command: `{p['command']}`  ",
        f"Date: {p['date']}; torch {p['versions']['torch']}, transformers {p['versions']['transformers']}, "
        f"{p['hardware']['cpu']}, {p['hardware']['cpu_count']} cores.  ",
        f"Load average (1/5/15 min) before the first and after the last run: {report['load_average_start']} → "
        f"{report['load_average_end']} (other jobs shared the machine; see below).",
        "",
        "| Setting | Patience | Max batch | Throughput (req/s) | p50 ms | p95 ms | p99 ms | p99/p50 | "
        "Avg. batch | Avg. exit layer | Forward busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in s.items():
        c = report["configs"][name]
        lines.append(
            f"| {name} | {c['patience']} | {c['max_batch_size']} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_over_p50']:.2f} | {r['avg_batch_size']:.1f} | "
            f"{r['avg_exit_layer']:.2f} | {r.get('forward_busy', float('nan')):.0%} |"
        )
    t, a = report["targets"], report["model_alone"]
    micro, _, single = report["settings"].values()
    lines += [
        "",
        f"- Micro-batching with early exit vs batch size 1 with early exit: **{t['throughput_ratio']:.2f}x** "
        f"throughput (target >= 2x: {'met' if t['throughput_met'] else 'missed'}); within each round: "
        + ", ".join(f"{r:.2f}x" for r in per_round_ratios(report["runs"]))
        + ".",
        f"- Micro-batching with early exit, p99 / p50 latency: **{t['p99_over_p50']:.2f}** "
        f"(target <= 2: {'met' if t['tail_met'] else 'missed'}).",
        f"- Early exit vs no early exit, both micro-batched: {t['early_exit_gain']:.2f}x throughput.",
        f"- The model alone in one process (no HTTP, same threads and patience; each round): batches of "
        f"{report['clients']} random sentences {a['batched_per_s']:.1f} sentences/s, one at a time "
        f"{a['single_per_s']:.1f} sentences/s: **{a['ratio']:.2f}x**, what batching itself gives on this machine.",
        f"- The server keeps that gain: micro-batching serves {micro['throughput'] / a['batched_per_s']:.0%} of the "
        f"model-alone batched rate, batch size 1 {single['throughput'] / a['single_per_s']:.0%} of the one-at-a-time "
        "rate (HTTP, JSON and the clients share the same cores).",
        "- Forward busy: the share of the run the server's forward thread spent on batches. Near 100%, the "
        "server is bound by the model, and only a faster forward (or more cores) serves more.",
        "",
        "Per round:",
        "",
        "| Setting | Round | req/s | p50 ms | p99 ms | Avg. batch | Load average before |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, runs in report["runs"].items():
        for i, r in enumerate(runs, start=1):
            lines.append(
                f"| {name} | {i} | {r['throughput']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                f"{r['avg_batch_size']:.1f} | {r['load_average_before']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sst2_bench_model", help="Fine-tuned PABEE folder (SST-2).")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--patience", type=int, default=2, help="Patience of the early-exit settings.")
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds per setting and round.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds first.")
    parser.add_argument("--max_requests", type=int, default=50_000, help="Stop a run after this many requests.")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="Server torch threads.")
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], help="Server attention kernel.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Server weights' dtype (default: float32).")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve_sst2"))
    parser.add_argument("--render_only", action="store_true", help="Re-render --output.md from --output.json.")
    args = parser.parse_args()
    out = Path(args.output)
    if args.render_only:
        out.with_suffix(".md").write_text(render_markdown(json.loads(out.with_suffix(".json").read_text())))
        return

    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoConfig

    import pabee  # noqa: F401 - registers the PABEE config
    from pabee.provenance import provenance, write_atomic, write_json

    num_layers = AutoConfig.from_pretrained(args.model).encoder_config.num_hidden_layers
    sentences = sst2_sentences(Path(args.glue_dir))
    batched = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    configs = {
        "micro-batching + early exit": {"patience": args.patience, **batched},
        "micro-batching, no early exit": {"patience": 0, **batched},
        "batch size 1 + early exit": {"patience": args.patience, "max_batch_size": 1, "max_wait_ms": 0},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    alone_runs: list[dict] = []
    load_start = load_average()
    for round_ in range(args.rounds):
        for name, setting in configs.items():
            print(f"round {round_ + 1}/{args.rounds}: {name} ...", flush=True)
            result = run_setting(args, setting, sentences, logs / f"pabee_load_test_{len(runs[name])}.log")
            runs[name].append(result)
            print(
                f"  {result['throughput']:.1f} req/s, p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"batch {result['avg_batch_size']:.1f}, forward busy {result['forward_busy']:.0%}, "
                f"exit layer {result['avg_exit_layer']:.2f}, load {result['load_average_before']}",
                flush=True,
            )
        print(f"round {round_ + 1}/{args.rounds}: the model alone, no HTTP ...", flush=True)
        alone_runs.append(model_alone(args))
        print(f"  {alone_runs[-1]}", flush=True)
    settings = {name: combine(r) for name, r in runs.items()}
    alone = {key: statistics.median(r[key] for r in alone_runs) for key in alone_runs[0]}
    micro, full, single = (settings[name] for name in configs)
    report = {
        "clients": args.clients,
        "duration": args.duration,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
        "onnx_precision": _onnx_precision(args.model),
        "num_layers": num_layers,
        "configs": configs,
        "settings": settings,
        "runs": runs,
        "targets": {
            "throughput_ratio": micro["throughput"] / single["throughput"],
            "throughput_met": micro["throughput"] >= 2 * single["throughput"],
            "p99_over_p50": micro["p99_over_p50"],
            "tail_met": micro["p99_over_p50"] <= 2,
            "early_exit_gain": micro["throughput"] / full["throughput"],
            "throughput_ratio_per_round": per_round_ratios(runs),
        },
        "model_alone": alone,
        "model_alone_runs": alone_runs,
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "provenance": provenance(model=args.model, data=str(Path(args.glue_dir) / "SST-2" / "dev.tsv")),
    }
    write_json(out.with_suffix(".json"), report)
    markdown = render_markdown(report)
    write_atomic(out.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
