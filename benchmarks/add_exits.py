"""Exits for the model a user already has: `pabee add-exits` on plainly fine-tuned classifiers, measured.

Per pair: the backbone fine-tuned as a user would (transformers' Trainer, `*ForSequenceClassification`, lr 5e-5,
batch 32, seed 42; MiniLM 3 epochs, SST-2 1; MPNet 1 epoch, SST-2 on its first 8,000 sentences), then `pabee
add-exits` with its defaults on the same training texts. Then, with the GLUE dev set as the reporting data (never
used to choose):

- full depth against the original model on every dev example: largest logit difference, answers that differ;
- the fastest setting (patience 1..L-1, confidence 0.5..0.99) certified at <= 1% and <= 2% disagreement with the
  original (delta 0.05, Learn then Test) on all of the task's unlabelled test texts; on dev its mean layers, layer
  speed-up, disagreement and metric, and its measured speed-up at batch 32 (length-sorted dev batches, interleaved
  rounds, median and quartiles) on torch (over the same model at full depth) and on ONNX Runtime int8 (over the
  whole graph optimized by onnxruntime's transformer optimizer and quantized, what a user deploys without pabee);
- (a) the frozen model truncated at layer k with a head trained the same way (its exit used alone, static k), at the
  adaptive setting's mean layers (linear between the two nearest k: the mix of two static models that has exactly
  those mean layers): score and disagreement;
- (b) with --student: the plain model's first k layers (k: the <= 2% setting's mean layers, rounded), every weight
  trained, distilled from the full model on the same texts with the same schedule;
- wall time of the plain fine-tuning, of add-exits (the pass over the texts and the exits' training) and of (b);
- (c) with --joint PAIR=FOLDER (e.g. MiniLM:MRPC=runs/mrpc, a `pabee run-glue` output on the same task and
  backbone), into add_exits_joint.{json,md}: PABEE trained jointly, against this script's add_exits.json. On dev,
  its full-depth score and the best score any candidate setting reaches within each certified setting's mean
  layers (chosen on dev itself, so an upper bound for the joint model), and its training wall time.

Resumable: each pair's models and result stay in --work; a finished pair is not run again.

    python benchmarks/add_exits.py --task MRPC --task SST-2 --task MPNet:SST-2 --task CoLA --task RTE \\
        --task STS-B --student MRPC --threads 2 --rounds 5
"""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
import runtime_speed
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

from pabee import ExitSpec, ExitSweep, bundled_model_path, load_runtime
from pabee.bench import make_batches
from pabee.calibrate import answers_of, choose_from, setting_rows
from pabee.certify import Guarantee, risk_losses
from pabee.evaluate import exit_answers
from pabee.glue import get_task
from pabee.losses import distillation_loss, label_loss
from pabee.metrics import compute_metrics, predictions_from_logits, task_score
from pabee.pipeline import PabeePipeline
from pabee.provenance import write_json

EPOCHS = {"SST-2": 1.0}  # others: 3
# MPNet costs ~5.7x MiniLM a step: its plain fine-tuning runs one epoch, on SST-2 over its first 8,000 sentences.
MPNET = {"epochs": 1.0, "examples": {"SST-2": 8000}}


@dataclass
class Pair:
    """A backbone × task: where its models live and how its plain classifier is fine-tuned."""

    model: str
    task: str
    backbone: str
    folder: Path
    epochs: float
    examples: int | None = None

    @classmethod
    def parse(cls, text: str, args) -> "Pair":
        model, _, task = text.rpartition(":")
        if model in ("", "MiniLM"):
            return cls("MiniLM", task, str(bundled_model_path()), Path(args.work) / task, EPOCHS.get(task, 3.0))
        if model != "MPNet":
            raise SystemExit(f"--task {text}: the models are MiniLM and MPNet")
        examples = MPNET["examples"].get(task)
        return cls(model, task, args.mpnet, Path(args.work) / f"MPNet-{task}", MPNET["epochs"], examples)


