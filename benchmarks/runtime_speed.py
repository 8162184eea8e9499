"""Early exit at the runtime's own speed: pabee on ONNX Runtime against the whole graph a user optimizes without it.

A CPU user without pabee exports the model as one graph, runs onnxruntime's transformer optimizer on it and
quantizes it to int8 (`pabee.onnx_export.export_full_model`). pabee's export is that same graph with its layer
boundaries named, cut into segments. Per task, every variant runs in short passes, interleaved, and each round gives
its own ratios (the baseline's seconds over the variant's; median over rounds): torch fp32 full; the plain and the
optimized int8 whole graph, the optimized fp32 whole graph; pabee fp32 and int8 at patience 0; pabee int8 at the
fastest patience and confidence threshold within one point of its full model, chosen on one random half of the dev
set (`pabee.calibrate.choose_setting`) and measured, quality and speed, on the other half.

Targets: pabee at patience 0 >= 0.97x the optimized whole graph of its precision; early exit >= 0.9 x (layers / mean
exit layer of the timed examples) over the optimized int8 whole graph; >= 4x (batch 32) and >= 5.5x (batch 1) torch
fp32 full.

    python benchmarks/runtime_speed.py --model MRPC=runs/mrpc --model SST-2=runs/sst2 --threads 2
"""

import sys
import tempfile
from pathlib import Path

import common
import torch
from backends import CONFIDENCES, FULL, DevSet, WholeGraph, engine

from pabee import infer, load_runtime
from pabee.bench import make_batches
from pabee.calibrate import choose_setting, split_halves
from pabee.exits import ExitSpec

BASE = "ORT int8 whole graph, optimized"
TORCH = "torch fp32 full"
TARGETS = {("batch 32", TORCH): 4.0, ("batch 1", TORCH): 5.5}  # patience 0: 0.97; early exit: 0.9 of the ideal


def export(folder: str, work: Path) -> None:
    """pabee's export and the whole graphs, plain and optimized, in `work`."""
    from pabee.onnx_export import export_full_model, export_onnx

    for precision, quantize in (("fp32", None), ("int8", "int8")):
        export_onnx(folder, work / precision, quantize=quantize)
        export_full_model(folder, work / f"whole_{precision}_optimized.onnx", quantize)
    export_full_model(folder, work / "whole_int8_plain.onnx", "int8", optimize=False)


def choose(model, dev: DevSet) -> tuple[dict[str, dict], dict[str, list]]:
    """The fastest patience and confidence threshold within one point of the full model on the choosing half (the
    deployed int8 runtime's own logits, one pass), with their held-out numbers; the halves' dev indices."""
    with torch.inference_mode():
        all_logits = dev.in_dev_order(
            torch.cat([infer(model, b, FULL, all_layers=True).all_logits for b in dev.batches])
        )
    candidates = {
        "patience": [ExitSpec("patience", patience=p) for p in range(1, model.num_layers - 1)],
        "confidence": [ExitSpec("confidence", threshold=t) for t in CONFIDENCES],
    }
    chosen = {}
    for name, specs in candidates.items():
        result = choose_setting(model, all_logits.numpy(), dev.labels, dev.task, specs, max_drop=1.0)
        full = result["rows"][0]
        row = next(r for r in result["rows"] if r["chosen"])
        chosen[name] = {"spec": row.pop("spec"), "full": {k: full[k] for k in ("choose", "report")}, **row}
    return chosen, {k: v.tolist() for k, v in split_halves(len(dev.labels)).items()}


def timing_data(dev: DevSet, report: list[int], single_examples: int) -> dict[str, list[dict]]:
    """The reporting half in length-sorted batches of 32, and its first `single_examples` one at a time."""
    features = [dev.features[i] for i in report]
    return {
        "batch 32": make_batches(features, 32, dev.pad, True),
        "batch 1": make_batches(features[:single_examples], 1, dev.pad, False),
    }


def variants_for(folder: str, work: Path, threads: int, chosen: dict[str, dict]) -> dict:
    """name → forward(batch) → (logits, exit layers or None)."""
    out = {TORCH: engine(load_runtime(folder), FULL)}
    for precision in ("fp32", "int8"):
        out[f"ORT {precision} whole graph, optimized"] = WholeGraph(
            work / f"whole_{precision}_optimized.onnx", threads
        )
    out["ORT int8 whole graph, plain"] = WholeGraph(work / "whole_int8_plain.onnx", threads)
    for precision in ("fp32", "int8"):
        model = load_runtime(work / precision, threads=threads)
        out[f"pabee ORT {precision} patience 0"] = engine(model, FULL)
    out |= {f"pabee ORT int8 {n} {c['spec'].label}": engine(model, c["spec"]) for n, c in chosen.items()}
    return out


def mean_exit_layer(forward, data: list[dict]) -> float:
    with torch.inference_mode():
        exits = torch.cat([forward(batch)[1] for batch in data])
    return float(exits.float().mean())


