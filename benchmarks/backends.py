"""Early exit on the runtimes CPU users deploy: torch vs ONNX Runtime fp32 / int8, full model vs early exit.

For each fine-tuned model (GLUE dev set) and thread count, in ONE process with the variants interleaved in a
shuffled order every round (median of `--repeats` after a warm-up), for length-sorted batches of 32 and for one
example at a time:

- torch fp32 full model, torch fp32 early exit; torch bf16 full and early exit;
- ONNX Runtime fp32 and int8 with the whole model in one graph (the baseline a CPU user picks);
- pabee on ONNX Runtime fp32 and int8 per-layer sessions: patience 0 (full depth) and early exit.

Early-exit settings are the fastest patience and the fastest confidence threshold whose metric is within one
point of the torch fp32 full model, read off one torch pass over the dev set (the same rule for every backend;
each backend's own metric at that setting is reported). Timing uses the first `--timed_examples` of the dev set
(batch 32) and the first `--bs1_examples` (batch 1); metrics use the whole dev set.

    python benchmarks/backends.py --model MRPC=runs/mrpc --model SST-2=runs/sst2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pabee import sweep_exit_layers  # noqa: E402
from pabee.bench import make_batches  # noqa: E402
from pabee.data import load_glue  # noqa: E402
from pabee.exits import ExitSpec, logits_at_exit  # noqa: E402
from pabee.glue import get_task  # noqa: E402
from pabee.metrics import compute_metrics  # noqa: E402
from pabee.onnx_export import export_full_model, export_onnx  # noqa: E402
from pabee.onnx_model import OnnxPabeeModel, session_options  # noqa: E402
from pabee.pipeline import load_model_folder  # noqa: E402
from pabee.provenance import provenance, write_atomic, write_json  # noqa: E402

CONFIDENCES = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def dev_set(task_name: str, glue_dir: Path, tokenizer, max_length: int = 128):
    task = get_task(task_name)
    data = load_glue(task, glue_dir, train=False, evaluate=True, test=False)
    dev = data.eval[task.eval_splits[0].name]
    pairs = dev["text_pair"] if "text_pair" in dev.column_names else [None] * len(dev)
    features = []
    for text, pair in zip(dev["text"], pairs, strict=True):
        encoded = tokenizer(text, pair, truncation=True, max_length=max_length, return_tensors="pt")
        features.append({k: v[0] for k, v in encoded.items()})
    return task, features, np.asarray(dev["label"])


def length_order(features: list) -> list[int]:
    """The dev indices in the order `make_batches(..., sort=True)` puts them: shortest first."""
    return sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))


def in_dev_order(sorted_rows: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Rows of a pass over length-sorted batches put back in the dev file's order, the labels' order."""
    rows = torch.empty_like(sorted_rows)
    rows[torch.tensor(order)] = sorted_rows
    return rows


def timing_batches(features: list, pad: int, batch_examples: int, single_examples: int) -> dict[str, list[dict]]:
    """What a speed is measured on: the first `batch_examples` in length-sorted batches of 32, the first
    `single_examples` one at a time."""
    return {
        "batch 32": make_batches(features[:batch_examples], 32, pad, True),
        "batch 1": make_batches(features[:single_examples], 1, pad, False),
    }


def choose_settings(model, batches, order, labels, task) -> tuple[dict[str, ExitSpec], float]:
    """The fastest patience and confidence setting within one point of the full model (torch fp32, one pass)."""
    with torch.inference_mode():
        all_logits = in_dev_order(torch.cat([model(**b, output_all_logits=True).all_logits for b in batches]), order)
    metric = task.main_metric

    def score(spec: ExitSpec) -> tuple[float, float]:
        exits = sweep_exit_layers(model.get_exit_criterion(spec), all_logits)
        chosen = logits_at_exit(all_logits, exits).argmax(-1).numpy()
        return compute_metrics(task.metrics, chosen, labels)[metric], float(exits.float().mean())

    full, _ = score(ExitSpec("patience", patience=0))
    candidates = {
        "patience": [ExitSpec("patience", patience=p) for p in range(1, model.num_layers - 1)],
        "confidence": [ExitSpec("confidence", threshold=t) for t in CONFIDENCES],
    }
    chosen = {}
    for name, specs in candidates.items():
        scored = [(spec, *score(spec)) for spec in specs]
        close = [s for s in scored if s[1] >= full - 0.01] or [max(scored, key=lambda s: s[1])]
        chosen[name] = min(close, key=lambda s: s[2])[0]
    return chosen, full