BOUNDS = (0.01, 0.02)
CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def train_data(pair: Pair, glue_dir: str, tokenizer, teacher: Path | None = None):
    """The pair's training texts (its first `examples`, if set), tokenized, with labels and, given a `teacher`
    folder, that classifier's logits on them."""
    import datasets

    examples, labels = common.glue_split(pair.task, glue_dir, "train")
    examples, labels = examples[: pair.examples], labels[: pair.examples]
    pairs = [p for _, p in examples] if get_task(pair.task).is_pair else None
    encoded = tokenizer([t for t, _ in examples], pairs, truncation=True, max_length=128)
    logits = {} if teacher is None else {"teacher": original_logits(teacher, examples).tolist()}
    return datasets.Dataset.from_dict({**encoded, "labels": labels.tolist(), **logits})


def finetune(pair: Pair, glue_dir: str) -> float:
    """The plain classifier a user has: the backbone fine-tuned with Trainer; returns its wall time in seconds."""
    from transformers import DataCollatorWithPadding, Trainer

    folder = pair.folder
    tokenizer = AutoTokenizer.from_pretrained(pair.backbone)
    data = train_data(pair, glue_dir, tokenizer)
    num_labels = get_task(pair.task).num_labels
    model = AutoModelForSequenceClassification.from_pretrained(pair.backbone, num_labels=num_labels)
    args = training_arguments(folder / "trainer", pair.epochs)
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    seconds = time.perf_counter() - started
    model.save_pretrained(folder / "plain")
    tokenizer.save_pretrained(folder / "plain")
    write_json(folder / "finetune.json", {"seconds": seconds})
    return seconds