def pairs(variants: dict) -> list[tuple[str, str, float]]:
    """(variant, baseline, target); early-exit targets are fractions of the ideal speed-up, set per mode later."""
    out = [("ORT int8 whole graph, plain", BASE, 1.0)]
    out += [(f"pabee ORT {p} patience 0", f"ORT {p} whole graph, optimized", 0.97) for p in ("fp32", "int8")]
    early = [name for name in variants if name.startswith("pabee ORT int8") and not name.endswith("patience 0")]
    return out + [(name, base, 0.9) for name in early for base in (BASE, TORCH)]


def measure_task(name: str, folder: str, args) -> dict:
    from transformers import AutoTokenizer

    dev = DevSet(name, args.glue_dir, AutoTokenizer.from_pretrained(folder))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export(folder, work)
        model = load_runtime(work / "int8")
        chosen, halves = choose(model, dev)
        variants = variants_for(folder, work, args.threads, chosen)
        for mode, data in timing_data(dev, halves["report"], args.single_examples).items():
            layers = {v: mean_exit_layer(variants[v], data) for v in variants if v.startswith("pabee")}
            seconds = common.time_passes(variants, data, args.rounds)
            for variant, base, target in pairs(variants):
                early = variant.startswith("pabee") and not variant.endswith("patience 0")
                ideal = model.num_layers / layers[variant] if early else None  # layers / mean exit layer
                if base == TORCH:
                    target = TARGETS[(mode, TORCH)]
                elif target == 0.9:
                    target = 0.9 * ideal
                ratios = common.ratios(seconds, base, variant)
                row = {"mode": mode, "variant": variant, "over": base, **common.quartiles(ratios), "target": target}
                rows.append(row | {"ideal": ideal, "mean_exit_layer": layers.get(variant), "ratios": ratios})
            print(f"{name} {mode}: done", file=sys.stderr, flush=True)
    settings = {n: {k: v for k, v in c.items() if k != "spec"} for n, c in chosen.items()}
    return {"task": name, "metric": "mean of " + ", ".join(dev.task.metrics), "settings": settings, "rows": rows}


def render(report: dict) -> str:
    p = report["provenance"]
    setup = (
        f"onnxruntime {report['onnxruntime']}, torch {p['versions'].get('torch')}; {report['threads']} thread(s); "
        f"{report['rounds']} interleaved rounds (the dev set's reporting half in length-sorted batches of 32, or "
        f"its first {report['single_examples']} examples one at a time); a ratio is the baseline's seconds over the "
        "variant's in the same round. Ideal: layers / the variant's mean exit layer on the timed examples."
    )
    lines = common.heading("Early exit on ONNX Runtime vs the optimized whole graph, paired per round", p, setup)
    for task in report["tasks"]:
        lines += [f"## {task['task']}", "", *_settings(task), ""]
        head = ["Mode", "Variant", "Over", "Speed-up (median)", "Quartiles", "Ideal", "Target", ""]
        lines += common.table(head, [_cells(r) for r in task["rows"]]) + [""]
    return "\n".join(lines)


def _settings(task: dict) -> list[str]:
    out = [f"Settings chosen on one dev half (score: {task['metric']}, points), held-out half in brackets:", ""]
    for name, s in task["settings"].items():
        chosen, full = s, s["full"]
        out.append(
            f"- {name} {s['setting']}: {chosen['choose']['score']:.1f} ({chosen['report']['score']:.1f}) vs the full "
            f"model's {full['choose']['score']:.1f} ({full['report']['score']:.1f}); "
            f"{chosen['report']['avg_exit_layer']:.2f} layers on average held out"
        )
    return out


def _cells(r: dict) -> list:
    verdict = "met" if r["median"] >= r["target"] else f"missed by {100 * (1 - r['median'] / r['target']):.0f}%"
    ideal = "—" if r["ideal"] is None else f"{r['ideal']:.2f}x"
    variant = r["variant"].removeprefix("pabee ORT ")
    return [
        r["mode"],
        variant,
        r["over"],
        f"{r['median']:.2f}x",
        f"{r['q1']:.2f}–{r['q3']:.2f}",
        ideal,
        f"{r['target']:.2f}x",
        verdict,
    ]


def measure(args) -> dict:
    from importlib.metadata import version

    torch.set_num_threads(args.threads)
    models = common.task_models(args)
    return common.report(
        tasks=[measure_task(name, folder, args) for name, folder in models.items()],
        onnxruntime=version("onnxruntime"),
        **{k: getattr(args, k) for k in ("threads", "single_examples", "rounds")},
        provenance={"model": models},
    )


def main() -> None:
    parser = common.parser(__doc__, "runtime_speed", rounds=12)
    parser.add_argument("--single_examples", type=int, default=48)
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