class WholeGraph:
    """ONNX Runtime with the full model in one graph."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = session_options(threads)  # the process-wide pool when the pabee sessions made one
        if options.use_per_session_threads:
            options = ort.SessionOptions()  # ONNX Runtime's own defaults, as a user would run one graph
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch):
        feed = {name: np.ascontiguousarray(batch[name].numpy(), dtype=np.int64) for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0]), None


def variants_for(folder: Path, work: Path, threads: int, specs: dict[str, ExitSpec]) -> dict:
    """name → forward(batch) → (logits, exit_layers or None)."""
    torch_fp32 = load_model_folder(folder)
    torch_bf16 = load_model_folder(folder, dtype="bfloat16")
    ort_models = {p: OnnxPabeeModel(work / p, threads=threads) for p in ("fp32", "int8")}

    def engine(model, spec):
        def run(**batch):
            out = model(**batch, exit_spec=spec)
            return out.logits.float(), out.exit_layers

        return run

    full = ExitSpec("patience", patience=0)
    out = {"torch fp32 full": engine(torch_fp32, full)}
    out.update({f"torch fp32 {n}": engine(torch_fp32, s) for n, s in specs.items()})
    out["torch bf16 full"] = engine(torch_bf16, full)
    out["torch bf16 patience"] = engine(torch_bf16, specs["patience"])
    for precision, model in ort_models.items():
        out[f"ORT {precision} whole graph"] = WholeGraph(work / f"whole_{precision}.onnx", threads)
        out[f"pabee ORT {precision} patience 0"] = engine(model, full)
        out.update({f"pabee ORT {precision} {n}": engine(model, s) for n, s in specs.items()})
    return out


def exit_agreement(exits_of: dict) -> dict[str, float]:
    """Share of examples whose exit layer on ONNX Runtime equals torch fp32's at the same setting."""
    out = {}
    for name, exits in exits_of.items():
        if name.startswith("pabee ORT") and exits is not None:
            setting = name.split(" ", 3)[3].replace("patience 0", "full")
            out[name] = float((exits == exits_of[f"torch fp32 {setting}"]).float().mean())
    return out


def layer_logits_difference(folder: Path, work: Path, features: list, pad: int) -> float:
    """Largest difference between torch fp32 and ONNX Runtime fp32 logits over every layer and example."""
    model, onnx = load_model_folder(folder), OnnxPabeeModel(work / "fp32")
    worst = 0.0
    with torch.inference_mode():
        for batch in make_batches(features, 32, pad, True):
            expected = model(**batch, output_all_logits=True).all_logits
            worst = max(worst, float((onnx(**batch, output_all_logits=True).all_logits - expected).abs().max()))
    return worst


def time_round(variants: dict, data: list, rng: random.Random, timings: dict) -> None:
    order = list(variants)
    rng.shuffle(order)
    for name in order:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in data:
                variants[name](**batch)
        timings.setdefault(name, []).append(time.perf_counter() - start)


def time_modes(variants: dict, features: list, pad: int, args) -> Iterator[tuple[str, dict[str, list[float]], int]]:
    """For length-sorted batches of 32 and for one example at a time: (mode, seconds of each round by variant,
    examples per round), the variants interleaved in a shuffled order every round after a warm-up."""
    for mode, data in timing_batches(features, pad, args.timed_examples, args.bs1_examples).items():
        timings: dict[str, list[float]] = {}
        rng = random.Random(0)
        time_round(variants, data[:2], rng, {})  # warm-up
        for _ in range(args.repeats):
            time_round(variants, data, rng, timings)
        yield mode, timings, sum(len(b["input_ids"]) for b in data)


def measure(args, name: str, folder: Path, work: Path) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task, features, labels = dev_set(name, Path(args.glue_dir), tokenizer)
    pad = tokenizer.pad_token_id or 0
    torch.set_num_threads(2)
    order = length_order(features)
    batches = make_batches(features, 32, pad, True)
    specs, full_metric = choose_settings(load_model_folder(folder), batches, order, labels, task)
    difference = layer_logits_difference(folder, work, features, pad)
    print(
        f"{name}: every layer's logits, torch fp32 vs ONNX Runtime fp32: max |diff| {difference:.2e}", file=sys.stderr
    )
    rows, quality, exits_of, agreement = [], {}, {}, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = variants_for(folder, work, threads, specs)
        for vname, forward in variants.items() if not quality else ():  # metrics once: the whole dev set
            with torch.inference_mode():
                outs = [forward(**b) for b in batches]
            predictions = in_dev_order(torch.cat([o[0] for o in outs]), order).argmax(-1).numpy()
            exits = torch.cat([o[1] for o in outs]) if outs[0][1] is not None else None
            exits_of[vname] = exits
            average = None if exits is None else exits.float().mean().item()
            quality[vname] = (compute_metrics(task.metrics, predictions, labels)[task.main_metric], average)
        agreement = agreement or exit_agreement(exits_of)
        for mode, timings, count in time_modes(variants, features, pad, args):
            base = count / statistics.median(timings["torch fp32 full"])
            for vname in variants:
                seconds = timings[vname]
                speed = count / statistics.median(seconds)
                metric, exit_layer = quality[vname]
                rows.append(
                    {
                        "task": name,
                        "threads": threads,
                        "mode": mode,
                        "variant": vname,
                        "metric": task.main_metric,
                        "value": metric,
                        "full_metric": full_metric,
                        "avg_exit_layer": exit_layer,
                        "examples_per_s": speed,
                        "over_torch_full": speed / base,
                        "spread_pct": 100 * (max(seconds) - min(seconds)) / statistics.median(seconds),
                        "setting": {n: s.label for n, s in specs.items()},
                        "exits_equal_torch": agreement.get(vname),
                        "layer_logits_max_diff": difference,
                    }
                )
            print(f"{name} {threads} threads {mode}: done", file=sys.stderr)
    return rows


