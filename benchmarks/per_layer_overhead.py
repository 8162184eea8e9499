"""What a graph per layer costs on ONNX Runtime: pabee's sessions at patience 0 vs the whole model in one graph.

`backends.py` times a dozen variants in rounds of several seconds each, and on a shared 2-core VM its medians
move by 10-40% from round to round, too much to judge a 5% target. This script compares only the two variants
that the target is about, same precision and threads, in short back-to-back pairs (A B B A ...), and reports the
median and quartiles of the per-pair ratio: noise that lasts longer than a pair hits both sides alike.

It also says where the difference goes, by timing each `session.run` call of the per-layer path (embeddings, mask,
layers) and the Python around them (exit loop, tensor conversions), against the one call of the whole graph.

    python benchmarks/per_layer_overhead.py --model MRPC=runs/mrpc --model SST-2=runs/sst2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from backends import ROOT, WholeGraph, dev_set, timing_batches

from pabee.exits import ExitSpec
from pabee.onnx_export import export_full_model, export_onnx
from pabee.onnx_model import OnnxPabeeModel
from pabee.provenance import provenance, write_atomic, write_json

FULL = ExitSpec("patience", patience=0)


def timed_pass(forward, data: list[dict]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in data:
            forward(**batch)
    return time.perf_counter() - start


def rotating_rounds(variants: dict, data: list[dict], rounds: int) -> dict[str, list[float]]:
    """Seconds of a pass over `data` per variant and round, after a warm-up; each variant leads the rounds in
    turn (two variants: A B, B A, A B, ...), so none is always timed first."""
    for forward in variants.values():
        timed_pass(forward, data[:2])
    names, seconds = list(variants), {name: [] for name in variants}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds[name].append(timed_pass(variants[name], data))
    return seconds


def ratios_over(seconds: dict[str, list[float]], base: str, variant: str) -> list[float]:
    """Per round: the baseline's seconds / the variant's (the variant's speed-up)."""
    return [b / v for b, v in zip(seconds[base], seconds[variant], strict=True)]


def breakdown(model: OnnxPabeeModel, whole: WholeGraph, data: list[dict], repeats: int = 3) -> dict[str, float]:
    """Milliseconds per batch: whole graph's run; per-layer path's total, its session runs by kind, the rest."""
    spent: dict[str, float] = defaultdict(float)
    kinds = {id(model.embeddings): "embeddings", id(model.mask): "mask"}
    run = model._run

    def counted(session, feed):
        start = time.perf_counter()
        try:
            return run(session, feed)
        finally:
            spent[kinds.get(id(session), "layers")] += time.perf_counter() - start

    calls = len(data) * repeats
    model._run = counted
    try:
        total = sum(timed_pass(lambda **b: model(**b, exit_spec=FULL), data) for _ in range(repeats))
    finally:
        del model._run
    whole_total = sum(timed_pass(whole, data) for _ in range(repeats))
    out = {"whole_graph_ms": 1000 * whole_total / calls, "per_layer_ms": 1000 * total / calls}
    out |= {f"{kind}_ms": 1000 * seconds / calls for kind, seconds in spent.items()}
    out["python_ms"] = out["per_layer_ms"] - sum(1000 * s / calls for s in spent.values())
    return out


def measure(name: str, folder: str, args) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, features, _ = dev_set(name, Path(args.glue_dir), tokenizer)
    modes = timing_batches(features, tokenizer.pad_token_id or 0, args.batch_examples, args.single_examples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for precision in ("fp32", "int8"):
            quantize = None if precision == "fp32" else "int8"
            export_onnx(folder, work / precision, quantize=quantize)
            export_full_model(folder, work / f"whole_{precision}.onnx", quantize)
            model = OnnxPabeeModel(work / precision, threads=args.threads)
            whole = WholeGraph(work / f"whole_{precision}.onnx", args.threads)
            for mode, data in modes.items():
                pair = {"whole": whole, "layers": lambda m=model, **b: m(**b, exit_spec=FULL)}
                ratios = ratios_over(rotating_rounds(pair, data, args.pairs), "whole", "layers")
                q1, median, q3 = statistics.quantiles(ratios, n=4)
                row = {"task": name, "precision": precision, "threads": args.threads, "mode": mode}
                row |= {"median": median, "q1": q1, "q3": q3, "ratios": ratios, "examples": len(features)}
                row["examples_per_pass"] = sum(len(b["input_ids"]) for b in data)
                row["breakdown"] = breakdown(model, whole, data)
                rows.append(row)
                print(f"{name} {precision} {mode}: {median:.3f} [{q1:.3f}, {q3:.3f}]", file=sys.stderr, flush=True)
    return rows


def render(report: dict) -> str:
    p = report["provenance"]
    hw = p["hardware"]
    lines = [
        "# The cost of a graph per layer on ONNX Runtime",
        "",
        f"`{p['command']}`  ",
        f"{p['date']}; {hw.get('cpu')} ({', '.join(hw.get('cpu_flags', []))}); "
        f"onnxruntime {report['onnxruntime']}, torch {p['versions'].get('torch')}; {report['threads']} "
        f"thread(s). {report['pairs']} back-to-back pairs per row, alternating which goes first; a pass is the first "
        f"{report['batch_examples']} dev examples in length-sorted batches of 32, or the first "
        f"{report['single_examples']} one at a time.",
        "",
        "Ratio = whole-graph time / per-layer time for the same pass: the per-layer sessions' throughput as a share "
        "of the whole graph's (1.00 = as fast; the target is ≥ 0.95).",
        "",
        "| Task | Precision | Mode | Ratio (median) | Quartiles | Whole graph ms/batch | Per-layer ms/batch | "
        "in embeddings / mask / layer runs | Python around the runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        b = r["breakdown"]
        runs = f"{b.get('embeddings_ms', 0):.2f} / {b.get('mask_ms', 0):.2f} / {b.get('layers_ms', 0):.2f}"
        lines.append(
            f"| {r['task']} | {r['precision']} | {r['mode']} | {r['median']:.3f} | {r['q1']:.3f}–{r['q3']:.3f} | "
            f"{b['whole_graph_ms']:.2f} | {b['per_layer_ms']:.2f} | {runs} | {b['python_ms']:.2f} |"
        )
    met = [r for r in report["rows"] if r["median"] >= 0.95]
    lines += ["", f"Target (≥ 0.95): met in {len(met)} of {len(report['rows'])} rows."]
    return "\n".join(lines) + "\n"


def paired_parser(doc: str, output: str) -> argparse.ArgumentParser:
    """The options this script and `paired_speedups.py` share."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="TASK=FOLDER, e.g. MRPC=runs/mrpc")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--threads", type=int, default=2, help="One count per process (ONNX Runtime's pool).")
    parser.add_argument("--batch_examples", type=int, default=128)
    parser.add_argument("--single_examples", type=int, default=24)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / output))
    return parser


def measure_and_write(args, measure, render, keys: tuple[str, ...]) -> None:
    """Rows of `measure(task, folder, args)` for every --model, written as JSON and Markdown with provenance."""
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    rows = [row for item in args.model for row in measure(*item.split("=", 1), args)]
    report = {"provenance": provenance(model=dict(m.split("=", 1) for m in args.model)), "rows": rows}
    report["onnxruntime"] = version("onnxruntime")
    report |= {k: getattr(args, k) for k in ("threads", "batch_examples", "single_examples", *keys)}
    out = Path(args.output)
    write_json(out.with_suffix(".json"), report)
    write_atomic(out.with_suffix(".md"), render(report))
    print(render(report))


def main() -> None:
    parser = paired_parser(__doc__, "per_layer_overhead")
    parser.add_argument("--pairs", type=int, default=20)
    measure_and_write(parser.parse_args(), measure, render, ("pairs",))


if __name__ == "__main__":
    main()