def student(pair: Pair, glue_dir: str, layers: int) -> dict:
    """(b) The plain model's first `layers` layers, every weight trainable, distilled from the full model on the
    same train texts with the exits' loss (KL at T=2 + 0.5 x the label loss) and the plain fine-tuning's schedule;
    its dev score and wall time (the teacher's pass over the texts included)."""
    from transformers import DataCollatorWithPadding, Trainer

    task, folder = get_task(pair.task), pair.folder
    problem = "regression" if task.is_regression else "single_label_classification"
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder / "plain")
    data = train_data(pair, glue_dir, tokenizer, teacher=folder / "plain")

    class Distil(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets, gold = inputs.pop("teacher"), inputs.pop("labels")
            logits = model(**inputs).logits
            loss = distillation_loss(problem, logits, targets, 2.0) + 0.5 * label_loss(problem, logits, gold)
            return (loss, logits) if return_outputs else loss

    model = AutoModelForSequenceClassification.from_pretrained(folder / "plain", num_hidden_layers=layers)
    args = training_arguments(folder / "student_trainer", pair.epochs)
    args.remove_unused_columns = False
    Distil(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    seconds = time.perf_counter() - started
    model.save_pretrained(folder / f"student{layers}")
    tokenizer.save_pretrained(folder / f"student{layers}")
    dev, dev_labels = common.glue_split(pair.task, glue_dir)
    logits = original_logits(folder / f"student{layers}", dev).numpy()
    predictions = predictions_from_logits(logits, task.is_regression)
    score = task_score(compute_metrics(task.metrics, predictions, dev_labels), task.metrics)
    theirs = predictions_from_logits(original_logits(folder / "plain", dev).numpy(), task.is_regression)
    threshold = json.loads((folder / "exits" / "config.json").read_text()).get("regression_threshold", 0.0)
    changed = risk_losses(predictions, theirs, None, "disagreement", threshold, task.is_regression)  # as dev_row
    return {"layers": layers, "score": score, "seconds": seconds, "disagreement": 100 * float(changed.mean())}


def training_arguments(output_dir: Path, epochs: float):
    """The plain fine-tuning's schedule (what a user runs), shared by the student."""
    return TrainingArguments(output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=32,
                             learning_rate=5e-5, seed=42, save_strategy="no", report_to=[],
                             logging_steps=200)  # fmt: skip


def add_exits(pair: Pair, glue_dir: str, pooling: str = "mean") -> dict:
    """`pabee add-exits` on the pair's train split (the same texts the plain fine-tuning saw), its defaults but
    `pooling`, what the new exits read."""
    from pabee.cli import main

    record = pair.folder / "exits" / "add_exits.json"
    if record.is_file():
        return json.loads(record.read_text())
    argv = ["add-exits", "--model", str(pair.folder / "plain"), "--output_dir", str(pair.folder / "exits"),
            "--task_name", pair.task, "--data_dir", f"{glue_dir}/{pair.task}"]  # fmt: skip
    if pair.examples:
        argv += ["--max_examples", str(pair.examples)]
    argv += ["--pooling", pooling] if pooling != "mean" else []
    if main(argv) != 0:
        raise SystemExit(f"add-exits failed on {pair.model} {pair.task}")
    return json.loads(record.read_text())


def original_logits(folder: Path, examples: list) -> torch.Tensor:
    """The plain classifier's own logits, through transformers alone."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = []
    with torch.inference_mode():
        for start in range(0, len(examples), 64):
            chunk = examples[start : start + 64]
            pairs = [p for _, p in chunk] if chunk[0][1] is not None else None
            batch = tokenizer([t for t, _ in chunk], pairs, padding=True, truncation=True, max_length=128,
                              return_tensors="pt")  # fmt: skip
            out.append(model(**batch).logits)
    return torch.cat(out)


def candidates(model, fine: bool = False) -> list[ExitSpec]:
    """Patience 0..L-1 and confidence on CONFIDENCES, or on pabee's certification grid (`fine`)."""
    rules = ("patience",) if model.config.is_regression else ("patience", "confidence")
    sweep = ExitSweep(rules, tuple(range(model.num_layers)), {} if fine else {"confidence": CONFIDENCES})
    sweep = sweep.for_certifying() if fine else sweep
    return [spec for items in sweep.specs(model.num_layers).values() for spec in items]


def certified(model, task, test_logits: np.ndarray) -> dict[float, ExitSpec]:
    """Per bound, the fastest setting certified on all the test texts to change at most that share of the answers."""
    answers = answers_of(model, test_logits, candidates(model, fine=True))  # read and scored once for both bounds
    halves = dict.fromkeys(("choose", "report"), np.arange(len(test_logits)))
    rows = setting_rows(model, task, answers, None, halves)
    chosen = {}
    for bound in BOUNDS:
        result = choose_from(model, task, answers, None, halves, 0.0, Guarantee("disagreement", bound, 0.95), rows)
        chosen[bound] = next(row["spec"] for row in result["rows"] if row["chosen"])
    return chosen


def dev_row(model, task, dev_logits: torch.Tensor, labels: np.ndarray, spec: ExitSpec, full: np.ndarray) -> dict:
    predictions, exits = exit_answers(model, dev_logits, spec)
    config = model.config  # a changed answer, as certification counts it
    changed = risk_losses(predictions, full, None, "disagreement", config.regression_threshold, config.is_regression)
    layers = float(exits.mean())
    score = task_score(compute_metrics(task.metrics, predictions, labels), task.metrics)
    return {"setting": f"{spec.criterion} {spec.label}", "mean_layers": layers, "score": score,
            "disagreement": 100 * float(changed.mean()), "layer_speed_up": model.num_layers / layers}  # fmt: skip


def static_at(static: list[float], layers: float) -> float:
    """The score of the mix of the two static truncations nearest `layers` that uses exactly `layers` on average."""
    low = int(np.floor(layers))
    if low >= len(static):
        return static[-1]
    share = layers - low
    return (1 - share) * static[low - 1] + share * static[low] if low >= 1 else static[0]


def export_int8(folder: Path, work: Path) -> None:
    """The int8 export and the int8 whole graph, in a process of their own: onnxruntime's optimizer opens sessions
    with their own threads, which ONNX Runtime refuses once an earlier pair's timing made the process-wide pool."""
    code = (
        "import sys; from pathlib import Path; from pabee.onnx_export import export_full_model, export_onnx; "
        "folder, work = Path(sys.argv[1]), Path(sys.argv[2]); "
        "export_onnx(folder, work / 'int8', quantize='int8', require_optimized=True); "
        "export_full_model(folder, work / 'whole.onnx', 'int8', require_optimized=True)"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), str(work)], check=True)


