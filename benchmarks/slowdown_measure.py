"""Slowdown attack, stage 2 (`slowdown.py --stage measure`): clean vs triggered inputs, the model alone and served.

The model alone (`pabee.pipeline`, real early exit) on the DEV set, the cached trigger prepended (MRPC: to the first
sentence), for patience P, patience P with `max_exit_layer` k, the model truncated at k, and a perfect attack
simulated without and with the cap; then `pabee serve` for the same settings under closed-loop clients.
"""

import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np
import serving
import torch
from slowdown_search import attacked, cached_trigger, exit_layers, layer_logits, token_rows

from pabee.bench import time_variants
from pabee.exits import ExitSpec, sweep_exit_layers
from pabee.metrics import compute_metrics
from pabee.provenance import portable_command, portable_path

PERFECT = "perfect attack"  # settings whose names start so simulate it: attacked inputs only
PLAIN, CAPPED, STATIC, NO_CAP, PERFECT_CAPPED = range(5)  # the settings' places in `exit_settings`
RATIOS = {  # name: (setting, input) over (setting, input), of which measure; `pabee serve` rounds of each
    "attack_p99": ((PLAIN, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "attack_p50": ((PLAIN, "attacked"), (PLAIN, "clean"), "p50_ms"),
    "attack_throughput": ((PLAIN, "clean"), (PLAIN, "attacked"), "examples_per_s"),
    "target_p99": ((CAPPED, "attacked"), (STATIC, "attacked"), "p99_ms"),
    "capped_vs_static_clean_p99": ((CAPPED, "attacked"), (STATIC, "clean"), "p99_ms"),
    "capped_vs_uncapped_attacked_p99": ((CAPPED, "attacked"), (PLAIN, "attacked"), "p99_ms"),
    "capped_vs_static_attacked_throughput": ((STATIC, "attacked"), (CAPPED, "attacked"), "examples_per_s"),
    "target_perfect_p99": ((PERFECT_CAPPED, "attacked"), (STATIC, "attacked"), "p99_ms"),
    "perfect_capped_throughput_vs_static": ((STATIC, "attacked"), (PERFECT_CAPPED, "attacked"), "examples_per_s"),
    "perfect_p99_vs_clean": ((NO_CAP, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "perfect_p50_vs_clean": ((NO_CAP, "attacked"), (PLAIN, "clean"), "p50_ms"),
    "perfect_throughput_vs_clean": ((PLAIN, "clean"), (NO_CAP, "attacked"), "examples_per_s"),
    "perfect_capped_p99_vs_clean": ((PERFECT_CAPPED, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "perfect_p99_vs_perfect_capped": ((NO_CAP, "attacked"), (PERFECT_CAPPED, "attacked"), "p99_ms"),
}


def exit_settings(args: Any) -> dict[str, dict[str, Any]]:
    """The exit settings measured, as pipeline options (and `pabee serve` flags): patience P, patience P capped
    at k, the model truncated at k; and a perfect attack simulated without and with the cap.

    A perfect slowdown attack makes every example's layers disagree, so nobody exits before the cap (or the last
    layer). Entropy below 0 never holds, so `entropy 0` runs exactly that: every example through the early-exit
    loop (each layer's classifier and the exit bookkeeping) to the last layer, or to k with the cap.
    """
    p, k = args.patience, args.max_exit_layer
    never = {"exit_criterion": "entropy", "exit_threshold": 0.0}
    return {
        f"patience {p}": {"patience": p},
        f"patience {p}, max_exit_layer {k}": {"patience": p, "max_exit_layer": k},
        f"static {k} (truncated model)": {"exit_criterion": "static", "exit_threshold": float(k)},
        f"{PERFECT}, no cap (entropy 0)": never,
        f"{PERFECT}, max_exit_layer {k} (entropy 0)": {**never, "max_exit_layer": k},
    }


# --- the model alone -----------------------------------------------------------------------------------------------


def model_alone(task: str, pipe: Any, entry: dict[str, Any], args: Any) -> dict[str, Any]:
    """Dev set, clean vs triggered: one-pass sweep over patiences, and real early exit for each exit setting."""
    from pabee.glue import get_task

    dev, labels = common.glue_split(task, args.glue_dir)
    dev, labels = (dev[: args.dev_examples], labels[: args.dev_examples]) if args.dev_examples else (dev, labels)
    inputs = {"clean": dev, "attacked": attacked(dev, entry["trigger"])}
    out: dict[str, Any] = {"num_examples": len(dev), "sweep": {}, "per_layer": {}, "settings": {}}
    tokens = {name: [len(f["input_ids"]) for f in pipe.tokenize(x)] for name, x in inputs.items()}
    out["mean_tokens"] = {name: statistics.fmean(lengths) for name, lengths in tokens.items()}
    # What the search computed on its training sample (one pass, the exit rule) against real early exit.
    train, _ = common.glue_split(task, args.glue_dir, "train")
    sample, spec = [train[i] for i in entry["train_sample_rows"]], ExitSpec("patience", patience=args.patience)
    out["search_check"] = {
        name: {
            "search_mean_exit_layer": entry[f"train_sample_{name}"]["mean_exit_layer"],
            "real_mean_exit_layer": float(pipe.run(examples, exit_spec=spec)[1].float().mean()),
        }
        for name, examples in (("clean", sample), ("triggered", attacked(sample, entry["trigger"])))
    }
    metrics = get_task(task).metrics
    for name, examples in inputs.items():
        # Tokenized exactly as the pipeline (and the server) does it.
        logits = layer_logits(pipe.model, token_rows(pipe.tokenize(examples)), pipe.tokenizer.pad_token_id, 32)
        predictions = logits.argmax(-1)
        out["sweep"][name] = []
        for p in range(pipe.num_layers):
            exits = exit_layers(logits, p)
            answers = predictions[np.arange(len(dev)), exits - 1]
            out["sweep"][name].append({"patience": p, "avg_exit_layer": float(exits.mean())})
            out["sweep"][name][-1] |= compute_metrics(metrics, answers, labels)
        out["per_layer"][name] = [compute_metrics(metrics, predictions[:, i], labels) for i in range(pipe.num_layers)]
        for setting, options in exit_settings(args).items():
            result = real_exits(pipe, examples, ExitSpec().with_keywords(options), logits, labels, metrics)
            out["settings"].setdefault(setting, {})[name] = result
            print(f"[{task}] model alone, {setting}, {name}: {result}", flush=True)
    if args.bs1_examples:
        out["one_at_a_time"] = one_at_a_time(task, pipe, dev, entry["trigger"], args)
    return out


def real_exits(pipe: Any, examples: list, spec: ExitSpec, logits: np.ndarray, labels, metrics) -> dict[str, Any]:
    """Real early exit at one setting, against the exits and answers read off the one-pass `logits`."""
    began = time.perf_counter()
    real_logits, real = pipe.run(examples, exit_spec=spec)
    seconds, real = time.perf_counter() - began, real.numpy()
    swept = sweep_exit_layers(pipe.model.config.build_criterion(spec), torch.as_tensor(logits)).numpy()
    swept_answers = logits.argmax(-1)[np.arange(len(examples)), swept - 1]
    answers = real_logits.argmax(-1).numpy()
    return {
        **compute_metrics(metrics, answers, labels),
        "avg_exit_layer": float(real.mean()),
        "exit_histogram": np.bincount(real, minlength=pipe.num_layers + 1)[1:].tolist(),
        "examples_per_s": len(examples) / seconds,
        "one_pass_avg_exit_layer": float(swept.mean()),
        "exit_layers_equal_one_pass": int((swept == real).sum()),
        "answers_equal_one_pass": int((swept_answers == answers).sum()),
    }


def one_at_a_time(task: str, pipe: Any, dev: list, trigger: str, args: Any) -> dict[str, Any]:
    """The model alone, one example per call (what a 1-client server runs, without HTTP): per-example latency of
    the settings the verdicts compare, interleaved over `--rounds` rounds on the same random dev examples."""
    settings = exit_settings(args)
    names = list(settings)
    combos = [(names[PLAIN], "clean")] + [
        (names[i], "attacked") for i in (PLAIN, CAPPED, STATIC, NO_CAP, PERFECT_CAPPED)
    ]
    rows = random.Random(args.seed).sample(range(len(dev)), min(args.bs1_examples, len(dev)))
    inputs = {"clean": [dev[i] for i in rows], "attacked": attacked([dev[i] for i in rows], trigger)}

    def variant(setting: str, name: str):
        spec = ExitSpec().with_keywords(settings[setting])

        def run(timing) -> None:
            for example in inputs[name]:
                began = time.perf_counter()
                pipe.run([example], exit_spec=spec)
                timing.latencies.append(time.perf_counter() - began)

        return run

    timings = time_variants({f"{s} | {n}": variant(s, n) for s, n in combos}, args.rounds, 1, args.seed)
    out: dict[str, Any] = {"examples": len(rows), "settings": {}}
    for label, timing in timings.items():
        pooled = timing.latencies
        rounds = [pooled[i : i + len(rows)] for i in range(0, len(pooled), len(rows))]
        out["settings"][label] = {
            "examples_per_s": len(pooled) / sum(pooled),
            "p50_ms": 1000 * serving.percentile(pooled, 50),
            "p99_ms": 1000 * serving.percentile(pooled, 99),
            "p99_ms_per_round": [1000 * serving.percentile(r, 99) for r in rounds],
            "mean_ms_per_round": [1000 * statistics.fmean(r) for r in rounds],
        }
        print(f"[{task}] one at a time, {label}: {out['settings'][label]}", flush=True)
    return out | alone_ratios(out["settings"], names, args.target)


def alone_ratios(settings: dict[str, dict], names: list[str], target: float) -> dict[str, Any]:
    """The verdicts of the one-at-a-time runs: capped (real trigger, perfect attack) over truncated, p99."""

    def ratio(a: int, b: int) -> dict[str, Any]:
        x, y = settings[f"{names[a]} | attacked"], settings[f"{names[b]} | attacked"]
        means = [m / n for m, n in zip(x["mean_ms_per_round"], y["mean_ms_per_round"], strict=True)]
        return {"p99": x["p99_ms"] / y["p99_ms"], "mean_per_round": means, "met": x["p99_ms"] / y["p99_ms"] <= target}

    clean, hit = settings[f"{names[PLAIN]} | clean"], settings[f"{names[PLAIN]} | attacked"]
    return {
        "target": ratio(CAPPED, STATIC),
        "target_perfect": ratio(PERFECT_CAPPED, STATIC),
        "attack_p99": hit["p99_ms"] / clean["p99_ms"],
        "attack_mean": clean["examples_per_s"] / hit["examples_per_s"],
        "perfect_p99": settings[f"{names[NO_CAP]} | attacked"]["p99_ms"] / clean["p99_ms"],
    }


# --- the server ----------------------------------------------------------------------------------------------------


def measure_load(port: int, requests: list[bytes], clients: int, args: Any, seed: int) -> dict:
    """Warm up, then one timed run; throughput, latency percentiles and the exit layers /metrics counted."""

    async def drive(seconds: float, seed: int) -> tuple[list[tuple], float]:
        began = asyncio.get_running_loop().time()
        rows = await serving.closed_loop(port, requests, clients, began + seconds, seed=seed)
        return serving.answered(rows), max([began, *(row[1] for row in rows)]) - began

    asyncio.run(drive(args.warmup, seed + 7919))
    before, load_before = serving.metrics(port), serving.load_average()
    rows, wall = asyncio.run(drive(args.duration, seed))
    diff = {name: value - before.get(name, 0.0) for name, value in serving.metrics(port).items()}
    buckets = {float(n.split('"')[1]): v for n, v in diff.items() if n.startswith("pabee_exit_layer_bucket")}
    cumulative = [buckets[le] for le in sorted(buckets) if le != float("inf")]  # layers 1..L, cumulative counts
    latencies = [row[1] - row[0] for row in rows]
    return {
        "requests": len(latencies),
        "seconds": wall,
        "examples_per_s": len(latencies) / wall,
        "p50_ms": 1000 * serving.percentile(latencies, 50),
        "p99_ms": 1000 * serving.percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "avg_exit_layer": diff["pabee_exit_layer_sum"] / diff["pabee_exit_layer_count"],
        "exit_histogram": [int(b - a) for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)],
        "avg_batch_size": diff["pabee_batch_size_sum"] / max(1.0, diff["pabee_batch_size_count"]),
        "forward_busy": diff["pabee_batch_duration_seconds_sum"] / wall,
        "load_average_before": load_before,
    }


def serve_rounds(args: Any, triggers: dict[str, str]) -> dict[str, Any]:
    """Every task × exit setting × clients × input, interleaved over `--rounds`; per-round results."""
    settings = exit_settings(args)
    runs: dict[str, dict[str, list[dict]]] = {task: {} for task in args.tasks}
    requests = {}
    for task in args.tasks:
        dev, _ = common.glue_split(task, args.glue_dir)
        requests[task] = {"clean": serving.bodies(dev), "attacked": serving.bodies(attacked(dev, triggers[task]))}
    names = list(settings)
    for round_ in range(args.rounds):
        for task in args.tasks:
            for setting in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotated each round
                options = serving.flags(threads=args.threads, no_access_log=True, **settings[setting])
                with serving.serving(args.models[task], options, "slowdown.log") as (port, _):
                    for clients in args.clients:
                        order = ("clean", "attacked") if round_ % 2 == 0 else ("attacked", "clean")
                        if setting.startswith(PERFECT):  # a simulated attack: attacked inputs (their lengths)
                            order = ("attacked",)
                        for name in order:
                            # Same seed for clean and attacked: the same dev examples in the same order.
                            result = measure_load(port, requests[task][name], clients, args, 100 * round_ + clients)
                            label = f"{setting} | {name} | {clients} client{'s' if clients > 1 else ''}"
                            runs[task].setdefault(label, []).append(result)
                            print(f"round {round_ + 1}/{args.rounds} [{task}] {label}: {result}", flush=True)
    return runs


def summarise(runs: dict[str, list[dict]], args: Any) -> dict[str, Any]:
    """Medians over rounds per setting, and the ratios within each round that the verdicts use."""
    keys = ("examples_per_s", "p50_ms", "p99_ms", "mean_ms", "avg_exit_layer", "avg_batch_size", "forward_busy")
    medians = {label: {k: statistics.median(r[k] for r in rs) for k in keys} for label, rs in runs.items()}
    names = list(exit_settings(args))
    out: dict[str, Any] = {"medians": medians, "by_clients": {}}
    for clients in args.clients:
        suffix = f"{clients} client{'s' if clients > 1 else ''}"
        by = out["by_clients"][suffix] = {}
        for ratio, ((a, x), (b, y), key) in RATIOS.items():
            top, bottom = runs[f"{names[a]} | {x} | {suffix}"], runs[f"{names[b]} | {y} | {suffix}"]
            per_round = [p[key] / q[key] for p, q in zip(top, bottom, strict=True)]
            by[ratio] = {
                "of_medians": statistics.median(p[key] for p in top) / statistics.median(q[key] for q in bottom),
                "per_round": per_round,
                "median_per_round": statistics.median(per_round),
            }
        for name in ("target", "target_perfect"):
            by[f"{name}_met"] = by[f"{name}_p99"]["of_medians"] <= args.target
            by[f"{name}_met_rounds"] = sum(r <= args.target for r in by[f"{name}_p99"]["per_round"])
    out["note"] = f"patience {args.patience}, cap k={args.max_exit_layer}"
    return out


def stage_measure(args: Any) -> dict[str, Any]:
    """The report: the model alone per task, then the server rounds."""
    from pabee.pipeline import pipeline

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    entries = {task: cached_trigger(task, args) for task in args.tasks}
    alone = {task: model_alone(task, pipeline(args.models[task]), entries[task], args) for task in args.tasks}
    alone_seconds, load_start, serve_began = time.perf_counter() - began, serving.load_average(), time.perf_counter()
    runs = serve_rounds(args, {task: e["trigger"] for task, e in entries.items()})
    tasks = {}
    for task in args.tasks:
        patience = json.loads((Path(args.models[task]) / "config.json").read_text())["patience"]
        trigger = {k: v for k, v in entries[task].items() if k != "provenance"}
        tasks[task] = {
            "model": portable_path(args.models[task]),
            "model_config_patience": patience,
            "trigger": trigger,
        }
        tasks[task] |= {"model_alone": alone[task], "server": summarise(runs[task], args), "server_runs": runs[task]}
    argv = [portable_command(arg) for arg in sys.argv]
    return common.report(
        **{k: getattr(args, k) for k in ("patience", "max_exit_layer")},
        target_ratio=args.target,
        exit_rule="sweep_exit_layers",
        **{k: getattr(args, k) for k in ("threads", "clients", "rounds", "duration", "warmup")},
        settings=exit_settings(args),
        tasks=tasks,
        elapsed_seconds={
            "model_alone": alone_seconds,
            "server": time.perf_counter() - serve_began,
            "measure_total": time.perf_counter() - began,
            "search_recorded": {task: entries[task]["search_seconds"] for task in args.tasks},
        },
        load_average_start=load_start,
        load_average_end=serving.load_average(),
        provenance={
            "models": {task: portable_path(model) for task, model in args.models.items()},
            "data": portable_path(Path(args.glue_dir).resolve()),
            "triggers": portable_path(Path(args.triggers).resolve()),
            "stage_command": argv,
        },
    )
