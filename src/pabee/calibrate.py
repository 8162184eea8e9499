"""`pabee calibrate`: the fastest exit setting whose quality stays within `--max_drop` points of the full model,
chosen on data instead of by hand from a table, and reported on data it was not chosen on.

One full pass over the calibration examples gives every layer's logits; every candidate setting (each selected
criterion's patiences or thresholds) is read off them with the rule real early exit uses. The examples are split
in two halves at random (`--seed`): the setting is chosen on the first half and its quality and speed are reported
on the second, so the reported numbers are not the ones the choice was fitted to. The choice goes into the
model's `config.json` (written atomically) unless `--dry_run`; the report (every setting on both halves, the
Pareto front, the choice) goes beside it as `calibration.json` and `calibration.md`.

With a `Guarantee` (`--certify`), the choosing half certifies instead of merely choosing: only settings whose risk
against the full model (accuracy drop, or disagreement, which needs no labels) is shown to be within the bound
with the stated confidence are eligible (`pabee.certify`, Learn then Test); when none is, the full model stays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .arguments import CalibrateArguments, checked_specs
from .certify import Guarantee, certify, min_examples, risk_losses
from .errors import PabeeError
from .evaluate import exit_answers
from .glue import TaskSpec, get_task
from .load_control import LADDER_FILE
from .metrics import compute_metrics, exit_statistics, task_score
from .modeling import Runtime
from .pipeline import PabeePipeline
from .provenance import portable_path, provenance, write_atomic, write_json
from .settings import ExitSpec, ExitSweep

__all__ = [
    "Calibration",
    "auto_guarantee",
    "calibrate",
    "answers_of",
    "choose_from",
    "choose_setting",
    "fastest_within",
    "run_calibrate",
    "score_setting",
    "setting_rows",
    "split_halves",
    "summary_line",
]


def score_setting(
    model: Runtime, all_logits: torch.Tensor, labels: np.ndarray, task: TaskSpec, spec: ExitSpec
) -> dict[str, Any]:
    """One setting read off every layer's logits: its score (`task_score`), metrics and layers on average."""
    everything = np.arange(len(labels))
    return _summary(model, task, exit_answers(model, torch.as_tensor(all_logits), spec), everything, labels)


Answers = tuple[np.ndarray, np.ndarray]  # each example's prediction and exit layer under one setting (exit_answers)


def _summary(
    model: Runtime,
    task: TaskSpec,
    answers: Answers,
    index: np.ndarray,
    labels: np.ndarray | None,
    full: Answers | None = None,
) -> dict[str, Any]:
    """A setting on some examples: layers on average, the score and metrics (with labels) and, against the full
    model's answers, the share of answers that differ and the accuracy drop (in points)."""
    predictions, exits = answers[0][index], answers[1][index]
    stats = exit_statistics(exits, model.num_layers)
    out: dict[str, Any] = {"avg_exit_layer": stats["avg_exit_layer"], "speed_up": stats["speed_up"]}
    if labels is not None:
        metrics = compute_metrics(task.metrics, predictions, labels[index])
        out = {"score": task_score(metrics, task.metrics), **{k: metrics[k] for k in task.metrics}, **out}
    if full is not None:
        regression, reference = model.config.is_regression, full[0][index]
        changed = risk_losses(predictions, reference, None, "disagreement", _tolerance(model), regression)
        out["disagreement"] = 100 * float(changed.mean())
        if labels is not None and not regression:
            out["accuracy_drop"] = 100 * float(risk_losses(predictions, reference, labels[index], "drop").mean())
    return out


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
    labels: np.ndarray | None,
    task: TaskSpec,
    specs: list[ExitSpec],
    max_drop: float,
    seed: int = 0,
    guarantee: Guarantee | None = None,
) -> dict[str, Any]:
    """Every setting scored on both halves. Without a guarantee the chosen one is the fewest layers on the choosing
    half among those within `max_drop` points of the full model there (ties: the better score); with one, the
    fewest layers among the settings the choosing half certifies (`labels` may then be None: disagreement)."""
    answers = answers_of(model, all_logits, specs)
    return choose_from(model, task, answers, labels, split_halves(len(all_logits), seed), max_drop, guarantee)


