"""Certified exit settings, checked: calibration repeated on many random splits of each dev set.

Per task, one full pass gives every layer's logits on the dev set, and every candidate setting's answers are read
off them (`pabee.calibrate.answers_of`: every patience; confidence, entropy and static over their built-in sweeps).
Then, for `--splits` random halvings, each way of picking an exit setting sees only the choosing half and is
judged on the other:

- uncertified: today's `pabee calibrate`, the fastest setting within `--max_drop` points of the full model's
  score on the choosing half;
- certified drop: `pabee calibrate --certify drop`, accuracy drop at most `--max_drop` points with
  `--confidence_level` (classification tasks);
- certified disagreement: `--certify disagreement`, at most `--max_disagreement` % of answers changed;
- fixed patience: `--patience`, the same on every split.

A violation is the held-out half exceeding the bound the method was asked to keep: accuracy drop (points) for the
drop, the share of changed answers for disagreement, and for the uncertified choice the drop in the task's own
score (what it promises) and in accuracy. The held-out half is itself a sample, so a setting whose true risk sits
just under the bound still "violates" on about half the splits: the frequencies bound the certificate's error
from above. Speed kept: the layers saved on the held-out half (1 - mean exit layer / layers), as a share of what
the uncertified choice saves. Targets (issue 28): violations in at most delta of the splits on every task, while
keeping >= 80% of the uncertified choice's layer savings.

    python benchmarks/certified_calibration.py --model MRPC=runs/mrpc --model SST-2=runs/sst2 --model RTE=runs/rte \
        --model CoLA=runs/cola --model STS-B=runs/stsb
"""

from __future__ import annotations

import statistics
from typing import Any

import common
import numpy as np
import torch

METHODS = ("uncertified", "certified drop", "certified disagreement", "fixed patience")
CRITERIA = ("patience", "confidence", "entropy", "static")
REGRESSION_CRITERIA = ("patience", "static")  # entropy and confidence need class probabilities


def split(count: int, seed: int) -> dict[str, np.ndarray]:
    """A random halving of `count` examples, as `pabee calibrate --seed` makes it."""
    from pabee.calibrate import split_halves

    return split_halves(count, seed)


def task_answers(task_name: str, folder: str, args) -> tuple[Any, Any, dict, np.ndarray]:
    """The model, its task, every setting's answers on the dev set (from one full pass), and the labels."""
    from pabee import ExitSweep
    from pabee.arguments import checked_specs
    from pabee.calibrate import answers_of
    from pabee.glue import get_task
    from pabee.pipeline import PabeePipeline

    pipe = PabeePipeline.from_pretrained(folder, backend="torch", batch_size=64)
    model = pipe.model
    examples, labels = common.glue_split(task_name, args.glue_dir)
    logits = pipe.all_layer_logits(examples)
    sweep = ExitSweep(criteria=CRITERIA, patiences=tuple(range(model.num_layers)))
    if model.config.is_regression:
        sweep = ExitSweep(criteria=REGRESSION_CRITERIA, patiences=sweep.patiences)
    specs = [spec for items in checked_specs(sweep, model.config).values() for spec in items]
    return model, get_task(task_name), answers_of(model, logits.numpy(), specs), labels


def judge(model, task, answers, labels, halves, args) -> dict[str, dict[str, dict[str, Any]]]:
    """Per bound level, each method's choice on one split with its held-out numbers."""
    from pabee import ExitSpec
    from pabee.calibrate import choose_from, setting_rows
    from pabee.certify import Guarantee

    confidence = args.confidence_level
    rows = setting_rows(model, task, answers, labels, halves)
    fixed = next(r for r in rows if r["spec"] == ExitSpec("patience", patience=args.patience))
    out = {}
    for drop, disagreement in zip(args.max_drop, args.max_disagreement, strict=True):
        level = out[f"{drop:g} / {disagreement:g}"] = {}
        level["uncertified"] = _held_out(choose_from(model, task, answers, labels, halves, drop, rows=rows))
        guarantees = {"certified disagreement": Guarantee("disagreement", disagreement / 100, confidence)}
        if not model.config.is_regression:
            guarantees["certified drop"] = Guarantee("drop", drop / 100, confidence)
        for name, guarantee in guarantees.items():
            result = choose_from(model, task, answers, labels, halves, drop, guarantee, rows=rows)
            level[name] = {**_held_out(result), "none_certified": result["certificate"]["none_certified"]}
        level["fixed patience"] = _held_out({"rows": rows}, pick=fixed)
    return out


