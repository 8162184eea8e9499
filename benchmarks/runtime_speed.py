"""Early exit at the runtime's own speed: pabee on ONNX Runtime against the whole graph a user optimizes without it.

A CPU user without pabee exports the model as one graph, runs onnxruntime's transformer optimizer on it and
quantizes it to int8 (`pabee.onnx_export.export_full_model`). pabee's export is that same graph with its layer
boundaries named, cut into segments. Every graph meant to be optimized must come out fused (`require_optimized`):
an optimizer that fails stops the benchmark rather than measure against a weaker baseline (or a handicapped pabee),
and the JSON records what it fused in each graph. Per task, every variant runs in short passes, interleaved, and
each round gives its own ratios (the baseline's seconds over the variant's; median over rounds): torch fp32 full;
the plain and the optimized int8 whole graph, the optimized fp32 whole graph; pabee fp32 and int8 at patience 0;
pabee int8 at the fastest patience and confidence threshold within one point of its full model, chosen on one
random half of the dev set (`pabee.calibrate.choose_setting`) and measured, quality and speed, on the other half.
At batch 1 every early-exit setting also runs in one call of the exit graph, and on int8 one layer a call (its
call plan off), so both choices the runtime makes for one sentence are measured against the other.

Quality, on the reporting half: each variant's score, mean exit layer and, for pabee, the share of examples whose
exit layer equals torch fp32's at the same setting; and the largest difference of any layer's logits between
ONNX Runtime fp32 and torch.

A speed-up is how many times faster a variant runs than the graph it is compared with; a target is the least
speed-up asked. Targets: pabee at patience 0 >= 0.97x the optimized whole graph of its precision; early exit >= 0.9 x
(layers / mean exit layer of the timed examples) over the optimized int8 whole graph; >= 4x (batch 32) and >= 5.5x
(batch 1) torch fp32 full; and, as a check that the baseline is the strongest whole graph, the optimized int8 whole
graph >= 1.00x the plain one. The Markdown counts per target how many rows meet it.

    python benchmarks/runtime_speed.py --model MRPC=runs/mrpc --model SST-2=runs/sst2 --threads 2
"""

import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import common
import numpy as np
import torch
from transformers import AutoTokenizer

from pabee import ExitSpec, infer, load_runtime, onnx_model
from pabee.bench import make_batches
from pabee.calibrate import choose_setting, split_halves
from pabee.folders import read_manifest
from pabee.glue import get_task
from pabee.metrics import compute_metrics, task_score

