"""Load test of `pabee serve` (serve_sst2*.md): throughput and latency of three server settings under
`--clients` closed-loop clients, each request one SST-2 dev sentence, a warm-up discarded, `--duration` seconds
(at most `--max_requests` requests) measured, then /metrics read:

  - micro-batching + early exit: the server defaults (`--max_batch_size 32 --max_wait_ms 5`), `--patience P`;
  - micro-batching, no early exit: the same with patience 0 (the full model);
  - batch size 1 + early exit: `--max_batch_size 1`, each request a forward of its own (the research code's mode);
  - with `--bs1_no_exit`, also batch size 1 without early exit (what early exit gains a server that does not batch).

Settings are interleaved over `--rounds` rounds; each round ends with the model alone (`--alone`: a fresh
process, no HTTP, loaded and run in one worker thread like the server) on batches of `--clients` random sentences
and on single sentences: what batching itself gives on this machine at that moment.

    python benchmarks/load_test.py --model runs/sst2_bench_model --rounds 3       # made by benchmarks/bench_sst2.sh
    python benchmarks/load_test.py --rounds 3 --dtype bfloat16 --output benchmarks/results/serve_sst2_bf16
"""

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import serving


def run_setting(args, setting: dict, requests: list[bytes], log_name: str) -> dict:
    """One server, `--clients` closed-loop clients: throughput, latencies, exit layers, batches, forward busy."""
    load_before = serving.load_average()
    options = serving.flags(threads=args.threads, no_access_log=True, **setting)
    options += serving.flags(dtype=args.dtype, attn_implementation=args.attn_implementation)
    with serving.serving(args.model, options, log_name) as (port, _):
        before, began = serving.metrics(port), time.monotonic()
        window = (args.clients, args.warmup, args.duration, args.max_requests)
        kept, seconds = serving.timed_load(port, requests, *window)
        driven, after = time.monotonic() - began, serving.metrics(port)
    latencies = [r[1] - r[0] for r in kept]
    busy = after["pabee_batch_duration_seconds_sum"] - before["pabee_batch_duration_seconds_sum"]
    return {
        "requests": len(latencies),
        "seconds": seconds,
        "throughput": len(latencies) / seconds,
        **{f"p{q}_ms": 1000 * serving.percentile(latencies, q) for q in (50, 95, 99)},
        "mean_ms": 1000 * statistics.fmean(latencies),
        "avg_exit_layer": statistics.fmean(serving.exit_layers(kept)),
        "avg_batch_size": after["pabee_batch_size_sum"] / after["pabee_batch_size_count"],
        # Share of the run the forward thread was busy with batches: near 1, only a faster forward helps.
        "forward_busy": busy / driven,
        "load_average_before": load_before,
        "load_average_after": serving.load_average(),
    }


def early_exit(args: argparse.Namespace) -> dict:
    """The early-exit setting: `--patience`, or `--confidence` (a threshold) when given."""
    if args.confidence is None:
        return {"patience": args.patience}
    return {"exit_criterion": "confidence", "exit_threshold": args.confidence}


def model_alone(args: argparse.Namespace) -> dict:
    """The ceiling without HTTP: `--alone` in a fresh process; sentences/s batched and one at a time, and the ratio."""
    argv = [sys.executable, __file__, "--alone", "--model", args.model, "--glue_dir", args.glue_dir]
    shared = ("clients", "patience", "max_batch_size", "confidence", "threads", "dtype", "attn_implementation")
    argv += serving.flags(**{name: getattr(args, name) for name in shared})
    out = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    out["ratio"] = out["batched_per_s"] / out["single_per_s"]
    return out


def alone(args: argparse.Namespace, seconds: float = 10.0, warmup: float = 3.0) -> None:
    """The pipeline loaded and run in one worker thread as in the server, on batches of `--clients` random
    sentences and on single sentences; prints `{"batched_per_s", "single_per_s"}`."""
    from pabee.batching import forward_thread
    from pabee.pipeline import pipeline

    worker = forward_thread(args.threads)
    options = {"dtype": args.dtype, "attn_implementation": args.attn_implementation}
    if export_precision(args.model):  # an export: ONNX Runtime threads as the server's
        options = {"threads": args.threads}
    batch = {**early_exit(args), "batch_size": args.max_batch_size}
    pipe = worker.submit(lambda: pipeline(args.model, **batch, **options)).result()
    sentences, rng = common.sst2_sentences(args.glue_dir), random.Random(0)

    def rate(size: int, seconds: float) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            pipe([rng.choice(sentences) for _ in range(size)])
            done += size
        return done / (time.perf_counter() - start)

    def run() -> dict[str, float]:
        rate(args.clients, warmup), rate(1, warmup)
        return {"batched_per_s": rate(args.clients, seconds), "single_per_s": rate(1, seconds)}

    print(json.dumps(worker.submit(run).result()))