def _held_out(result: dict, pick: dict | None = None) -> dict[str, Any]:
    """The chosen (or `pick`ed) row's held-out numbers, against the full model's there."""
    rows = result["rows"]
    row = pick or next(r for r in rows if r["chosen"])
    held, full = row["report"], rows[0]["report"]
    out = {"setting": f"{row['criterion']} {row['setting']}", "avg_exit_layer": held["avg_exit_layer"]}
    out["disagreement"] = held["disagreement"]
    if "accuracy_drop" in held:
        out["accuracy_drop"] = held["accuracy_drop"]
    if "score" in held:
        out["score_drop"] = full["score"] - held["score"]
    return out


def summarize(splits: list[dict], layers: int, drop: float, disagreement: float) -> dict[str, dict[str, Any]]:
    """Per method over the splits of one bound level: how often each bound was exceeded, layers saved, settings
    chosen."""
    bounds = {"accuracy_drop": drop, "score_drop": drop, "disagreement": disagreement}
    out = {}
    for method in METHODS:
        runs = [s[method] for s in splits if method in s]
        if not runs:
            continue
        entry: dict[str, Any] = {"splits": len(runs)}
        for key, bound in bounds.items():
            values = [r[key] for r in runs if key in r]
            if values:
                entry[f"{key}_violations"] = sum(v > bound + 1e-9 for v in values) / len(values)
                entry[f"{key}_mean"] = statistics.fmean(values)
        entry["layers_saved"] = statistics.fmean(1 - r["avg_exit_layer"] / layers for r in runs)
        entry["avg_exit_layer"] = statistics.fmean(r["avg_exit_layer"] for r in runs)
        if any("none_certified" in r for r in runs):
            entry["none_certified"] = sum(r["none_certified"] for r in runs) / len(runs)
        settings = [r["setting"] for r in runs]
        entry["most_chosen"] = max(sorted(set(settings)), key=settings.count)
        entry["most_chosen_share"] = settings.count(entry["most_chosen"]) / len(settings)
        out[method] = entry
    base = out["uncertified"]["layers_saved"]
    for entry in out.values():
        entry["savings_kept"] = entry["layers_saved"] / base if base > 0 else None
    return out


def measure_task(task_name: str, folder: str, args) -> dict[str, Any]:
    """All splits of one task, summarized per bound level."""
    from pabee.provenance import portable_path

    model, task, answers, labels = task_answers(task_name, folder, args)
    splits = [judge(model, task, answers, labels, split(len(labels), seed), args) for seed in range(args.splits)]
    levels = {}
    for drop, disagreement in zip(args.max_drop, args.max_disagreement, strict=True):
        name = f"{drop:g} / {disagreement:g}"
        levels[name] = summarize([s[name] for s in splits], model.num_layers, drop, disagreement)
        print(f"{task_name} {name}: " + "; ".join(f"{m} {e['layers_saved']:.3f}" for m, e in levels[name].items()))
    return {"model": portable_path(folder), "examples": len(labels), "layers": model.num_layers, "levels": levels}


def measure(args) -> dict:
    from pabee.provenance import portable_path

    torch.set_num_threads(args.threads)
    models = common.task_models(args)
    flags = {k: getattr(args, k) for k in ("splits", "max_drop", "max_disagreement", "confidence_level", "patience")}
    tasks = {name: measure_task(name, folder, args) for name, folder in models.items()}
    named = {task: portable_path(folder) for task, folder in models.items()}  # as a result names them
    return common.report(settings=flags, tasks=tasks, provenance={"models": named})


def render(report: dict) -> str:
    s, p = report["settings"], report["provenance"]
    delta = 1 - s["confidence_level"]
    setup = (
        f"{s['splits']} random halvings of each dev set (seeds 0-{s['splits'] - 1}); bound levels (drop points / "
        f"disagreement %): {', '.join(_levels(s))}; "
        f"confidence {s['confidence_level']:g} (delta {delta:.2g}); fixed patience {s['patience']}."
    )
    lines = common.heading("Certified exit settings over random splits", p, setup)
    lines += [
        "Violations: the share of splits whose held-out half exceeds the bound the method keeps (certified drop: "
        "accuracy drop; certified disagreement: changed answers; uncertified: its task score drop, accuracy drop in "
        "brackets). Layers saved: 1 - mean exit layer / layers on the held-out half, mean over splits; kept: as a "
        f"share of the uncertified choice's. Target: violations <= {delta:.2g}, kept >= 80%.",
        "",
    ]
    head = ["Task (dev)", "Bound", "Method", "Violations", "Layers saved", "Kept", "None certified", "Most chosen"]
    rows = []
    for name, task in report["tasks"].items():
        for level, methods in task["levels"].items():
            rows += [
                [f"{name} ({task['examples']})", level, method, *_cells(method, e)] for method, e in methods.items()
            ]
    return "\n".join(lines + common.table(head, rows) + _summary(report)) + "\n"