CONFIDENCES = (0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
FULL = ExitSpec("patience", patience=0)
NOTHING = ExitSpec("entropy", threshold=0.0)  # every head and test runs, nobody leaves: entropy is never below 0
ONE_CALL = ", one graph"  # one sentence in one call of the exit graph (`OnnxPabeeModel.one_call`), not the loop
PER_LAYER = ", one layer a call"  # one sentence climbs without its call plan (`OnnxPabeeModel.plan_calls`)
BASE = "ORT int8 whole graph, optimized"
PLAIN = "ORT int8 whole graph, plain"
TORCH = "torch fp32 full"
TARGETS = {("batch 32", TORCH): 4.0, ("batch 1", TORCH): 5.5}  # patience 0: 0.97; early exit: 0.9 of the ideal


class DevSet:
    """A task's dev set, tokenized: features (unpadded), labels, and batches of 32 in length order."""

    def __init__(self, task_name: str, glue_dir: str, tokenizer) -> None:
        self.task = get_task(task_name)
        examples, self.labels = common.glue_split(task_name, glue_dir)
        self.features = common.features(tokenizer, examples)
        self.pad = tokenizer.pad_token_id or 0
        self.order = sorted(range(len(examples)), key=lambda i: len(self.features[i]["input_ids"]))  # as batched
        self.batches = make_batches(self.features, 32, self.pad, True)

    def in_dev_order(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """Rows of a pass over the length-sorted batches put back in the dev file's order, the labels' order."""
        rows = torch.empty_like(sorted_rows)
        rows[torch.tensor(self.order)] = sorted_rows
        return rows

    def score(self, logits: torch.Tensor, rows: list[int]) -> float:
        """The task's score in points (the mean of its metrics) of dev-order logits on `rows`."""
        metrics = compute_metrics(self.task.metrics, logits[rows].argmax(-1).numpy(), self.labels[rows])
        return task_score(metrics, self.task.metrics)


class WholeGraph:
    """ONNX Runtime with the full model in one graph; a forward returns (logits, None: no exit layers)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = onnx_model.session_options(threads)  # the process-wide pool when the pabee sessions made one
        if options.use_per_session_threads:
            options = ort.SessionOptions()  # ONNX Runtime's own defaults, as a user would run one graph
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict) -> tuple[torch.Tensor, None]:
        feed = {name: np.ascontiguousarray(batch[name].numpy(), dtype=np.int64) for name in self.inputs}
        return torch.from_numpy(self.session.run(None, feed)[0]), None


def engine(model, spec: ExitSpec):
    """A forward of any runtime at one exit setting: batch → (logits, exit layers)."""

    def run(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = infer(model, batch, spec)
        return out.logits.float(), out.exit_layers

    return run


def export(folder: str, work: Path) -> dict[str, dict]:
    """pabee's exports and the whole graphs, plain and optimized, in `work`; what onnxruntime's transformer optimizer
    did to each graph, by variant name. A graph meant to be optimized that it did not fuse raises (`PabeeError`)."""
    from pabee.onnx_export import export_full_model, export_onnx

    graphs = {}
    for precision, quantize in (("fp32", None), ("int8", "int8")):
        export_onnx(folder, work / precision, quantize=quantize, require_optimized=True)
        graphs[f"pabee ORT {precision}"] = read_manifest(work / precision)["optimization"]
        whole = export_full_model(folder, work / f"whole_{precision}_optimized.onnx", quantize, require_optimized=True)
        graphs[f"ORT {precision} whole graph, optimized"] = whole.optimization
    graphs[PLAIN] = export_full_model(folder, work / "whole_int8_plain.onnx", "int8", optimize=False).optimization
    return graphs


def choose(model, dev: DevSet) -> tuple[dict[str, dict], dict[str, list]]:
    """The fastest patience and confidence threshold within one point of the full model on the choosing half (the
    deployed int8 runtime's own logits, one pass), with their held-out numbers; the halves' dev indices."""
    with torch.inference_mode():
        all_logits = dev.in_dev_order(
            torch.cat([infer(model, b, FULL, all_layers=True).all_logits for b in dev.batches])
        )
    candidates = {"patience": [ExitSpec("patience", patience=p) for p in range(1, model.num_layers - 1)],
                  "confidence": [ExitSpec("confidence", threshold=t) for t in CONFIDENCES]}  # fmt: skip
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
    return {"batch 32": make_batches(features, 32, dev.pad, True),
            "batch 1": make_batches(features[:single_examples], 1, dev.pad, False)}  # fmt: skip


def variants_for(folder: str, work: Path, threads: int, chosen: dict[str, dict], mode: str) -> dict:
    """name → forward(batch) → (logits, exit layers or None). At batch 1 each early-exit setting also runs in one
    call of the exit graph beside the engine's loop (one call per layer), so the faster path is measured."""
    out = {TORCH: engine(load_runtime(folder), FULL)}
    for p in ("fp32", "int8"):
        out[f"ORT {p} whole graph, optimized"] = WholeGraph(work / f"whole_{p}_optimized.onnx", threads)
    out[PLAIN] = WholeGraph(work / "whole_int8_plain.onnx", threads)
    settings = {"patience 0": FULL, "nothing exits": NOTHING, **{_setting(c): c["spec"] for c in chosen.values()}}
    for precision in ("fp32", "int8"):
        model = load_runtime(work / precision, threads=threads)
        out |= {f"pabee ORT {precision} {name}": engine(model, spec) for name, spec in settings.items()}
        if mode == "batch 1":
            graph = load_runtime(work / precision, threads=threads)
            graph.one_call = True
            early = {name: spec for name, spec in settings.items() if name != "patience 0"}
            out |= {f"pabee ORT {precision} {name}{ONE_CALL}": engine(graph, spec) for name, spec in early.items()}
            if precision == "int8":
                per_layer = load_runtime(work / precision, threads=threads)
                per_layer.plan_calls = False
                out |= {f"pabee ORT int8 {name}{PER_LAYER}": engine(per_layer, spec) for name, spec in early.items()}
    return out


def _setting(chosen: dict) -> str:
    return f"{chosen['criterion']} {chosen['setting']}"


def mean_exit_layer(forward, data: list[dict]) -> float:
    with torch.inference_mode():
        exits = torch.cat([forward(batch)[1] for batch in data])
    return float(exits.float().mean())


def pairs(variants: dict) -> list[tuple[str, str, float]]:
    """(variant, baseline, target); early-exit targets are fractions of the ideal speed-up, set per mode later. The
    optimized int8 whole graph over the plain one checks that the baseline is the stronger of the two; a setting
    under which nothing exits may cost at most 5% over the whole graph of its precision."""
    out = [(BASE, PLAIN, 1.0)]
    for precision in ("fp32", "int8"):
        whole = f"ORT {precision} whole graph, optimized"
        out += [(f"pabee ORT {precision} patience 0", whole, 0.97)]
        mine = [name for name in variants if name.startswith(f"pabee ORT {precision}")]
        out += [(name, whole, 0.95) for name in mine if "nothing exits" in name]
        early = [name for name in mine if not name.endswith("patience 0") and "nothing exits" not in name]
        out += [(name, whole, 0.9) for name in early]
        plain = [name for name in early if not name.endswith((ONE_CALL, PER_LAYER))]
        out += [(name, TORCH, 0.9) for name in plain if precision == "int8"]
    return out


def dev_pass(forward, dev: DevSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits and exit layers (None for a whole graph) over the whole dev set, in dev order."""
    with torch.inference_mode():
        outs = [forward(batch) for batch in dev.batches]
    exits = None if outs[0][1] is None else dev.in_dev_order(torch.cat([o[1] for o in outs]))
    return dev.in_dev_order(torch.cat([o[0] for o in outs])), exits


def quality(folder: str, work: Path, dev: DevSet, chosen: dict[str, dict], rows: list[int]) -> dict:
    """On the reporting half: every variant's score and mean exit layer, and for pabee the share of exit layers
    equal to torch fp32's at the same setting; every layer's largest logit difference, ORT fp32 vs torch."""
    runtimes = {
        "torch fp32": load_runtime(folder),
        **{f"pabee ORT {p}": load_runtime(work / p) for p in ("fp32", "int8")},
    }
    settings = {"patience 0": FULL, **{f"{n} {c['spec'].label}": c["spec"] for n, c in chosen.items()}}
    variants, exits_of = [], {}
    for runtime_name, runtime in runtimes.items():
        for setting, spec in settings.items():
            logits, exits = dev_pass(engine(runtime, spec), dev)
            exits_of[runtime_name, setting] = exits = exits[rows]
            torch_exits = exits_of["torch fp32", setting]
            same = None if runtime_name == "torch fp32" else float((exits == torch_exits).float().mean())
            variants.append({"variant": f"{runtime_name} {setting}", "score": dev.score(logits, rows)})
            variants[-1] |= {"mean_exit_layer": float(exits.float().mean()), "exits_equal_torch": same}
    singles = make_batches(dev.features, 1, dev.pad, False)  # dev order: one call of the exit graph each
    for precision in ("fp32", "int8"):
        runtime = runtimes[f"pabee ORT {precision}"]
        for setting, spec in list(settings.items())[1:]:
            with torch.inference_mode():
                exits = torch.cat([infer(runtime, b, spec).exit_layers for b in singles])[rows]
            same = float((exits == exits_of["torch fp32", setting]).float().mean())
            variants.append({"variant": f"pabee ORT {precision} {setting}, one sentence a call", "score": None})
            variants[-1] |= {"mean_exit_layer": float(exits.float().mean()), "exits_equal_torch": same}
    for graph in ("fp32_optimized", "int8_optimized", "int8_plain"):
        logits, _ = dev_pass(WholeGraph(work / f"whole_{graph}.onnx", 2), dev)
        variants.append({"variant": f"ORT whole graph, {graph.replace('_', ' ')}", "score": dev.score(logits, rows)})
    with torch.inference_mode():
        layers = [[infer(m, b, FULL, all_layers=True).all_logits for b in dev.batches] for m in runtimes.values()]
    difference = max(float((o - t).abs().max()) for t, o in zip(layers[0], layers[1], strict=True))
    return {"variants": variants, "layer_logits_max_diff_fp32": difference}


def measure_task(name: str, folder: str, args) -> dict:
    dev = DevSet(name, args.glue_dir, AutoTokenizer.from_pretrained(folder))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        graphs = export(folder, work)
        model = load_runtime(work / "int8")
        chosen, halves = choose(model, dev)
        breakdown = {}
        for mode, data in timing_data(dev, halves["report"], args.single_examples).items():
            variants = variants_for(folder, work, args.threads, chosen, mode)
            layers = {v: mean_exit_layer(variants[v], data) for v in variants if v.startswith("pabee")}
            if mode == "batch 1":
                breakdown = per_sentence(work, args.threads, chosen, data)
            seconds = common.time_passes(variants, data, args.rounds)
            for variant, base, target in pairs(variants):
                early = variant.startswith("pabee") and not variant.endswith("patience 0") and "nothing" not in variant
                ideal = model.num_layers / layers[variant] if early else None  # layers / mean exit layer
                if base == TORCH:
                    target = TARGETS[(mode, TORCH)]
                elif target == 0.9:
                    target = 0.9 * ideal
                ratios = common.ratios(seconds, base, variant)
                row = {"mode": mode, "variant": variant, "over": base, **common.quartiles(ratios), "target": target}
                rows.append(row | {"ideal": ideal, "mean_exit_layer": layers.get(variant), "ratios": ratios})
            print(f"{name} {mode}: done", file=sys.stderr, flush=True)
        checks = quality(folder, work, dev, chosen, halves["report"])
    settings = {n: {k: v for k, v in c.items() if k != "spec"} for n, c in chosen.items()}
    return {"task": name, "metric": "mean of " + ", ".join(dev.task.metrics), "settings": settings, "graphs": graphs,
            "rows": rows, "quality": checks, "per_sentence": breakdown}  # fmt: skip


def per_sentence(work: Path, threads: int, chosen: dict[str, dict], data: list[dict]) -> dict:
    """Where one sentence's time goes at batch size 1 (int8), in microseconds per sentence, best of 5 passes: the
    whole `infer` call, the part inside ONNX Runtime's `run`, and the calls it made, for each early-exit setting
    in the engine's loop (with its call plan, and one layer a call) and in the one-call exit graph."""
    settings = {"nothing exits": NOTHING, **{_setting(c): c["spec"] for c in chosen.values()}}
    inside = [0.0, 0]
    run = onnx_model._Session.run

    def timed(self, feed):
        start = time.perf_counter()
        try:
            return run(self, feed)
        finally:
            inside[0] += time.perf_counter() - start
            inside[1] += 1

    out = {}
    onnx_model._Session.run = timed
    try:
        for suffix in ("", PER_LAYER, ONE_CALL):
            runtime = load_runtime(work / "int8", threads=threads)
            runtime.one_call, runtime.plan_calls = suffix == ONE_CALL, suffix != PER_LAYER
            for setting, spec in settings.items():
                _sentence_pass(runtime, spec, data, inside)  # the call plan learns where sentences leave
                total, ort, calls = (
                    x / len(data) for x in min(_sentence_pass(runtime, spec, data, inside) for _ in range(5))
                )
                out[setting + suffix] = {"total_us": total, "ort_us": ort, "calls": calls}
    finally:
        onnx_model._Session.run = run
    return out


def _sentence_pass(runtime, spec: ExitSpec, data: list[dict], inside: list) -> tuple[float, float, int]:
    """One pass over `data`: microseconds in all, microseconds inside ONNX Runtime, and its calls."""
    inside[:] = [0.0, 0]
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in data:
            infer(runtime, batch, spec)
    return 1e6 * (time.perf_counter() - start), 1e6 * inside[0], inside[1]


def render(report: dict) -> str:
    p = report["provenance"]
    setup = (
        f"onnxruntime {report['onnxruntime']}, torch {p['versions'].get('torch')}; {report['threads']} thread(s); "
        f"{report['rounds']} interleaved rounds (the dev set's reporting half in length-sorted batches of 32, or "
        f"its first {report['single_examples']} examples one at a time); a ratio is the baseline's seconds over the "
        "variant's in the same round, so a speed-up above 1.00x means the variant ran faster than the graph in "
        "Over. Ideal: layers / the variant's mean exit layer on the timed examples. Target: the least speed-up "
        "asked (patience 0: 0.97x; early exit: 0.9 x ideal over the optimized int8 whole graph, 4x at batch 32 and "
        "5.5x at batch 1 over torch; the optimized int8 whole graph over the plain one: 1.00x, i.e. the baseline is "
        "at least as fast as the graph left plain)."
    )
    lines = common.heading("Early exit on ONNX Runtime vs the optimized whole graph, paired per round", p, setup)
    for task in report["tasks"]:
        lines += [f"## {task['task']}", "", *_settings(task), "", *_graphs(task), ""]
        head = ["Mode", "Variant", "Over", "Speed-up (median)", "Quartiles", "Ideal", "Target", ""]
        rows = [_oriented(r) for r in task["rows"]]
        lines += common.table(head, [_cells(r) for r in rows]) + [""] + _quality(task["quality"])
        lines += _per_sentence(task.get("per_sentence"))
    return "\n".join([*lines, *_targets(report["tasks"])])


def _per_sentence(breakdown: dict | None) -> list[str]:
    """Where a sentence's time goes at batch size 1, int8: in ONNX Runtime's calls and outside them."""
    if not breakdown:
        return []
    rows = [
        [name, f"{b['total_us']:.0f}", f"{b['ort_us']:.0f}", f"{b['total_us'] - b['ort_us']:.0f}", f"{b['calls']:.2f}"]
        for name, b in breakdown.items()
    ]
    head = ["Batch 1, int8 (first examples of the reporting half)", "µs a sentence", "in ORT runs", "outside", "calls"]
    return ["Per sentence, best of 5 passes:", "", *common.table(head, rows), ""]


def _oriented(row: dict) -> dict:
    """A row as the benchmark writes it now. Results from before the optimizer check was turned round hold the plain
    whole graph over the optimized one; each round's ratio is inverted so the row reads optimized over plain."""
    if row["variant"] != PLAIN:
        return row
    ratios = [1 / r for r in row["ratios"]]
    return row | {"variant": row["over"], "over": PLAIN, **common.quartiles(ratios), "ratios": ratios}


def _graphs(task: dict) -> list[str]:
    """What onnxruntime's transformer optimizer fused in each graph, or that this result did not record it."""
    graphs = task.get("graphs")
    if graphs is None:
        return ["Fused by onnxruntime's transformer optimizer: not recorded (this result predates the record)."]
    out = ["Fused by onnxruntime's transformer optimizer (counted before int8 quantization):", ""]
    for name, optimization in graphs.items():
        if optimization["applied"]:
            fused = ", ".join(f"{count} {op}" for op, count in optimization["fused"].items()) or "no operator"
            out.append(f"- {name}: {fused}")
        else:
            out.append(f"- {name}: left plain ({optimization['reason']})")
    return out


TARGET_NAMES = {  # in the order the summary lists them
    "patience 0": "pabee at patience 0 ≥ 0.97x the optimized whole graph of its precision",
    "ideal": "Early exit ≥ 0.9 x ideal over the optimized whole graph of its precision (the realised share)",
    "nothing exits": "A setting under which nothing exits ≥ 0.95x the optimized whole graph of its precision",
    "batch 32": "Early exit ≥ 4x torch fp32 full at batch 32",
    "batch 1": "Early exit ≥ 5.5x torch fp32 full at batch 1",
    "optimizer": "The optimized int8 whole graph ≥ 1.00x the plain one (the baseline is the faster whole graph)",
}


def _target_of(row: dict) -> str:
    """Which of `TARGET_NAMES` a (turned round) row is measured against."""
    if row["over"] == PLAIN:
        return "optimizer"
    if row["variant"].endswith("patience 0"):
        return "patience 0"
    if "nothing exits" in row["variant"]:
        return "nothing exits"
    return row["mode"] if row["over"] == TORCH else "ideal"


def _targets(tasks: list[dict]) -> list[str]:
    """Per target over every task: how many rows meet it, which do and which miss (and by how much)."""
    rows: dict[str, list[tuple[str, dict]]] = {key: [] for key in TARGET_NAMES}
    for task in tasks:
        for row in map(_oriented, task["rows"]):
            rows[_target_of(row)].append((task["task"], row))
    out = ["## Targets, counted over every task and mode", ""]
    for key, name in TARGET_NAMES.items():
        met = [_described(task, r, key) for task, r in rows[key] if r["median"] >= r["target"]]
        short = [(task, r) for task, r in rows[key] if r["median"] < r["target"]]
        missed = [_described(task, r, key, f", short by {_shortfall(r)}") for task, r in short]
        parts = [f"**met in {len(met)} of {len(rows[key])}**"]
        parts += [f"Missed: {'; '.join(missed)}"] if missed else []
        parts += [f"Met: {'; '.join(met)}"] if met else []
        out.append(f"- {name}: " + ". ".join(parts) + ".")
    return [*out, *_best_at_batch_1(tasks), ""]


def _best_at_batch_1(tasks: list[dict]) -> list[str]:
    """Per task, the fastest early exit within one point (the chosen settings) at batch 1 over the optimized int8
    whole graph, against the 1.3x asked."""
    best = []
    for task in tasks:
        rows = [r for r in task["rows"] if r["mode"] == "batch 1" and r["over"] == BASE and r.get("ideal")]
        if rows:
            row = max(rows, key=lambda r: r["median"])
            best.append(f"{task['task']} {row['variant'].removeprefix('pabee ORT ')} {_speedup(row)}")
    if not best:
        return []
    met = sum(float(b.rsplit(" ", 1)[1][:-1]) >= 1.3 for b in best)
    return [
        f"- Early exit within one point ≥ 1.3x the optimized int8 whole graph at batch 1: **met on {met} of "
        f"{len(best)}** ({'; '.join(best)})."
    ]


def _described(task: str, row: dict, key: str, shortfall: str = "") -> str:
    """A row in words: task, mode, variant, and its speed-up (early exit: as a share of the ideal too)."""
    variant = row["variant"].removeprefix("pabee ORT ") if key != "optimizer" else "optimized over plain"
    value = _speedup(row)
    if key == "ideal":
        value += f", {100 * row['median'] / row['ideal']:.0f}% of ideal {row['ideal']:.2f}x"
    return f"{task} {row['mode']} {variant} ({value}{shortfall})"


def _speedup(row: dict) -> str:
    """The median speed-up to two decimals, or three where two would round it onto its target."""
    close = f"{row['median']:.2f}" == f"{row['target']:.2f}" and row["median"] != row["target"]
    return f"{row['median']:.3f}x" if close else f"{row['median']:.2f}x"


def _shortfall(row: dict) -> str:
    """How far a row's median falls short of its target, in percent (one decimal below 1%)."""
    short = 100 * (1 - row["median"] / row["target"])
    return f"{short:.1f}%" if short < 1 else f"{short:.0f}%"


def _quality(checks: dict) -> list[str]:
    rows = []
    for v in checks["variants"]:
        layer = "—" if v.get("mean_exit_layer") is None else f"{v['mean_exit_layer']:.2f}"
        same = "—" if v.get("exits_equal_torch") is None else f"{100 * v['exits_equal_torch']:.1f}%"
        score = "—" if v["score"] is None else f"{v['score']:.1f}"
        rows.append([v["variant"], score, layer, same])
    head = ["Variant (reporting half)", "Score", "Mean exit layer", "Exit layer = torch fp32's"]
    diff = "Every layer's logits, ONNX Runtime fp32 vs torch fp32 (whole dev set): max |diff| "
    return [*common.table(head, rows), "", diff + f"{checks['layer_logits_max_diff_fp32']:.1e}.", ""]


def _settings(task: dict) -> list[str]:
    out = [f"Settings chosen on one dev half (score: {task['metric']}, points), held-out half in brackets:", ""]
    for name, s in task["settings"].items():
        full = s["full"]
        out.append(
            f"- {name} {s['setting']}: {s['choose']['score']:.1f} ({s['report']['score']:.1f}) vs the full "
            f"model's {full['choose']['score']:.1f} ({full['report']['score']:.1f}); "
            f"{s['report']['avg_exit_layer']:.2f} layers on average held out"
        )
    return out


def _cells(r: dict) -> list:
    verdict = "met" if r["median"] >= r["target"] else f"missed by {_shortfall(r)}"
    ideal = "—" if r["ideal"] is None else f"{r['ideal']:.2f}x"
    variant = r["variant"].removeprefix("pabee ORT ")
    return [r["mode"], variant, r["over"], _speedup(r), f"{r['q1']:.2f}–{r['q3']:.2f}", ideal, f"{r['target']:.2f}x",
            verdict]  # fmt: skip


def measure(args) -> dict:
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
