"""`pabee calibrate`: the fastest exit setting whose quality stays within `--max_drop` points of the full model,
chosen on data instead of by hand from a table, and reported on data it was not chosen on.

One full pass over the calibration examples gives every layer's logits; every candidate setting (each selected
criterion's patiences or thresholds) is read off them with the rule real early exit uses. The examples are split
in two halves at random (`--seed`): the setting is chosen on the first half and its quality and speed are reported
on the second, so the reported numbers are not the ones the choice was fitted to. The choice goes into the
model's `config.json` (written atomically) unless `--dry_run`; the report (every setting on both halves, the
Pareto front, the choice) goes beside it as `calibration.json` and `calibration.md`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arguments import CalibrateArguments
from .errors import PabeeError
from .evaluate import setting_row
from .exits import ExitSpec, ExitSweep
from .glue import TaskSpec, get_task
from .modeling import Runtime
from .pipeline import PabeePipeline
from .provenance import provenance, write_atomic, write_json
from .sweeps import checked_specs

__all__ = [
    "Calibration",
    "calibrate",
    "choose_setting",
    "fastest_within",
    "run_calibrate",
    "score_setting",
    "split_halves",
    "summary_line",
    "task_score",
]


def task_score(row: dict[str, Any], metrics: tuple[str, ...]) -> float:
    """The task's quality in points: its metric, or the mean of its metrics (as GLUE averages MRPC's two)."""
    return 100 * statistics.fmean(row[name] for name in metrics)


def score_setting(
    model: Runtime, all_logits: torch.Tensor, labels: np.ndarray, task: TaskSpec, spec: ExitSpec
) -> dict[str, Any]:
    """One setting read off every layer's logits: its score (`task_score`), metrics and layers on average."""
    row = setting_row(model, all_logits, labels, task, spec)
    return {
        "score": task_score(row, task.metrics),
        **{k: row[k] for k in (*task.metrics, "avg_exit_layer", "speed_up")},
    }