def export_precision(model: str) -> str | None:
    """The precision of a `pabee export` folder (the server then runs ONNX Runtime), else None."""
    from pabee.folders import is_onnx_folder, read_manifest

    return read_manifest(model, verify=False)["precision"] if is_onnx_folder(model) else None


def combine(runs: list[dict]) -> dict:
    """Rounds of one setting: throughput and latency percentiles as medians over rounds."""
    keys = ("throughput", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "avg_exit_layer", "avg_batch_size", "forward_busy")
    out = {key: statistics.median(run[key] for run in runs) for key in keys}
    out["requests"] = sum(run["requests"] for run in runs)
    out["p99_over_p50"] = out["p99_ms"] / out["p50_ms"]
    return out


def targets(settings: dict[str, dict], runs: dict[str, list[dict]]) -> dict:
    """Micro-batching with early exit: >= 2x batch size 1's throughput, p99 <= 2x p50; what early exit gains
    micro-batched, and at batch size 1 when that was measured without it too."""
    micro, full, single = list(settings.values())[:3]
    bs1_full = settings.get("batch size 1, no early exit")
    return {
        "throughput_ratio": micro["throughput"] / single["throughput"],
        "throughput_met": micro["throughput"] >= 2 * single["throughput"],
        "p99_over_p50": micro["p99_over_p50"],
        "tail_met": micro["p99_over_p50"] <= 2,
        "early_exit_gain": micro["throughput"] / full["throughput"],
        **({} if bs1_full is None else {"early_exit_gain_bs1": single["throughput"] / bs1_full["throughput"]}),
        "throughput_ratio_per_round": per_round_ratios(runs),
    }


def per_round_ratios(runs: dict[str, list[dict]]) -> list[float]:
    """Micro-batching + early exit over batch size 1, within each round (settings minutes apart feel the drift of
    a shared VM's speed less when compared within a round)."""
    micro, _, single = list(runs.values())[:3]
    return [m["throughput"] / s["throughput"] for m, s in zip(micro, single, strict=True)]


def _runtime(report: dict) -> str:
    if report.get("onnx_precision"):
        return f"ONNX Runtime, {report['onnx_precision']} (a `pabee export` folder)"
    torch = "torch, " if "onnx_precision" in report else ""  # reports before ONNX Runtime did not say
    dtype, attention = report.get("dtype") or "float32", report.get("attn_implementation") or "sdpa"
    return f"{torch}weights {dtype}, attention {attention}"


def render(report: dict) -> str:
    p, s = report["provenance"], report["settings"]
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
    ]
    rows = []
    for name, r in s.items():
        c, ms = report["configs"][name], [f"{r[k]:.1f}" for k in ("p50_ms", "p95_ms", "p99_ms")]
        setting = c["patience"] if "patience" in c else f"{c['exit_criterion']} {c['exit_threshold']}"
        rows.append([name, setting, c["max_batch_size"], f"{r['throughput']:.1f}", *ms])
        rows[-1] += [f"{r['p99_over_p50']:.2f}", f"{r['avg_batch_size']:.1f}", f"{r['avg_exit_layer']:.2f}"]
        rows[-1].append(f"{r.get('forward_busy', float('nan')):.0%}")
    head = ["Setting", "Patience", "Max batch", "Throughput (req/s)", "p50 ms", "p95 ms", "p99 ms", "p99/p50"]
    lines += common.table([*head, "Avg. batch", "Avg. exit layer", "Forward busy"], rows)
    return "\n".join(lines + _findings(report)) + "\n"


