"""Early exit on the runtimes CPU users deploy (backends.md): torch vs ONNX Runtime fp32 / int8, full model vs
early exit, per model (GLUE dev set) and thread count, the variants interleaved in ONE process (median of
`--repeats`), at length-sorted batches of 32 (`--timed_examples`) and one example at a time (`--bs1_examples`):
torch fp32 and bf16, full and early exit; ONNX Runtime fp32 and int8 with the whole model in one graph (the
baseline a CPU user picks); pabee on ONNX Runtime fp32 and int8 per-layer sessions, patience 0 and early exit.

Early-exit settings are the fastest patience and confidence threshold within one point of torch fp32's full-model
metric, read off one torch pass over the dev set; each backend's own metric at them is reported (whole dev set).

    python benchmarks/backends.py --model MRPC=runs/mrpc --model SST-2=runs/sst2
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

import common
import numpy as np
import torch

from pabee import infer, load_runtime
from pabee.bench import make_batches
from pabee.exits import ExitSpec, logits_at_exit, sweep_exit_layers
from pabee.glue import get_task
from pabee.metrics import compute_metrics

CONFIDENCES = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FULL = ExitSpec("patience", patience=0)


class DevSet:
    """A task's dev set, tokenized: features (unpadded), labels, and batches of 32 in length order."""

    def __init__(self, task_name: str, glue_dir: str, tokenizer) -> None:
        self.task = get_task(task_name)
        examples, self.labels = common.glue_split(task_name, glue_dir)
        self.features = common.features(tokenizer, examples)
        self.pad = tokenizer.pad_token_id or 0
        self.order = common.length_order(self.features)
        self.batches = make_batches(self.features, 32, self.pad, True)

    def in_dev_order(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Rows of a pass over the length-sorted batches put back in the dev file's order, the labels' order."""
        rows = torch.empty_like(sorted_rows)
        rows[torch.tensor(self.order)] = sorted_rows
        return rows

    def score(self, logits: torch.Tensor) -> float:
        """The task's main metric of logits in dev order."""
        return compute_metrics(self.task.metrics, logits.argmax(-1).numpy(), self.labels)[self.task.main_metric]

    def timing_batches(self, batch_examples: int, single_examples: int) -> dict[str, list[dict]]:
        """What a speed is measured on: the first `batch_examples` in length-sorted batches of 32, the first
        `single_examples` one at a time."""
        return {
            "batch 32": make_batches(self.features[:batch_examples], 32, self.pad, True),
            "batch 1": make_batches(self.features[:single_examples], 1, self.pad, False),
        }


def choose_settings(model, dev: DevSet) -> tuple[dict[str, ExitSpec], float]:
    """The fastest patience and confidence setting within one point of the full model (torch fp32, one pass)."""
    with torch.inference_mode():
        layers = [infer(model, b, FULL, all_layers=True).all_logits for b in dev.batches]
    all_logits = dev.in_dev_order(torch.cat(layers))

    def score(spec: ExitSpec) -> tuple[float, float]:
        exits = sweep_exit_layers(model.config.build_criterion(spec), all_logits)
        return dev.score(logits_at_exit(all_logits, exits)), float(exits.float().mean())

    full, _ = score(FULL)
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
    """ONNX Runtime with the full model in one graph; a forward returns (logits, None: no exit layers)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        from pabee.onnx_model import session_options

        options = session_options(threads)  # the process-wide pool when the pabee sessions made one
        if options.use_per_session_threads:
            options = ort.SessionOptions()  # ONNX Runtime's own defaults, as a user would run one graph
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict) -> tuple[torch.Tensor, None]:
        feed = {name: np.ascontiguousarray(batch[name].numpy(), dtype=np.int64) for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0]), None


def export(folder: str, work: Path, precisions: tuple[str, ...] = ("fp32", "int8")) -> None:
    """Per precision: pabee's per-layer export in `work/<precision>`, the whole graph in `work/whole_<precision>`."""
    from pabee.onnx_export import export_full_model, export_onnx

    for precision in precisions:
        quantize = None if precision == "fp32" else precision
        export_onnx(folder, work / precision, quantize=quantize)
        export_full_model(folder, work / f"whole_{precision}.onnx", quantize)


def engine(model, spec: ExitSpec):
    """A forward of any runtime at one exit setting: batch → (logits, exit layers)."""

    def run(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = infer(model, batch, spec)
        return out.logits.float(), out.exit_layers

    return run


def variants_for(folder: str, work: Path, threads: int, specs: dict[str, ExitSpec]) -> dict:
    """name → forward(batch) → (logits, exit_layers or None)."""
    torch_fp32, torch_bf16 = load_runtime(folder), load_runtime(folder, dtype="bfloat16")
    out = {"torch fp32 full": engine(torch_fp32, FULL)}
    out.update({f"torch fp32 {n}": engine(torch_fp32, s) for n, s in specs.items()})
    out["torch bf16 full"] = engine(torch_bf16, FULL)
    out["torch bf16 patience"] = engine(torch_bf16, specs["patience"])
    for precision in ("fp32", "int8"):
        model = load_runtime(work / precision, threads=threads)
        out[f"ORT {precision} whole graph"] = WholeGraph(work / f"whole_{precision}.onnx", threads)
        out[f"pabee ORT {precision} patience 0"] = engine(model, FULL)
        out.update({f"pabee ORT {precision} {n}": engine(model, s) for n, s in specs.items()})
    return out


def quality(variants: dict, dev: DevSet) -> tuple[dict[str, tuple], dict[str, float]]:
    """Each variant's metric and mean exit layer on the whole dev set; the share of examples whose exit layer on
    ONNX Runtime equals torch fp32's at the same setting."""
    scores, exits_of = {}, {}
    for name, forward in variants.items():
        with torch.inference_mode():
            outs = [forward(b) for b in dev.batches]
        exits = exits_of[name] = None if outs[0][1] is None else torch.cat([o[1] for o in outs])
        metric = dev.score(dev.in_dev_order(torch.cat([o[0] for o in outs])))
        scores[name] = (metric, None if exits is None else exits.float().mean().item())
    agreement = {}
    for name, exits in exits_of.items():
        if name.startswith("pabee ORT") and exits is not None:
            setting = name.split(" ", 3)[3].replace("patience 0", "full")
            agreement[name] = float((exits == exits_of[f"torch fp32 {setting}"]).float().mean())
    return scores, agreement


def layer_logits_difference(folder: str, work: Path, dev: DevSet) -> float:
    """Largest difference between torch fp32 and ONNX Runtime fp32 logits over every layer and example."""
    models, worst = (load_runtime(folder), load_runtime(work / "fp32")), 0.0
    with torch.inference_mode():
        for batch in dev.batches:
            expected, got = (infer(m, batch, FULL, all_layers=True).all_logits for m in models)
            worst = max(worst, float((got - expected).abs().max()))
    return worst


def measure_task(args, name: str, folder: str, work: Path) -> list[dict]:
    """Every row of one task: each thread count, mode and variant."""
    from transformers import AutoTokenizer

    dev = DevSet(name, args.glue_dir, AutoTokenizer.from_pretrained(folder))
    torch.set_num_threads(2)
    specs, full_metric = choose_settings(load_runtime(folder), dev)
    difference = layer_logits_difference(folder, work, dev)
    note = f"{name}: every layer's logits, torch fp32 vs ONNX Runtime fp32: max |diff| {difference:.2e}"
    print(note, file=sys.stderr)
    fixed = {"task": name, "metric": dev.task.main_metric, "full_metric": full_metric}
    fixed |= {"setting": {n: s.label for n, s in specs.items()}, "layer_logits_max_diff": difference}
    rows, scores, agreement = [], None, {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        variants = variants_for(folder, work, threads, specs)
        if scores is None:  # metrics once: the whole dev set
            scores, agreement = quality(variants, dev)
        for mode, data in dev.timing_batches(args.timed_examples, args.bs1_examples).items():
            timings, count = common.time_passes(variants, data, args.repeats), sum(len(b["input_ids"]) for b in data)
            base = count / statistics.median(timings["torch fp32 full"])
            for vname, seconds in timings.items():
                speed = count / statistics.median(seconds)
                rows.append(
                    fixed
                    | {"threads": threads, "mode": mode, "variant": vname, "value": scores[vname][0]}
                    | {"avg_exit_layer": scores[vname][1], "examples_per_s": speed, "over_torch_full": speed / base}
                    | {"spread_pct": 100 * (max(seconds) - min(seconds)) / statistics.median(seconds)}
                    | {"exits_equal_torch": agreement.get(vname)}
                )
            print(f"{name} {threads} threads {mode}: done", file=sys.stderr)
    return rows


def render(report: dict) -> str:
    p = report["provenance"]
    setup = f"torch {p['versions']['torch']}, onnxruntime {report['onnxruntime']}; median of {report['repeats']} "
    setup += "interleaved rounds after a warm-up. Metric on the whole dev set; speed on the first "
    setup += f"{report['timed_examples']} examples (length-sorted batches of 32) and the first "
    setup += f"{report['bs1_examples']} (one at a time). Exits = torch: the share of dev examples whose exit layer "
    setup += "equals torch fp32's at the same setting."
    lines = common.heading("Early exit on ONNX Runtime: torch vs ONNX Runtime fp32 / int8", p, setup)
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
        head = ["Variant", rows[0]["metric"], "Avg. exit layer", "Exits = torch", "ex/s", "× torch fp32 full"]
        lines += common.table([*head, "Spread"], [_cells(r) for r in rows])
        diff = rows[0]["layer_logits_max_diff"]
        lines += ["", f"Every layer's logits, torch fp32 vs ONNX Runtime fp32: max diff {diff:.1e}", ""]
    return "\n".join(lines) + "\n"


def _cells(r: dict) -> list:
    layer = "—" if r["avg_exit_layer"] is None else f"{r['avg_exit_layer']:.2f}"
    same = "—" if r["exits_equal_torch"] is None else f"{100 * r['exits_equal_torch']:.1f}%"
    speed = [f"{r['examples_per_s']:.1f}", f"{r['over_torch_full']:.2f}", f"{r['spread_pct']:.0f}%"]
    return [r["variant"], f"{100 * r['value']:.1f}", layer, same, *speed]


def measure(args) -> dict:
    from importlib.metadata import version

    rows = []
    for name, folder in common.task_models(args).items():
        with tempfile.TemporaryDirectory() as tmp:
            export(folder, Path(tmp))
            rows += measure_task(args, name, folder, Path(tmp))
    path, runs = Path(args.output).with_suffix(".json"), [None]
    if args.keep_other_threads and path.is_file():
        earlier = json.loads(path.read_text())
        kept = [r for r in earlier["rows"] if r["threads"] not in args.threads]
        rows = sorted(kept + rows, key=lambda r: (r["task"] != "MRPC", -r["threads"]))
        runs = [*earlier.get("runs", [earlier["provenance"]]), None]
    report = common.report(
        **{k: getattr(args, k) for k in ("repeats", "timed_examples", "bs1_examples")},
        onnxruntime=version("onnxruntime"),
        rows=rows,
        provenance={"model": common.task_models(args)},
    )
    report["runs"] = [r or report["provenance"] for r in runs]  # one provenance per process that made rows
    return report


def main() -> None:
    parser = common.parser(__doc__, "backends", threads=None)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--timed_examples", type=int, default=256)
    parser.add_argument("--bs1_examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--keep_other_threads",
        action="store_true",
        help="Keep the rows of other thread counts already in --output.json (ONNX Runtime's shared thread pool is "
        "sized once per process, so each thread count runs in a process of its own).",
    )
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
