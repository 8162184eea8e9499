"""Is OpenVINO worth a second runtime here? Its CPU plugin vs ONNX Runtime on the same whole-model ONNX graphs.

Issue 13 adds OpenVINO only if it beats ONNX Runtime on this CPU. This compares the two on the graphs
`benchmarks/backends.py` times as "ORT whole graph" (the full fine-tuned model in one graph, fp32 and ONNX
Runtime's dynamic int8), in ONE process with the variants interleaved in a shuffled order every round (median of
`--repeats` after a warm-up): length-sorted batches of 32 and one example at a time, `--threads` threads each.
OpenVINO runs with the LATENCY hint and f32 inference precision (no silent bf16); its predictions on the whole dev
set are compared with ONNX Runtime's on the same graph.

    pip install openvino nncf      # not pabee dependencies: OpenVINO is measured here, not adopted
    python benchmarks/openvino_check.py --model MRPC=runs/mrpc --model SST-2=runs/sst2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from backends import WholeGraph, dev_set, in_dev_order, length_order, time_modes  # noqa: E402

from pabee.bench import make_batches  # noqa: E402
from pabee.metrics import compute_metrics  # noqa: E402
from pabee.onnx_export import export_full_model  # noqa: E402
from pabee.provenance import provenance, write_atomic, write_json  # noqa: E402


class OpenVinoGraph:
    """OpenVINO's CPU plugin on a whole-model ONNX graph (dynamic batch and sequence axes)."""

    def __init__(self, path: Path, threads: int, compress_weights: bool = False) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        if compress_weights:  # OpenVINO's own data-free int8: NNCF's weight compression of the fp32 graph
            import nncf

            model = nncf.compress_weights(model)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]

    def __call__(self, **batch):
        feed = {name: np.ascontiguousarray(batch[name].numpy(), dtype=np.int64) for name in self.inputs}
        logits = self.request.infer(feed)[self.compiled.output(0)]
        return torch.from_numpy(np.array(logits)), None


def measure(args, name: str, folder: Path, work: Path) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    task, features, labels = dev_set(name, Path(args.glue_dir), tokenizer)
    pad = tokenizer.pad_token_id or 0
    order = length_order(features)
    variants = {}
    for precision in ("fp32", "int8"):
        graph = work / f"whole_{precision}.onnx"
        export_full_model(folder, graph, None if precision == "fp32" else "int8")
        variants[f"ORT {precision}"] = WholeGraph(graph, args.threads)
        variants[f"OpenVINO on the ORT {precision} graph"] = OpenVinoGraph(graph, args.threads)
    variants["OpenVINO int8 weights (NNCF)"] = OpenVinoGraph(work / "whole_fp32.onnx", args.threads, True)
    quality = {}
    for vname, forward in variants.items():
        with torch.inference_mode():
            logits = torch.cat([forward(**b)[0] for b in make_batches(features, 32, pad, True)])
        predictions = in_dev_order(logits, order).argmax(-1).numpy()
        quality[vname] = (compute_metrics(task.metrics, predictions, labels)[task.main_metric], predictions)
    rows = []
    for mode, timings, count in time_modes(variants, features, pad, args):
        for vname in variants:
            seconds, reference = timings[vname], "ORT fp32" if "fp32" in vname else "ORT int8"
            same = quality[vname][1] == quality[reference][1]
            rows.append(
                {
                    "task": name,
                    "mode": mode,
                    "variant": vname,
                    "metric": task.main_metric,
                    "value": 100 * quality[vname][0],
                    "compared_with": reference,
                    "predictions_equal_ort": float(same.mean()),
                    "examples_per_s": count / statistics.median(seconds),
                    "over_ort": statistics.median(timings[reference]) / statistics.median(seconds),
                    "spread_pct": 100 * (max(seconds) - min(seconds)) / statistics.median(seconds),
                }
            )
        print(f"{name} {mode}: done", file=sys.stderr)
    return rows


def render(report: dict) -> str:
    p = report["provenance"]
    lines = [
        "# OpenVINO vs ONNX Runtime: the whole fine-tuned model in one graph",
        "",
        f"`{p['command']}`  ",
        f"{p['date']}; {p['hardware']['cpu']} ({', '.join(p['hardware']['cpu_flags'])}); "
        f"openvino {report['openvino']}, onnxruntime {report['onnxruntime']}; {report['threads']} threads; "
        f"median of {report['repeats']} interleaved rounds after a warm-up. Metric on the whole dev set; "
        f"speed on the first {report['timed_examples']} examples (length-sorted batches of 32) "
        f"and the first {report['bs1_examples']} (one at a time). "
        "ORT int8 is ONNX Runtime's dynamic quantization of the graph (OpenVINO also runs that graph); "
        "OpenVINO's own data-free int8 is NNCF's weight compression of the fp32 graph.",
    ]
    for task in dict.fromkeys(r["task"] for r in report["rows"]):
        for mode in ("batch 32", "batch 1"):
            lines += [
                f"\n## {task}, {mode}\n",
                "| Runtime | Metric | Compared with | Same predictions | ex/s | × that | Spread |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in (r for r in report["rows"] if r["task"] == task and r["mode"] == mode):
                lines.append(
                    f"| {r['variant']} | {r['metric']} {r['value']:.1f} | {r['compared_with']} "
                    f"| {100 * r['predictions_equal_ort']:.1f}% "
                    f"| {r['examples_per_s']:.1f} | {r['over_ort']:.2f} | {r['spread_pct']:.0f}% |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="TASK=FOLDER, e.g. MRPC=runs/mrpc")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timed_examples", type=int, default=256)
    parser.add_argument("--bs1_examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "openvino_check"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.model:
        name, _, folder = item.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure(args, name, Path(folder), Path(tmp))
    from importlib.metadata import version

    report = {
        "provenance": provenance(model={m.partition("=")[0]: m.partition("=")[2] for m in args.model}),
        "openvino": version("openvino"),
        "onnxruntime": version("onnxruntime"),
        "threads": args.threads,
        "repeats": args.repeats,
        "timed_examples": args.timed_examples,
        "bs1_examples": args.bs1_examples,
        "rows": rows,
    }
    out = Path(args.output)
    write_json(out.with_suffix(".json"), report)
    write_atomic(out.with_suffix(".md"), render(report) + "\n")
    print(render(report))


if __name__ == "__main__":
    main()