def _findings(report: dict) -> list[str]:
    t, a = report["targets"], report["model_alone"]
    micro, _, single = list(report["settings"].values())[:3]
    lines = [
        "",
        f"- Micro-batching with early exit vs batch size 1 with early exit: **{t['throughput_ratio']:.2f}x** "
        f"throughput (target >= 2x: {'met' if t['throughput_met'] else 'missed'}); within each round: "
        + ", ".join(f"{r:.2f}x" for r in per_round_ratios(report["runs"]))
        + ".",
        f"- Micro-batching with early exit, p99 / p50 latency: **{t['p99_over_p50']:.2f}** "
        f"(target <= 2: {'met' if t['tail_met'] else 'missed'}).",
        f"- Early exit vs no early exit, both micro-batched: {t['early_exit_gain']:.2f}x throughput.",
        *(
            [f"- Early exit vs no early exit, both at batch size 1: {t['early_exit_gain_bs1']:.2f}x throughput."]
            if "early_exit_gain_bs1" in t
            else []
        ),
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
    ]
    rows = [
        [name, i, f"{r['throughput']:.1f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['avg_batch_size']:.1f}"]
        + [r["load_average_before"]]
        for name, runs in report["runs"].items()
        for i, r in enumerate(runs, start=1)
    ]
    head = ["Setting", "Round", "req/s", "p50 ms", "p99 ms", "Avg. batch", "Load average before"]
    return lines + common.table(head, rows)


def measure(args: argparse.Namespace) -> dict:
    from transformers import AutoConfig

    import pabee  # noqa: F401 - registers the PABEE config
    from pabee.provenance import portable_path

    requests = serving.bodies(common.sst2_sentences(args.glue_dir))
    batched = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms}
    early = early_exit(args)
    configs = {
        "micro-batching + early exit": {**early, **batched},
        "micro-batching, no early exit": {"patience": 0, **batched},
        "batch size 1 + early exit": {**early, "max_batch_size": 1, "max_wait_ms": 0},
    }
    if args.bs1_no_exit:
        configs["batch size 1, no early exit"] = {"patience": 0, "max_batch_size": 1, "max_wait_ms": 0}
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    alone_runs, load_start = [], serving.load_average()
    for round_ in range(args.rounds):
        for name, setting in configs.items():
            runs[name].append(run_setting(args, setting, requests, f"pabee_load_test_{len(runs[name])}.log"))
            print(f"round {round_ + 1}/{args.rounds}, {name}: {runs[name][-1]}", flush=True)
        alone_runs.append(model_alone(args))
        print(f"round {round_ + 1}/{args.rounds}, the model alone, no HTTP: {alone_runs[-1]}", flush=True)
    settings = {name: combine(r) for name, r in runs.items()}
    return common.report(
        **{k: getattr(args, k) for k in ("clients", "duration", "warmup", "rounds", "threads", "dtype")},
        attn_implementation=args.attn_implementation,
        onnx_precision=export_precision(args.model),
        num_layers=AutoConfig.from_pretrained(args.model).encoder_config.num_hidden_layers,
        configs=configs,
        settings=settings,
        runs=runs,
        targets=targets(settings, runs),
        model_alone={key: statistics.median(r[key] for r in alone_runs) for key in alone_runs[0]},
        model_alone_runs=alone_runs,
        load_average_start=load_start,
        load_average_end=serving.load_average(),
        provenance={
            "model": portable_path(args.model),
            "data": portable_path(Path(args.glue_dir).resolve() / "SST-2" / "dev.tsv"),
        },
    )


def main() -> None:
    parser = common.parser(__doc__, "serve_sst2", model="runs/sst2_bench_model", rounds=1)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--patience", type=int, default=2, help="Patience of the early-exit settings.")
    parser.add_argument("--duration", type=float, default=30.0, help="Measured seconds per setting and round.")
    parser.add_argument("--warmup", type=float, default=3.0, help="Unmeasured seconds first.")
    parser.add_argument("--max_requests", type=int, default=50_000, help="Stop a run after this many requests.")
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--max_batch_size", type=int, default=32)
    parser.add_argument("--bs1_no_exit", action="store_true", help="Also batch size 1 without early exit.")
    parser.add_argument("--confidence", type=float, help="Early exit by this confidence threshold, not a patience.")
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"], help="Server attention kernel.")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="Server weights' dtype (default: float32).")
    parser.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)  # model_alone's fresh process
    args = parser.parse_args()
    if args.alone:
        alone(args)
    else:
        common.write_report(args, measure, render)


if __name__ == "__main__":
    main()
