"""`pabee serve` vs `pabee serve --ray` (Ray Serve) on one machine: what Ray costs a server before it adds machines.

Settings, each a real server process on 127.0.0.1 with the same total threads, interleaved over `--rounds`:

- `uvicorn`: `pabee serve --threads T` (our micro-batcher);
- `ray 1x T`: `pabee serve --ray --replicas 1 --threads T` (Ray Serve proxy + one replica, `@serve.batch`);
- `ray Nx1`: `pabee serve --ray --replicas T --threads 1`.

`--clients` closed-loop clients send one SST-2 dev sentence per request (the load test's client, a warm-up
discarded, then `--duration` seconds measured). Results: `--output`.json and .md.

    python benchmarks/ray_serve.py --model runs/sst2 --rounds 2        # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import drive, free_port, launch_server, percentile, sst2_sentences, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def settings(threads: int) -> dict[str, list[str]]:
    return {
        "uvicorn": ["--threads", str(threads), "--no_access_log"],
        f"ray 1x{threads}": ["--ray", "--replicas", "1", "--threads", str(threads)],
        f"ray {threads}x1": ["--ray", "--replicas", str(threads), "--threads", "1"],
    }


def run(args: argparse.Namespace, name: str, flags: list[str], sentences: list[str], log: Path) -> dict:
    port = free_port()
    server = launch_server(args.model, flags, port, log)
    try:
        latencies, exits, errors, seconds = asyncio.run(
            drive(port, sentences, args.clients, args.warmup, args.duration, 50_000)
        )
    finally:
        stop_server(server)
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
    return {
        "setting": name,
        "requests": len(latencies),
        "throughput": len(latencies) / seconds,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "avg_exit_layer": statistics.fmean(exits),
    }


def render(report: dict) -> str:
    p = report["provenance"]
    lines = [
        "# `pabee serve` on uvicorn vs on Ray Serve, one machine",
        "",
        f"Command: `{p['command']}` · {p['date']} · model `{p['model']}` · {report['clients']} closed-loop clients, "
        f"one SST-2 dev sentence per request, {report['duration']:.0f} s measured per setting and round, "
        f"{report['rounds']} rounds interleaved (medians) · {report['threads']} threads in total per setting · "
        f"Ray {p['ray']} · CPU {p['hardware']['cpu']}, {p['hardware']['cpu_count']} CPUs, flags "
        f"{', '.join(p['hardware']['cpu_flags']) or 'none of note'}.",
        "",
        "| Setting | req/s | × uvicorn | p50 ms | p99 ms | avg. exit layer |",
        "|---|---|---|---|---|---|",
    ]
    base = report["summary"]["uvicorn"]["throughput"]
    for name, row in report["summary"].items():
        lines.append(
            f"| {name} | {row['throughput']:.1f} | {row['throughput'] / base:.2f} | {row['p50_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['avg_exit_layer']:.2f} |"
        )
    lines += ["", "Per round (req/s): " + "; ".join(
        f"{r['setting']} {r['throughput']:.0f}" for r in report["runs"]), ""]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/sst2")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "ray_serve"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from importlib.metadata import version

    from pabee.provenance import provenance

    sentences = sst2_sentences(Path(args.glue_dir))
    runs = []
    with tempfile.TemporaryDirectory(prefix="pabee-ray-serve-") as tmp:
        for round_ in range(args.rounds):
            names = list(settings(args.threads).items())
            for name, flags in names if round_ % 2 == 0 else names[::-1]:
                runs.append(run(args, name, flags, sentences, Path(tmp) / f"{round_}-{name}.log"))
                print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for name in settings(args.threads):
        mine = [r for r in runs if r["setting"] == name]
        summary[name] = {k: statistics.median(r[k] for r in mine) for k in ("throughput", "p50_ms", "p99_ms")}
        summary[name]["avg_exit_layer"] = statistics.median(r["avg_exit_layer"] for r in mine)
    report = {
        "provenance": provenance(model=args.model, ray=version("ray")),
        **{k: getattr(args, k) for k in ("clients", "duration", "rounds", "threads")},
        "runs": runs,
        "summary": summary,
    }
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    output.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