def answers_of(model: Runtime, all_logits: np.ndarray, specs: list[ExitSpec]) -> dict[ExitSpec, Answers]:
    """What each setting answers on every example, the full model (patience 0) first: read once, then any split
    of the examples can be judged (`choose_from`)."""
    logits = torch.as_tensor(all_logits)
    full = ExitSpec("patience", patience=0)
    return {spec: exit_answers(model, logits, spec) for spec in [full, *(s for s in specs if s != full)]}


def choose_from(
    model: Runtime,
    task: TaskSpec,
    answers: dict[ExitSpec, Answers],
    labels: np.ndarray | None,
    halves: dict[str, np.ndarray],
    max_drop: float,
    guarantee: Guarantee | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`choose_setting` on answers already read (`answers_of`) and a given split into `choose` and `report`;
    `rows` (`setting_rows` of the same split) spare scoring again when one split is chosen on several ways."""
    rows = setting_rows(model, task, answers, labels, halves) if rows is None else rows
    result: dict[str, Any] = {"halves": {name: len(index) for name, index in halves.items()}, "max_drop": max_drop}
    if guarantee is None:
        chosen = fastest_within(rows, rows[0]["choose"]["score"] - max_drop)
    else:
        result["certificate"] = _certify(model, rows, answers, labels, halves["choose"], guarantee)
        eligible = [row for row in rows if row["certified"]]
        chosen = min(eligible, key=lambda row: (row["choose"]["avg_exit_layer"], row["choose"]["disagreement"]))
    for row in rows:
        row["pareto"] = labels is not None and not any(_dominates(o["choose"], row["choose"]) for o in rows)
        row["chosen"] = row is chosen
    return {**result, "rows": rows}


def setting_rows(
    model: Runtime,
    task: TaskSpec,
    answers: dict[ExitSpec, Answers],
    labels: np.ndarray | None,
    halves: dict[str, np.ndarray],
) -> list[dict[str, Any]]:
    """Every setting on each half: layers, score and metrics (with labels), disagreement with the full model (for
    regression: outputs further apart than the model's `regression_threshold`) and accuracy drop."""
    full = next(iter(answers.values()))
    rows = []
    for spec, answer in answers.items():
        row = {**spec.describe(with_cap=True), "spec": spec}
        for name, index in halves.items():
            row[name] = _summary(model, task, answer, index, labels, full)
        rows.append(row)
    return rows


def _tolerance(model: Runtime) -> float:
    """Regression outputs closer than this agree with the full model's, as the patience rule counts agreement."""
    return model.config.regression_threshold


def _caution(spec: ExitSpec) -> tuple[float, ...]:
    """The fixed order in which a rule's settings are tested, most layers first: a higher patience, confidence
    threshold or static layer keeps more layers; a higher entropy threshold fewer."""
    threshold = spec.threshold or 0.0
    return (threshold,) if spec.criterion == "entropy" else (-(spec.patience or 0), -threshold)


def _certify(
    model: Runtime,
    rows: list[dict[str, Any]],
    answers: dict[ExitSpec, Answers],
    labels: np.ndarray | None,
    index: np.ndarray,
    guarantee: Guarantee,
) -> dict[str, Any]:
    """Learn then Test on the choosing half; marks each row `certified` (the full model always is: it is the
    reference) with its p-value, and returns what was certified and how."""
    regression, full = model.config.is_regression, answers[rows[0]["spec"]][0][index]
    chains: dict[str, list[dict[str, Any]]] = {}
    for row in rows[1:]:
        chains.setdefault(row["spec"].criterion, []).append(row)
    for chain in chains.values():
        chain.sort(key=lambda row: _caution(row["spec"]))
    losses = {
        name: [
            risk_losses(
                answers[row["spec"]][0][index],
                full,
                None if labels is None else labels[index],
                guarantee.risk,
                _tolerance(model),
                regression,
            )
            for row in chain
        ]
        for name, chain in chains.items()
    }
    tested = certify(losses, guarantee)
    rows[0].update(certified=True, p_value=None, first_failure=False)
    for name, chain in chains.items():
        for position, row in enumerate(chain):
            count = tested[name]["certified"]
            row.update(certified=position < count, p_value=tested[name]["p_values"][position])
            row["first_failure"] = position == count  # the setting where the rule's sequence stopped
    level = next(iter(tested.values()))["level"] if tested else guarantee.delta
    return {
        "risk": guarantee.risk,
        "bound": guarantee.bound,
        "confidence": guarantee.confidence,
        "tolerance": _tolerance(model) if regression and guarantee.risk == "disagreement" else None,
        "method": "Learn then Test: fixed-sequence testing within each rule, Bonferroni across rules",
        "level": level,
        "certified": {name: f"{tested[name]['certified']}/{len(chain)}" for name, chain in chains.items()},
        "none_certified": not any(row["certified"] for row in rows[1:]),
        "min_examples": min_examples(guarantee, level),
        "examples": len(index),
    }


def _dominates(a: dict[str, float], b: dict[str, float]) -> bool:
    better_or_equal = a["score"] >= b["score"] and a["avg_exit_layer"] <= b["avg_exit_layer"]
    return better_or_equal and (a["score"] > b["score"] or a["avg_exit_layer"] < b["avg_exit_layer"])


def _examples(args: CalibrateArguments, model: Runtime) -> tuple[TaskSpec, Any]:
    """The calibration split: a GLUE task's dev set, `--validation_file`, or unlabelled `--input_file` texts."""
    from .data import load_glue, load_user_files

    config = model.config
    names = None if config.is_regression else tuple(config.id2label[i] for i in range(config.num_labels))
    if args.input_file is not None:  # the model's own task, named after the file, with no metric to score
        task = TaskSpec(name=Path(args.input_file).stem, labels=names, metrics=(), main_metric="")
        return task, _text_rows(args.input_file)
    if args.task_name is not None:
        data = load_glue(get_task(args.task_name), args.data_dir, train=False, evaluate=True, test=False)
    else:
        data = load_user_files(None, args.validation_file, args.task_type, labels=names)
    split = next(iter(data.eval.values()), None)
    if split is None or len(split) < 2:
        raise PabeeError("Calibration needs at least 2 labelled examples.")
    if data.task.num_labels != config.num_labels:
        raise PabeeError(f"{data.task.name} has {data.task.num_labels} labels; the model has {config.num_labels}")
    return data.task, split


def _text_rows(path: str) -> list[dict[str, Any]]:
    """Unlabelled texts as calibration rows (no `label`); at least 2."""
    from .data import read_text_file

    rows = [{"text": row.text, "text_pair": row.text_pair} for row in read_text_file(path)]
    if len(rows) < 2:
        raise PabeeError(f"{path}: calibration needs at least 2 texts.")
    return rows


def run_calibrate(args: CalibrateArguments, command: str) -> dict[str, Any]:
    """`pabee calibrate`: load the model and the examples, then `calibrate`."""
    folder = Path(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = PabeePipeline.from_pretrained(
        folder, backend="torch", batch_size=args.batch_size, max_length=args.max_seq_length
    )
    task, split = _examples(args, pipe.model)
    auto = args.confidence_level if args.certify == "auto" else None
    settings = Calibration(args.sweep, args.max_drop, args.seed, args.guarantee(), auto)
    return calibrate(pipe, task, split, settings, folder, command, dry_run=args.dry_run)


@dataclass
class Calibration:
    """What to choose among (the sweep's criteria, thresholds and cap; every patience), how much quality the
    choice may cost, and, with a `guarantee`, what the choice must be certified to keep."""

    sweep: ExitSweep
    max_drop: float
    seed: int = 0
    guarantee: Guarantee | None = None
    auto_confidence: float | None = None  # without a guarantee: certify max_drop at this confidence where possible


def _points(amount: float) -> str:
    return f"{amount:g} point{'' if amount == 1 else 's'}"


def auto_guarantee(
    max_drop: float, confidence: float, regression: bool, examples: int, rules: int
) -> tuple[Guarantee | None, str | None]:
    """`--certify auto`: the accuracy drop `max_drop` promises, certified when `examples` per half can certify it
    at all over `rules` exit rules; otherwise no guarantee and the sentence that says what the choice does not
    promise. An uncertified "within a point" broke on new data in 7.5-60.5% of 200 splits
    (benchmarks/results/certified_calibration.md), so it is the fallback, never the default."""
    if regression:
        return None, (
            "not certified: a correlation has no bound of this kind; --certify disagreement bounds the share of "
            "outputs that move instead."
        )
    if max_drop <= 0:
        return None, "not certified: a drop of 0 points cannot be certified."
    guarantee = Guarantee("drop", max_drop / 100, confidence)
    needed = min_examples(guarantee, guarantee.delta / max(1, rules))
    if needed is not None and needed <= examples:
        return guarantee, None
    return None, (
        f"not certified: certifying a {max_drop:g}-point drop needs at least {needed or 'over a million'} examples "
        f"per half here, these give {examples}; the setting kept within {_points(max_drop)} on the examples it was "
        "chosen on, which new data often breaks. More examples, a larger --max_drop, or --certify disagreement "
        "(changed answers, no labels needed: --input_file) can give a guarantee."
    )


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
    sweep = replace(settings.sweep, patiences=tuple(range(model.num_layers)))
    candidates = _candidates(sweep, model)
    examples = [(row["text"], row.get("text_pair")) for row in split]
    guarantee, caveat = settings.guarantee, None
    if guarantee is None:
        caveat = f"not certified: within {_points(settings.max_drop)} on the choosing half only."
    if guarantee is None and settings.auto_confidence is not None:
        rules = len({spec.criterion for spec in candidates if not spec.is_full_model})
        guarantee, caveat = auto_guarantee(
            settings.max_drop, settings.auto_confidence, model.config.is_regression, len(examples) // 2, rules
        )
    if guarantee is not None:  # certifying: the fine thresholds cost no confidence (`CERTIFY_SWEEPS`)
        candidates = _candidates(sweep.for_certifying(), model)
    all_logits = pipe.all_layer_logits(examples, progress=True)
    labels = np.asarray([row["label"] for row in split]) if "label" in split[0] else None
    result = choose_setting(
        model, all_logits, labels, task, candidates, settings.max_drop, settings.seed, guarantee=guarantee
    )
    result["caveat"] = caveat
    chosen = next(row for row in result["rows"] if row["chosen"])
    model_name = portable_path(folder)
    report = {"provenance": provenance(command, model=model_name, task=task.name), "dry_run": dry_run, **result}
    if not dry_run:
        _write_exit_setting(folder / "config.json", model, chosen["spec"])
        write_json(folder / LADDER_FILE, exit_ladder(result, report["provenance"]))
    for row in report["rows"]:
        row.pop("spec")
    table = render(report, task)
    write_json(folder / "calibration.json", report)
    write_atomic(folder / "calibration.md", table)
    return report


def _candidates(sweep: ExitSweep, model: Runtime) -> list[ExitSpec]:
    return [spec for items in checked_specs(sweep, model.config).values() for spec in items]


LADDER_STEP = 0.9  # a rung runs at most this share of the layers of the rung above it


def _front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other beats on the choosing half in both mean layers and answers changed, one per such cost
    (the first listed), most layers first."""

    def cost(row: dict[str, Any]) -> tuple[float, float]:
        return row["choose"]["avg_exit_layer"], row["choose"]["disagreement"]

    def beaten(row: dict[str, Any]) -> bool:
        mine = cost(row)
        return any(cost(o) != mine and cost(o)[0] <= mine[0] and cost(o)[1] <= mine[1] for o in rows)

    front = {cost(row): row for row in reversed(rows) if not beaten(row)}
    return sorted(front.values(), key=lambda row: -cost(row)[0])


def exit_ladder(result: dict[str, Any], provenance_of: dict[str, Any]) -> dict[str, Any]:
    """`exit_ladder.json`, what `pabee serve --latency_target_ms` walks by load: the full model, then the settings
    of the front (`_front`), each running at most `LADDER_STEP` of the layers of the rung above (a certified sweep
    has dozens of thresholds, and a server climbs back one rung at a time), each with the share of the full
    model's answers it changed and its mean exit layer on the reporting half, and whether a disagreement
    certificate covers it."""
    rows = result["rows"]
    certified = result.get("certificate", {}).get("risk") == "disagreement"
    front = [rows[0]]  # the full model on top
    for row in _front(rows[1:]):
        if row["choose"]["avg_exit_layer"] <= LADDER_STEP * front[-1]["choose"]["avg_exit_layer"]:
            front.append(row)
    rungs = [
        {**row["spec"].keywords(), "disagreement": row["report"]["disagreement"] / 100,
         "layers": row["report"]["avg_exit_layer"], "certified": bool(certified and row.get("certified"))}
        for row in front
    ]  # fmt: skip
    measured = f"disagreement and layers on the reporting half ({result['halves']['report']} examples)"
    return {"rungs": rungs, "measured": measured, "provenance": provenance_of}


def summary_line(report: dict[str, Any], folder: str | Path) -> str:
    """What the commands print: the choice and its held-out numbers."""
    chosen = next(row for row in report["rows"] if row["chosen"])
    held_out, full = chosen["report"], report["rows"][0]["report"]
    quality = (
        f"held-out score {held_out['score']:.1f} (full model {full['score']:.1f})"
        if "score" in held_out
        else f"held-out disagreement with the full model {held_out['disagreement']:.1f}%"
    )
    certificate = report.get("certificate")
    certified = ""
    if certificate is not None:
        promise = _goal(report).removesuffix(" (certified)")
        certified = "none certified, full model kept; " if certificate["none_certified"] else f"certified: {promise}; "
    line = (
        f"{chosen['criterion']} {chosen['setting']}: {certified}{quality}, "
        f"{held_out['avg_exit_layer']:.2f} layers on average; "
        + ("dry run, config unchanged" if report["dry_run"] else f"written to {folder}/config.json and {LADDER_FILE}")
        + f"; report: {folder}/calibration.md"
    )
    return line + (f"\n  {report['caveat'][0].upper()}{report['caveat'][1:]}" if report.get("caveat") else "")


def _write_exit_setting(path: Path, model: Runtime, spec: ExitSpec) -> None:
    """Change only the exit fields of `config.json` (atomically); everything else in it stays as it was."""
    model.config.exit_spec = spec
    saved = json.loads(path.read_text(encoding="utf-8"))
    saved.update(spec.keywords())
    write_json(path, saved)


def render(report: dict[str, Any], task: TaskSpec) -> str:
    """The report: how it was chosen, the chosen point on both halves, and the Pareto front (or, certified, every
    setting with its test)."""
    halves, certificate = report["halves"], report.get("certificate")
    chosen, full = next(row for row in report["rows"] if row["chosen"]), report["rows"][0]
    lines = [f"# Calibration: {task.name}, {_goal(report)}", "", _how(report, task), ""]
    if certificate is not None:
        lines += [_certificate_text(certificate, halves), ""]
    if report.get("caveat"):
        lines += [f"**{report['caveat'][0].upper()}{report['caveat'][1:]}**", ""]
    held = chosen["report"]
    quality = (
        f"score {held['score']:.1f} vs {full['report']['score']:.1f} for the full model"
        if "score" in held
        else "no labels to score"
    )
    lines += [
        f"**Chosen: {chosen['criterion']} {chosen['setting']}** — on the held-out half: {quality}, "
        f"{held['disagreement']:.1f}% of answers differ from the full model's, "
        f"{held['avg_exit_layer']:.2f} layers on average ({held['speed_up']:.2f}x fewer).",
        "",
    ]
    return "\n".join(lines + _table(report)) + "\n"


def _goal(report: dict[str, Any]) -> str:
    certificate = report.get("certificate")
    if certificate is None:
        drop = report["max_drop"]
        return f"at most {drop:g} point{'' if drop == 1 else 's'} below the full model"
    amount = 100 * certificate["bound"]
    what = (
        f"accuracy drop at most {amount:g} point(s)"
        if certificate["risk"] == "drop"
        else (f"at most {amount:g}% of answers changed")
    )
    return f"{what} with {100 * certificate['confidence']:g}% confidence (certified)"


def _how(report: dict[str, Any], task: TaskSpec) -> str:
    halves = report["halves"]
    if task.metrics:
        score = " / ".join(task.metrics) if len(task.metrics) == 1 else f"mean of {' and '.join(task.metrics)}"
        score = f" Score: {score}, in points."
    else:
        score = " Unlabelled texts: no score, only agreement with the full model."
    verb = "Certified" if "certificate" in report else "Chosen"
    return (
        f"{verb} on one random half of the examples ({halves['choose']}), measured on the other half "
        f"({halves['report']}), which the choice never saw.{score} "
        + ("Dry run: the config was not changed." if report["dry_run"] else "Written into config.json.")
    )


def _certificate_text(certificate: dict[str, Any], halves: dict[str, int]) -> str:
    """How the certificate was made, and what it means when nothing was certified."""
    test = "exact binomial tail" if certificate["risk"] == "disagreement" else "betting martingale (WSR)"
    text = (
        f"Method: {certificate['method']}; each setting's p-value by the {test}, tested at level "
        f"{certificate['level']:.3g}. Certified per rule: "
        + ", ".join(f"{name} {count}" for name, count in certificate["certified"].items())
        + ". With that confidence every certified setting keeps the bound on new data like these examples."
    )
    if certificate["none_certified"]:
        needed = certificate["min_examples"]
        text += (
            f" **No setting could be certified on {certificate['examples']} examples; the full model is kept.**"
            + (
                f" Even a setting that never changed an answer needs at least {needed} examples here."
                if needed
                else ""
            )
        )
    return text


def _table(report: dict[str, Any]) -> list[str]:
    """Pareto front with both halves (chosen without a guarantee), or the certified settings no other certified one
    beats in layers and answers changed, the chosen one and the first setting each rule could not certify."""
    rows, certified = report["rows"], "certificate" in report
    if certified:
        front = {id(r) for r in _front([r for r in rows if r["certified"]])}
        shown = [r for r in rows if id(r) in front or r["chosen"] or r["first_failure"]]
    else:
        shown = [r for r in rows if r["pareto"]]
    scored = "score" in rows[0]["choose"]
    head = ["Criterion", "Setting"] + (["p-value", "certified"] if certified else [])
    for half in ("choose", "held out"):
        head += ([f"score ({half})"] if scored else []) + [f"changed % ({half})", f"avg. layer ({half})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(shown, key=lambda r: r["choose"]["avg_exit_layer"]):
        cells = [row["criterion"], row["setting"] + (" **(chosen)**" if row["chosen"] else "")]
        if certified:
            cells += [
                "—" if row.get("p_value") is None else f"{row['p_value']:.3g}",
                "yes" if row["certified"] else "no",
            ]
        for half in ("choose", "report"):
            numbers = row[half]
            cells += ([f"{numbers['score']:.1f}"] if scored else []) + [
                f"{numbers['disagreement']:.1f}",
                f"{numbers['avg_exit_layer']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