def render(report: dict) -> str:
    p = report["provenance"]
    lines = [
        "# Early exit on ONNX Runtime: torch vs ONNX Runtime fp32 / int8",
        "",
        f"`{p['command']}`  ",
        f"{p['date']}; {p['hardware']['cpu']} ({', '.join(p['hardware']['cpu_flags'])}); torch "
        f"{p['versions']['torch']}, onnxruntime {report['onnxruntime']}; median of {report['repeats']} interleaved "
        f"rounds after a warm-up. Metric on the whole dev set; speed on the first {report['timed_examples']} "
        f"examples (length-sorted batches of 32) and the first {report['bs1_examples']} (one at a time). "
        "Exits = torch: the share of dev examples whose exit layer equals torch fp32's at the same setting.",
        "",
    ]
    if len(report.get("runs", [])) > 1:  # each thread count ran in a process of its own
        lines += ["Runs (a process each; later runs replaced the rows of their thread counts):", ""]
        lines += [f"- {run['date']}: `{run['command']}`" for run in report["runs"]]
        lines += [""]
    groups: dict[tuple, list] = {}
    for row in report["rows"]:
        groups.setdefault((row["task"], row["threads"], row["mode"]), []).append(row)
    for (task, threads, mode), rows in groups.items():
        settings = ", ".join(f"{k} {v}" for k, v in rows[0]["setting"].items())
        lines += [f"## {task}, {threads} thread(s), {mode} (settings: {settings})", ""]
        head = (
            f"| Variant | {rows[0]['metric']} | Avg. exit layer | Exits = torch | ex/s | × torch fp32 full | Spread |"
        )
        lines += [head, "|---|---|---|---|---|---|---|"]
        for r in rows:
            layer = "—" if r["avg_exit_layer"] is None else f"{r['avg_exit_layer']:.2f}"
            same = "—" if r["exits_equal_torch"] is None else f"{100 * r['exits_equal_torch']:.1f}%"
            lines.append(
                f"| {r['variant']} | {100 * r['value']:.1f} | {layer} | {same} | {r['examples_per_s']:.1f} | "
                f"{r['over_torch_full']:.2f} | {r['spread_pct']:.0f}% |"
            )
        lines += [
            "",
            f"Every layer's logits, torch fp32 vs ONNX Runtime fp32: max diff {rows[0]['layer_logits_max_diff']:.1e}",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="TASK=FOLDER, e.g. MRPC=runs/mrpc")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--timed_examples", type=int, default=256)
    parser.add_argument("--bs1_examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "backends"))
    parser.add_argument(
        "--keep_other_threads",
        action="store_true",
        help="Keep the rows of other thread counts already in --output.json (ONNX Runtime's shared thread pool is "
        "sized once per process, so each thread count runs in a process of its own).",
    )
    args = parser.parse_args()
    rows = []
    for item in args.model:
        name, _, folder = item.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            export_onnx(folder, work / "fp32")
            export_onnx(folder, work / "int8", quantize="int8")
            for precision in ("fp32", "int8"):
                export_full_model(folder, work / f"whole_{precision}.onnx", None if precision == "fp32" else "int8")
            rows += measure(args, name, Path(folder), work)
    from importlib.metadata import version

    out = Path(args.output)
    if args.keep_other_threads and out.with_suffix(".json").is_file():
        earlier = json.loads(out.with_suffix(".json").read_text())
        kept = [r for r in earlier["rows"] if r["threads"] not in args.threads]
        rows = sorted(kept + rows, key=lambda r: (r["task"] != "MRPC", -r["threads"]))
        runs = [*earlier.get("runs", [earlier["provenance"]]), None]
    else:
        runs = [None]
    report = {
        "provenance": provenance(model={m.partition("=")[0]: m.partition("=")[2] for m in args.model}),
        "onnxruntime": version("onnxruntime"),
        "repeats": args.repeats,
        "timed_examples": args.timed_examples,
        "bs1_examples": args.bs1_examples,
        "rows": rows,
    }
    report["runs"] = [r or report["provenance"] for r in runs]  # one provenance per process that made rows
    write_json(out.with_suffix(".json"), report)
    write_atomic(out.with_suffix(".md"), render(report) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