def split_halves(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Example indices in two random halves: `choose` (a setting is fitted on it) and `report` (it is measured on
    it). One definition, so every calibration and reproduction splits the same way."""
    order = np.random.default_rng(seed).permutation(count)
    return {"choose": order[: count // 2], "report": order[count // 2 :]}


def fastest_within(rows: list[dict[str, Any]], floor: float) -> dict[str, Any] | None:
    """The row with the fewest layers on average on the choosing half among those scoring at least `floor` there
    (ties: the better score); None when none does. The one rule by which every setting is chosen."""
    eligible = [row for row in rows if row["choose"]["score"] >= floor]
    return min(eligible, key=lambda row: (row["choose"]["avg_exit_layer"], -row["choose"]["score"]), default=None)


def choose_setting(
    model: Runtime,
    all_logits: np.ndarray,
    labels: np.ndarray,
    task: TaskSpec,
    specs: list[ExitSpec],
    max_drop: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Every setting scored on both halves; the chosen one is the fewest layers on the choosing half among those
    within `max_drop` points of the full model there (ties: the better score)."""
    halves = split_halves(len(labels), seed)
    logits = torch.as_tensor(all_logits)
    full = ExitSpec("patience", patience=0)
    rows = []
    for spec in [full, *(s for s in specs if s != full)]:
        row = {**spec.describe(with_cap=True), "spec": spec}
        for name, index in halves.items():
            row[name] = score_setting(model, logits[index], labels[index], task, spec)
        rows.append(row)
    chosen = fastest_within(rows, rows[0]["choose"]["score"] - max_drop)
    for row in rows:
        row["pareto"] = not any(_dominates(other["choose"], row["choose"]) for other in rows)
        row["chosen"] = row is chosen
    return {"halves": {name: len(index) for name, index in halves.items()}, "max_drop": max_drop, "rows": rows}


def _dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    better_or_equal = a["score"] >= b["score"] and a["avg_exit_layer"] <= b["avg_exit_layer"]
    return better_or_equal and (a["score"] > b["score"] or a["avg_exit_layer"] < b["avg_exit_layer"])


def _examples(args: CalibrateArguments, model: Runtime) -> tuple[TaskSpec, Any]:
    """The calibration split: a GLUE task's dev set, or `--validation_file`."""
    from .data import load_glue, load_user_files

    if args.task_name is not None:
        data = load_glue(get_task(args.task_name), args.data_dir, train=False, evaluate=True, test=False)
    else:
        config = model.config
        names = None if config.is_regression else tuple(config.id2label[i] for i in range(config.num_labels))
        data = load_user_files(None, args.validation_file, args.task_type, labels=names)
    split = next(iter(data.eval.values()), None)
    if split is None or len(split) < 2:
        raise PabeeError("Calibration needs at least 2 labelled examples.")
    if data.task.num_labels != model.config.num_labels:
        raise PabeeError(
            f"{data.task.name} has {data.task.num_labels} labels; the model has {model.config.num_labels}"
        )
    return data.task, split


def run_calibrate(args: CalibrateArguments, command: str) -> dict[str, Any]:
    """`pabee calibrate`: load the model and the labelled examples, then `calibrate`."""
    folder = Path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = PabeePipeline.from_pretrained(
        folder, backend="torch", batch_size=args.batch_size, max_length=args.max_seq_length
    )
    task, split = _examples(args, pipe.model)
    settings = Calibration(args.sweep, args.max_drop, args.seed)
    return calibrate(pipe, task, split, settings, folder, command, dry_run=args.dry_run)


@dataclass
class Calibration:
    """What to choose among (the sweep's criteria, thresholds and cap; every patience) and how much quality the
    choice may cost."""

    sweep: ExitSweep
    max_drop: float
    seed: int = 0


def calibrate(
    pipe: PabeePipeline,
    task: TaskSpec,
    split: Any,
    settings: Calibration,
    folder: Path,
    command: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """One full pass over `split` (rows with `text`, `text_pair`, `label`), the choice, then the model folder's
    `config.json` (unless `dry_run`) and `calibration.json` / `calibration.md` in it. Returns the report."""
    model = pipe.model
    layers = model.num_layers
    specs = checked_specs(replace(settings.sweep, patiences=tuple(range(layers))), model.config)
    examples = [(row["text"], row.get("text_pair")) for row in split]
    all_logits = pipe.all_layer_logits(examples, progress=True)
    labels = np.asarray(split["label"])
    candidates = [spec for items in specs.values() for spec in items]
    result = choose_setting(model, all_logits, labels, task, candidates, settings.max_drop, settings.seed)
    chosen = next(row for row in result["rows"] if row["chosen"])
    if not dry_run:
        _write_exit_setting(folder / "config.json", model, chosen["spec"])
    report = {"provenance": provenance(command, model=str(folder), task=task.name), "dry_run": dry_run, **result}
    for row in report["rows"]:
        row.pop("spec")
    write_json(folder / "calibration.json", report)
    write_atomic(folder / "calibration.md", render(report, task))
    return report


def summary_line(report: dict[str, Any], folder: str | Path) -> str:
    """What the commands print: the choice and its held-out numbers."""
    chosen = next(row for row in report["rows"] if row["chosen"])
    held_out, full = chosen["report"], report["rows"][0]["report"]
    return (
        f"{chosen['criterion']} {chosen['setting']}: held-out score {held_out['score']:.1f} (full model "
        f"{full['score']:.1f}), {held_out['avg_exit_layer']:.2f} layers on average; "
        + ("dry run, config unchanged" if report["dry_run"] else f"written to {folder}/config.json")
        + f"; report: {folder}/calibration.md"
    )


def _write_exit_setting(path: Path, model: Runtime, spec: ExitSpec) -> None:
    """Change only the exit fields of `config.json` (atomically); everything else in it stays as it was."""
    model.config.exit_spec = spec
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.update(model.config.exit_fields())
    write_json(path, saved)


def render(report: dict[str, Any], task: TaskSpec) -> str:
    """The report: how it was chosen, the chosen point on both halves, and the Pareto front."""
    halves, drop = report["halves"], report["max_drop"]
    chosen = next(row for row in report["rows"] if row["chosen"])
    full = report["rows"][0]
    score = " / ".join(task.metrics) if len(task.metrics) == 1 else f"mean of {' and '.join(task.metrics)}"
    lines = [
        f"# Calibration: {task.name}, at most {drop:g} point{'' if drop == 1 else 's'} below the full model",
        "",
        f"Chosen on one random half of the examples ({halves['choose']}), measured on the other half "
        f"({halves['report']}), which the choice never saw. Score: {score}, in points. "
        + ("Dry run: the config was not changed." if report["dry_run"] else "Written into config.json."),
        "",
        f"**Chosen: {chosen['criterion']} {chosen['setting']}** — on the held-out half: score "
        f"{chosen['report']['score']:.1f} vs {full['report']['score']:.1f} for the full model, "
        f"{chosen['report']['avg_exit_layer']:.2f} layers on average ({chosen['report']['speed_up']:.2f}x fewer).",
        "",
        f"Full model: score {full['choose']['score']:.1f} on the choosing half, {full['report']['score']:.1f} held "
        "out. Pareto front on the choosing half (no setting is both better and faster), with the held-out numbers:",
        "",
        "| Criterion | Setting | score (choose) | avg. layer (choose) | score (held out) | avg. layer (held out) |",
        "|---|---|---|---|---|---|",
    ]
    for row in sorted((r for r in report["rows"] if r["pareto"]), key=lambda r: r["choose"]["avg_exit_layer"]):
        mark = " **(chosen)**" if row["chosen"] else ""
        lines.append(
            f"| {row['criterion']} | {row['setting']}{mark} | {row['choose']['score']:.1f} | "
            f"{row['choose']['avg_exit_layer']:.2f} | {row['report']['score']:.1f} | "
            f"{row['report']['avg_exit_layer']:.2f} |"
        )
    return "\n".join(lines) + "\n"