def speed(folder: Path, specs: dict[str, ExitSpec], examples: list, tokenizer, threads: int, rounds: int) -> dict:
    """Measured speed-up of each setting at batch 32, all timed interleaved: on torch over the same model at full
    depth, on ORT int8 over the whole graph optimized and quantized (what a user deploys without pabee)."""
    features = common.features(tokenizer, examples)
    batches = make_batches(features, 32, tokenizer.pad_token_id or 0, True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_int8(folder, work)
        torch_model, ort_model = load_runtime(folder), load_runtime(work / "int8", threads=threads)
        variants = {
            "torch full": runtime_speed.engine(torch_model, ExitSpec("patience", patience=0)),
            "ORT int8 whole graph": runtime_speed.WholeGraph(work / "whole.onnx", threads),
        }
        for name, spec in specs.items():
            variants[f"torch {name}"] = runtime_speed.engine(torch_model, spec)
            variants[f"ORT int8 {name}"] = runtime_speed.engine(ort_model, spec)
        seconds = common.time_passes(variants, batches, rounds)
    return {
        name: {
            "torch": common.quartiles(common.ratios(seconds, "torch full", f"torch {name}")),
            "ORT int8": common.quartiles(common.ratios(seconds, "ORT int8 whole graph", f"ORT int8 {name}")),
        }
        for name in specs
    }


def measure_task(text: str, args) -> dict:
    pair = Pair.parse(text, args)
    done = pair.folder / "result.json"
    if not done.is_file():
        write_json(done, evaluate_task(pair, args))  # kept before the student's training, which may be cut short
    result = json.loads(done.read_text())
    if args.regrid and result.get("grid") != "fine":
        write_json(done, regrid(pair, args, result))
        result = json.loads(done.read_text())
    if text in args.student and "student" not in result:
        layers = min(result["layers"] - 1, max(1, round(result["certified"]["2%"]["mean_layers"])))
        result["student"] = student(pair, args.glue_dir, layers)
        result["student"]["static_score"] = result["static"][layers - 1]
    write_json(done, result)
    return result


def evaluate_task(pair: Pair, args) -> dict:
    task_name, folder = pair.task, pair.folder
    if not (folder / "plain").is_dir():
        finetune(pair, args.glue_dir)
    plain_seconds = json.loads((folder / "finetune.json").read_text())["seconds"]
    record = add_exits(pair, args.glue_dir, args.pooling)
    task = get_task(task_name)
    pipe, (dev_logits, labels, full), test_logits = dev_and_test(pair, args.glue_dir)
    model = pipe.model
    reference = original_logits(folder / "plain", common.glue_split(task_name, args.glue_dir)[0])
    cuts = [dev_row(model, task, dev_logits, labels, ExitSpec("static", threshold=k), full)
            for k in range(1, model.num_layers + 1)]  # fmt: skip
    statics, static_changed = [c["score"] for c in cuts], [c["disagreement"] for c in cuts]
    result = {
        "task": task_name, "model": pair.model, "layers": model.num_layers, "epochs": pair.epochs,
        "train_examples": record["data"]["examples"],
        "seconds": {"plain_finetune": plain_seconds, **record["seconds"]},
        "full_depth": {"max_logit_diff": float((dev_logits[:, -1] - reference).abs().max()),
                       "answers_differ": answers_differ(model, full, reference)},
        "static": statics, "static_disagreement": static_changed, "test_texts": len(test_logits), "grid": "fine",
    }  # fmt: skip
    result["certified"] = certify_and_time(pair, args, pipe, (dev_logits, labels, full), test_logits, result)
    return result


def dev_and_test(pair: Pair, glue_dir: str) -> tuple:
    """The exits model's pipeline, every layer's dev logits, dev labels, full-depth dev answers, and every layer's
    logits on the test texts (never seen, unlabelled: what certifies)."""
    pipe = PabeePipeline.from_pretrained(pair.folder / "exits", backend="torch", batch_size=64)
    examples, labels = common.glue_split(pair.task, glue_dir)
    dev_logits = pipe.all_layer_logits(examples)
    full = exit_answers(pipe.model, dev_logits, ExitSpec("patience", patience=0))[0]
    return pipe, (dev_logits, labels, full), pipe.all_layer_logits(common.glue_split(pair.task, glue_dir, "test")[0])


def certify_and_time(pair: Pair, args, pipe, dev: tuple, test_logits: torch.Tensor, result: dict) -> dict:
    """Per bound, the certified setting (pabee's certification grid) on dev, beside static truncation at its mean
    layers, and its measured speed-up."""
    model, task, (dev_logits, labels, full) = pipe.model, get_task(pair.task), dev
    rows, specs = {}, {}
    for bound, spec in certified(model, task, test_logits.numpy()).items():
        row = rows[f"{bound:.0%}"] = dev_row(model, task, dev_logits, labels, spec, full)
        row["static_score"] = static_at(result["static"], row["mean_layers"])
        row["static_disagreement"] = static_at(result["static_disagreement"], row["mean_layers"])
        if not spec.is_full_model:
            specs[f"{bound:.0%}"] = spec
    examples = common.glue_split(pair.task, args.glue_dir)[0]
    timed = speed(pair.folder / "exits", specs, examples, pipe.tokenizer, args.threads, args.rounds) if specs else {}
    for name, row in rows.items():
        row["speed"] = timed.get(name)
        print(f"{pair.task} <= {name}: {row}", file=sys.stderr, flush=True)
    return rows


def regrid(pair: Pair, args, result: dict) -> dict:
    """`result` certified again on pabee's certification grid; the coarse grid's rows kept as `coarse`."""
    pipe, dev, test_logits = dev_and_test(pair, args.glue_dir)
    rows = certify_and_time(pair, args, pipe, dev, test_logits, result)
    return {**result, "coarse": result["certified"], "certified": rows, "grid": "fine"}


def answers_differ(model, full: np.ndarray, reference: torch.Tensor) -> int:
    theirs = predictions_from_logits(reference.numpy(), model.config.is_regression)
    return int((np.abs(full - theirs) > 1e-5).sum()) if model.config.is_regression else int((full != theirs).sum())


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    tasks = [measure_task(name, args) for name in args.task]
    pooling = {"pooling": args.pooling} if args.pooling != "mean" else {}
    return common.report(tasks=tasks, **pooling, provenance={"command": " ".join(["python", *sys.argv])})


def _name(t: dict) -> str:
    return f"{t['model']} {t['task']}"


def _ratio(cell: dict | None) -> str:
    return "—" if cell is None else f"{cell['median']:.2f}x ({cell['q1']:.2f}–{cell['q3']:.2f})"


def _certified_rows(tasks: list[dict]) -> list[list]:
    rows = []
    for t in tasks:
        for bound, r in t["certified"].items():
            speed = r.get("speed") or {}
            ort = speed.get("ORT int8")
            share = f"{ort['median'] / r['layer_speed_up']:.2f}" if ort else "—"
            rows.append([_name(t), f"≤ {bound}", r["setting"], f"{r['mean_layers']:.2f} ({r['layer_speed_up']:.2f}x)",
                         _ratio(speed.get("torch")), _ratio(ort), share, f"{r['disagreement']:.1f}%",
                         f"{r['score']:.1f} ({t['static'][-1]:.1f})", f"{r['static_score']:.1f}",
                         f"{r['score'] - r['static_score']:+.2f}", f"{r['static_disagreement']:.1f}%"])  # fmt: skip
    return rows


def _cost(t: dict) -> float:
    """add-exits' wall time over the plain fine-tuning's."""
    return (t["seconds"]["states"] + t["seconds"]["training"]) / t["seconds"]["plain_finetune"]


def _targets(tasks: list[dict]) -> list[str]:
    exact = all(t["full_depth"]["max_logit_diff"] <= 1e-5 and not t["full_depth"]["answers_differ"] for t in tasks)
    lines = [f"- Full depth equals the original on every dev example of every task: {'met' if exact else 'missed'}."]
    for t in tasks:
        r = t["certified"]["2%"]
        ort = (r.get("speed") or {}).get("ORT int8")
        share = "no setting to time"
        if ort:
            share = f"{ort['median']:.2f}x measured on ORT int8, {ort['median'] / r['layer_speed_up']:.2f} of it"
        goal = {"MiniLM SST-2": " (target 1.8x)", "MPNet SST-2": " (target 2.2x)"}.get(_name(t), "")
        lines.append(f"- {_name(t)} at ≤ 2%: {r['layer_speed_up']:.2f}x fewer layers{goal}; {share} (target 0.9).")
    wins = [_name(t) for t in tasks if t["certified"]["2%"]["score"] - t["certified"]["2%"]["static_score"] >= 1.0]
    lines.append(
        f"- Adaptive (≤ 2%) beats static truncation at equal mean layers by ≥ 1 point on {len(wins)} of "
        f"{len(tasks)} pairs ({', '.join(wins) or 'none'}; target: 5 of 7)."
    )
    costs = ", ".join(f"{_name(t)} {100 * _cost(t):.0f}%" for t in tasks)
    lines.append(f"- add-exits' wall time over the plain fine-tuning's (target ≤ 20%): {costs}.")
    return lines  # fmt: skip


def _cost_row(t: dict) -> list:
    seconds = t["seconds"]
    both = f"{seconds['states']:.0f} + {seconds['training']:.0f} s"
    epochs = t["epochs"]
    plain = f"{seconds['plain_finetune']:.0f} s ({epochs:g} epoch{'s' if epochs != 1 else ''})"
    return [_name(t), t["train_examples"], plain, both, f"{100 * _cost(t):.0f}%"]


CERTIFIED_HEAD = ["Task", "Bound", "Setting", "Mean layers", "torch", "ORT int8", "Share", "Disagreement",
                  "Score (full)", "Static", "Adaptive − static", "Static disagreement"]  # fmt: skip
CERTIFIED_NOTE = (
    "Speed-up at batch 32 over dev, median of the rounds (quartiles): torch over the same model at full depth; ORT "
    "int8 over the whole graph optimized and quantized. Share: ORT's measured speed-up over the layer speed-up. "
    "Static: the frozen model cut at layer k with its exit (trained alike), mixed between the two nearest k so as "
    "to use the same mean layers: its score, and the share of the original's answers it changes."
)


def _grid_line(tasks: list[dict]) -> str:
    """Which settings were certified among, and what the coarse grid chose where a pair was certified on both."""
    coarse = f"confidence {', '.join(f'{c:g}' for c in CONFIDENCES)}"
    if not any(t.get("grid") == "fine" for t in tasks):
        return f"Certified among patience 1..L-1 and {coarse}."
    line = ("Certified among patience 1..L-1 and confidence 0.50, 0.51, ..., 0.99, 0.995 (`pabee calibrate`'s "
            "certification grid: fixed-sequence testing spends no confidence on its length).")  # fmt: skip
    before = [f"{_name(t)} {r['setting']}, {r['layer_speed_up']:.2f}x fewer layers, {r['disagreement']:.1f}% changed"
              for t in tasks if "coarse" in t for r in [t["coarse"]["2%"]]]  # fmt: skip
    return line + (f" On the coarse grid ({coarse}) ≤ 2% chose: {'; '.join(before)}." if before else "")


def _student_rows(tasks: list[dict]) -> list[list]:
    return [[_name(t), t["student"]["layers"], f"{t['student']['score']:.1f}", f"{t['student']['static_score']:.1f}",
             f"{t['certified']['2%']['score']:.1f} ({t['certified']['2%']['mean_layers']:.2f})",
             f"{t['student']['disagreement']:.1f}%" if "disagreement" in t["student"] else "—",  # since 2026-12-08
             f"{t['certified']['2%']['disagreement']:.1f}%", f"{t['student']['seconds']:.0f} s"]
            for t in tasks if "student" in t]  # fmt: skip


def render(report: dict) -> str:
    if "joint" in report:
        return render_joint(report)
    tasks = report["tasks"]
    setup = "MiniLM (6 layers) and MPNet (12) fine-tuned with Trainer, then `pabee add-exits`; GLUE dev reports."
    if "pooling" in report:
        setup = setup.replace("add-exits`", f"add-exits --pooling {report['pooling']}` (exits on that pooling)")
    lines = common.heading("Exits for the model you already have (`pabee add-exits`)", report["provenance"], setup)
    lines += ["## Targets", "", *_targets(tasks), "", "## Full depth against the original model (GLUE dev)", ""]
    lines += common.table(["Task", "Largest logit difference", "Answers that differ"],
                          [[_name(t), f"{t['full_depth']['max_logit_diff']:.1e}", t["full_depth"]["answers_differ"]]
                           for t in tasks])  # fmt: skip
    lines += [
        "",
        "## Certified settings (on the unlabelled test texts, δ 0.05), reported on dev",
        "",
        CERTIFIED_NOTE,
        "",
    ]
    lines += common.table(CERTIFIED_HEAD, _certified_rows(tasks))
    lines += ["", _grid_line(tasks)]
    lines += ["", "## Wall time", ""]
    lines += common.table(["Task", "Train texts", "Plain fine-tuning", "add-exits: states + training", "Share"],
                          [_cost_row(t) for t in tasks])  # fmt: skip
    if _student_rows(tasks):
        lines += [
            "",
            "## Against a student: the first k layers distilled from the full model, every weight trained",
            "",
        ]
        lines += common.table(["Task", "k", "Student", "Static k (frozen)", "Adaptive ≤ 2% (mean layers)",
                               "Student's answers changed", "Adaptive's", "Student wall time"],
                              _student_rows(tasks))  # fmt: skip
    statics = "; ".join(f"{_name(t)} " + " / ".join(f"{x:.1f}" for x in t["static"]) for t in tasks)
    return "\n".join([*lines, "", f"Static scores at k = 1, 2, ... (dev): {statics}."]) + "\n"


def measure_joint(args) -> dict:
    """(c): each --joint PAIR=FOLDER against the add-exits result of that pair (add_exits.json)."""
    torch.set_num_threads(args.threads)
    done = {_name(t): t for t in json.loads((common.RESULTS / "add_exits.json").read_text())["tasks"]}
    pairs = []
    for item in args.joint:
        pair, _, folder = item.partition("=")
        name = pair.replace(":", " ") if ":" in pair else f"MiniLM {pair}"
        if name not in done or not folder:
            raise SystemExit(f"--joint {item}: give PAIR=FOLDER for a pair of add_exits.json ({', '.join(done)})")
        pairs.append(joint_pair(name, folder, done[name], args.glue_dir))
    return common.report(joint=pairs, provenance={"command": " ".join(["python", *sys.argv])})


def joint_pair(name: str, folder: str, added: dict, glue_dir: str) -> dict:
    pipe = PabeePipeline.from_pretrained(folder, backend="torch", batch_size=64)
    model, task = pipe.model, get_task(added["task"])
    examples, labels = common.glue_split(added["task"], glue_dir)
    logits = pipe.all_layer_logits(examples)
    full = exit_answers(model, logits, ExitSpec("patience", patience=0))[0]
    rows = [dev_row(model, task, logits, labels, spec, full) for spec in candidates(model)]  # rows[0]: full depth
    best = {}
    for bound, row in added["certified"].items():
        within = [r for r in rows if r["mean_layers"] <= row["mean_layers"] + 1e-9]
        best[bound] = max(within, key=lambda r: r["score"]) if within else None
    training = json.loads((Path(folder) / "eval_results.json").read_text())["training"]
    return {"pair": name, "folder": folder, "full": rows[0]["score"], "best": best, "added": added,
            "seconds": training["train_runtime"], "examples": training["train_samples"],
            "epochs": training["epoch"]}  # fmt: skip


def _joint_row(j: dict, bound: str) -> list:
    added, best = j["added"], j["best"][bound]
    mine = added["certified"][bound]
    theirs = "—" if best is None else f"{best['score']:.1f} ({best['setting']}, {best['mean_layers']:.2f})"
    gap = "—" if best is None else f"{mine['score'] - best['score']:+.1f}"
    seconds = added["seconds"]
    ours = seconds["plain_finetune"] + seconds["states"] + seconds["training"]
    return [j["pair"], f"≤ {bound}", f"{mine['score']:.1f} ({mine['setting']}, {mine['mean_layers']:.2f})", theirs,
            gap, f"{added['static'][-1]:.1f} / {j['full']:.1f}",
            f"{added['train_examples']} × {added['epochs']:g}, {ours:.0f} s",
            f"{j['examples']} × {j['epochs']:g}, {j['seconds']:.0f} s"]  # fmt: skip


def render_joint(report: dict) -> str:
    setup = "PABEE trained jointly by `pabee run-glue` against `pabee add-exits` on a plainly fine-tuned model."
    lines = common.heading("add-exits against PABEE trained jointly (GLUE dev)", report["provenance"], setup)
    lines += [
        "add-exits: the certified setting of add_exits.json (chosen on unlabelled test texts), its dev score and "
        "mean layers. Joint: the best dev score of any patience (1..L-1) or confidence (0.5..0.99) setting using "
        "at most those mean layers, chosen on dev itself (an upper bound for the joint model). Full depth: the "
        "plain model's / the joint model's. Training: texts × epochs, wall time (add-exits: the plain fine-tuning "
        "and add-exits; joint: run-glue's training).",
        "",
    ]
    head = ["Pair", "Bound", "add-exits (setting, layers)", "Joint at ≤ those layers", "add-exits − joint",
            "Full depth: plain / joint", "add-exits training", "Joint training"]  # fmt: skip
    rows = [_joint_row(j, bound) for j in report["joint"] for bound in j["added"]["certified"]]
    folders = "; ".join(f"{j['pair']}: `{j['folder']}`" for j in report["joint"])
    return "\n".join([*lines, *common.table(head, rows), "", f"Joint models: {folders}."]) + "\n"


def main() -> None:
    parser = common.parser(__doc__, "add_exits", rounds=5)
    parser.add_argument("--task", action="append", default=[], help="[MiniLM:|MPNet:]TASK (repeatable).")
    mpnet = Path.home() / ".cache/pabee/all-mpnet-base-v2/all-mpnet-base-v2"  # where benchmarks/fetch_mpnet.py puts it
    parser.add_argument("--mpnet", default=str(mpnet), help="all-mpnet-base-v2 (what fetch_mpnet.py prints).")
    parser.add_argument("--student", action="append", default=[], help="Tasks to train the student (b) on.")
    parser.add_argument("--work", default="runs/add_exits", help="Models and per-task results (resumable).")
    parser.add_argument("--joint", action="append", default=[], help="(c) [MiniLM:|MPNet:]TASK=RUN_GLUE_FOLDER.")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"], help="What the new exits read.")
    parser.add_argument("--regrid", action="store_true", help="Certify finished pairs again on the fine grid.")
    args = parser.parse_args()
    if args.joint and args.output == str(common.RESULTS / "add_exits"):
        args.output = str(common.RESULTS / "add_exits_joint")
    common.write_report(args, measure_joint if args.joint else measure, render)


if __name__ == "__main__":
    main()