def _summary(report: dict) -> list[str]:
    """What the table adds up to, per method and bound, and what the certifying halves could certify at all."""
    from pabee.certify import Guarantee, min_examples

    s, tasks = report["settings"], report["tasks"]
    levels = _levels(s)
    lines = ["", "## Summary", ""]
    for method in METHODS[1:3]:
        for level in levels:
            kept = {name: t["levels"][level][method]["savings_kept"] for name, t in tasks.items()
                    if method in t["levels"][level]}  # fmt: skip
            worst = max(float(_violations(method, t["levels"][level][method]).split("%")[0])
                        for t in tasks.values() if method in t["levels"][level])  # fmt: skip
            spread = ", ".join(f"{name} {share:.0%}" for name, share in kept.items())
            lines.append(f"- {method}, {level}: savings kept {spread}; violations at most {worst:.1f}%.")
    uncertified = [
        t["levels"][level]["uncertified"]["score_drop_violations"]
        for t in tasks.values()
        for level in levels[:2]
        if "accuracy_drop_violations" in t["levels"][level]["uncertified"]
    ]
    lines.append(
        f"- uncertified, classification tasks at the two smallest bounds: violations {min(uncertified):.1%}"
        f"–{max(uncertified):.1%} of splits."
    )
    need = []
    for rules, kinds in ((len(CRITERIA), ("drop", "disagreement")), (len(REGRESSION_CRITERIA), ("disagreement",))):
        for kind in kinds:
            bounds = s["max_drop"] if kind == "drop" else s["max_disagreement"]
            counts = [min_examples(g := Guarantee(kind, b / 100, s["confidence_level"]), g.delta / rules)
                      for b in bounds]  # fmt: skip
            unit = "points" if kind == "drop" else "%"
            need.append(f"{kind} {' / '.join(f'{b:g}' for b in bounds)} {unit} over {rules} rules: "
                        f"{' / '.join(str(c) for c in counts)}")  # fmt: skip
    halves = ", ".join(f"{name} {t['examples'] // 2}" for name, t in tasks.items())
    lines.append(
        "- Fewest examples per certifying half on which even a setting that never changes an answer is certified: "
        + "; ".join(need)
        + f". The certifying halves here: {halves}."
    )
    return lines


def _levels(settings: dict) -> list[str]:
    return [f"{a:g} / {b:g}" for a, b in zip(settings["max_drop"], settings["max_disagreement"], strict=True)]


def _cells(method: str, e: dict) -> list[str]:
    kept = "—" if e["savings_kept"] is None else f"{e['savings_kept']:.0%}"
    none = f"{e['none_certified']:.0%}" if "none_certified" in e else "—"
    return [
        _violations(method, e),
        f"{e['layers_saved']:.1%}",
        kept,
        none,
        f"{e['most_chosen']} ({e['most_chosen_share']:.0%})",
    ]


def _violations(method: str, e: dict) -> str:
    if method == "certified disagreement":
        return f"{e['disagreement_violations']:.1%}"
    if method == "certified drop":
        return f"{e['accuracy_drop_violations']:.1%}"
    main = f"{e['score_drop_violations']:.1%}" if "score_drop_violations" in e else "—"
    if "accuracy_drop_violations" in e:
        main += f" ({e['accuracy_drop_violations']:.1%})"
    return main


def _numbers(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> None:
    parser = common.parser(__doc__, "certified_calibration", threads=2)
    parser.add_argument("--splits", type=int, default=200, help="Random halvings per task.")
    parser.add_argument("--max_drop", type=_numbers, default="1,2,5", help="Points (accuracy, or the task's score).")
    parser.add_argument("--max_disagreement", type=_numbers, default="2,5,10", help="%% of answers changed, paired.")
    parser.add_argument("--confidence_level", type=float, default=0.95, help="1 - delta.")
    parser.add_argument("--patience", type=int, default=3, help="The fixed patience compared.")
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
