"""Why `pabee serve` loads the model in the thread that runs it: one torch thread pool vs two.

Each case runs in a fresh process: the fine-tuned model is loaded either in the main thread or in the worker
thread (`pabee.batching.forward_thread`), then the worker thread classifies batches of 16 random SST-2 dev
sentences and single sentences for `--seconds` each (patience 2). Loading in the main thread starts a second
OpenMP team there; the cases differ only in that. Cases are interleaved over `--rounds`; medians are reported.

    python benchmarks/thread_pools.py --model runs/sst2_bench_model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import model_alone  # benchmarks/model_alone.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sst2_bench_model")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "thread_pools"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from pabee.provenance import provenance, write_atomic, write_json

    data = str(Path(args.glue_dir) / "SST-2" / "dev.tsv")
    cases = [(dtype, load_in) for dtype in ("float32", "bfloat16") for load_in in ("main", "worker")]
    runs: dict[str, list[dict]] = {f"{d}/{w}": [] for d, w in cases}
    for round_ in range(args.rounds):
        for dtype, load_in in cases:
            argv = ["--model", args.model, "--glue_dir", args.glue_dir, "--dtype", dtype, "--load_in", load_in]
            argv += ["--seconds", str(args.seconds), "--warmup", "1", "--batch", "16", "--threads", "2"]
            runs[f"{dtype}/{load_in}"].append(model_alone.measure(argv))
            print(round_ + 1, dtype, load_in, runs[f"{dtype}/{load_in}"][-1], flush=True)
    medians = {
        case: {key: statistics.median(r[key] for r in rs) for key in ("batched_per_s", "single_per_s")}
        for case, rs in runs.items()
    }
    report = {"runs": runs, "medians": medians, "provenance": provenance(model=args.model, data=data)}
    write_json(Path(args.output).with_suffix(".json"), report)
    p = report["provenance"]
    lines = [
        "# Loading the model in the thread that runs it",
        "",
        f"Model: `{args.model}`, patience 2, 2 torch threads, the model run in a worker thread; "
        f"{args.rounds} interleaved rounds of {args.seconds:.0f} s per measure, medians.  ",
        f"Command: `{p['command']}`  ",
        f"Date: {p['date']}; torch {p['versions']['torch']}, {p['hardware']['cpu']}, "
        f"{p['hardware']['cpu_count']} cores.",
        "",
        "| Weights | Model loaded in | Batches of 16 (sentences/s) | One at a time (sentences/s) |",
        "|---|---|---|---|",
    ]
    for dtype, load_in in cases:
        m = medians[f"{dtype}/{load_in}"]
        where = "the main thread (two pools)" if load_in == "main" else "the worker thread (one pool)"
        lines.append(f"| {dtype} | {where} | {m['batched_per_s']:.0f} | {m['single_per_s']:.0f} |")
    lines.append("")
    for dtype in ("float32", "bfloat16"):
        one, two = medians[f"{dtype}/worker"], medians[f"{dtype}/main"]
        lines.append(
            f"- {dtype}: one pool is {one['batched_per_s'] / two['batched_per_s']:.2f}x as fast on batches and "
            f"{one['single_per_s'] / two['single_per_s']:.2f}x on single sentences."
        )
    write_atomic(Path(args.output).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
