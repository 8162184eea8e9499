"""Exits for the model a user already has: `pabee add-exits` on plainly fine-tuned classifiers, measured.

Per task: the bundled MiniLM fine-tuned as a user would (transformers' Trainer, `BertForSequenceClassification`,
lr 5e-5, batch 32, seed 42; 3 epochs, SST-2 1), then `pabee add-exits` on the task's train split (its defaults).
Then, with the GLUE dev set as the reporting data (never used to choose):

- full depth against the original model on every dev example: largest logit difference, answers that differ;
- the fastest setting (patience 1..L-1, confidence 0.5..0.99) certified at <= 1% and <= 2% disagreement with the
  original (delta 0.05, Learn then Test) on all of the task's unlabelled test texts; on dev its mean layers, layer
  speed-up, disagreement and metric, and its measured speed-up at batch 32 (length-sorted dev batches, interleaved
  rounds, median and quartiles) on torch (over the same model at full depth) and on ONNX Runtime int8 (over the
  whole graph optimized by onnxruntime's transformer optimizer and quantized, what a user deploys without pabee);
- against the frozen model truncated at layer k with a head trained the same way (each exit used alone, static k),
  at the adaptive setting's mean layers (linear between the two nearest k: the mix of two static models that has
  exactly those mean layers);
- wall time of the plain fine-tuning and of add-exits (the pass over the texts and the exits' training).

Resumable: each task's models and result stay in --work; a finished task is not run again.

    python benchmarks/add_exits.py --task SST-2 --task MRPC --task CoLA --task RTE --task STS-B --threads 2
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import runtime_speed
import torch

from pabee import ExitSpec, bundled_model_path, load_runtime
from pabee.bench import make_batches
from pabee.calibrate import answers_of, choose_from, task_score
from pabee.certify import Guarantee
from pabee.evaluate import exit_answers
from pabee.glue import get_task
from pabee.metrics import compute_metrics
from pabee.pipeline import PabeePipeline

EPOCHS = {"SST-2": 1.0}  # others: 3
BOUNDS = (0.01, 0.02)
CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def finetune(task_name: str, glue_dir: str, folder: Path) -> float:
    """The plain classifier a user has: MiniLM fine-tuned with Trainer; returns its wall time in seconds."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    task = get_task(task_name)
    examples, labels = common.glue_split(task_name, glue_dir, "train")
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    encoded = tokenizer([t for t, _ in examples], [p for _, p in examples] if task.is_pair else None,
                        truncation=True, max_length=128)  # fmt: skip
    data = datasets.Dataset.from_dict({**encoded, "labels": labels.tolist()})
    model = AutoModelForSequenceClassification.from_pretrained(bundled_model_path(), num_labels=task.num_labels)
    args = training_arguments(folder / "trainer", task_name)
    started = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    seconds = time.perf_counter() - started
    model.save_pretrained(folder / "plain")
    tokenizer.save_pretrained(folder / "plain")
    common_dump(folder / "finetune.json", {"seconds": seconds})
    return seconds


def student(task_name: str, glue_dir: str, folder: Path, layers: int) -> dict:
    """(b) The plain model's first `layers` layers, every weight trainable, distilled from the full model on the
    same train texts with the exits' loss (KL at T=2 + 0.5 x the label loss) and the plain fine-tuning's schedule;
    its dev score and wall time (the teacher's pass over the texts included)."""
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer

    from pabee.losses import distillation_loss, label_loss

    task = get_task(task_name)
    problem = "regression" if task.is_regression else "single_label_classification"
    examples, labels = common.glue_split(task_name, glue_dir, "train")
    started = time.perf_counter()
    teacher = original_logits(folder / "plain", examples)
    tokenizer = AutoTokenizer.from_pretrained(folder / "plain")
    encoded = tokenizer([t for t, _ in examples], [p for _, p in examples] if task.is_pair else None,
                        truncation=True, max_length=128)  # fmt: skip
    data = datasets.Dataset.from_dict({**encoded, "labels": labels.tolist(), "teacher": teacher.tolist()})

    class Distil(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets, gold = inputs.pop("teacher"), inputs.pop("labels")
            logits = model(**inputs).logits
            loss = distillation_loss(problem, logits, targets, 2.0) + 0.5 * label_loss(problem, logits, gold)
            return (loss, logits) if return_outputs else loss

    model = AutoModelForSequenceClassification.from_pretrained(folder / "plain", num_hidden_layers=layers)
    args = training_arguments(folder / "student_trainer", task_name)
    args.remove_unused_columns = False
    Distil(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tokenizer)).train()
    seconds = time.perf_counter() - started
    model.save_pretrained(folder / f"student{layers}")
    tokenizer.save_pretrained(folder / f"student{layers}")
    dev, dev_labels = common.glue_split(task_name, glue_dir)
    logits = original_logits(folder / f"student{layers}", dev).numpy()
    from pabee.metrics import predictions_from_logits

    predictions = predictions_from_logits(logits, task.is_regression)
    score = task_score(compute_metrics(task.metrics, predictions, dev_labels), task.metrics)
    return {"layers": layers, "score": score, "seconds": seconds}


def training_arguments(output_dir: Path, task_name: str):
    """The plain fine-tuning's schedule (what a user runs), shared by the student."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=EPOCHS.get(task_name, 3.0),
        per_device_train_batch_size=32,
        learning_rate=5e-5,
        seed=42,
        save_strategy="no",
        report_to=[],
        logging_steps=200,
    )


def add_exits(task_name: str, glue_dir: str, folder: Path) -> dict:
    from pabee.cli import main

    argv = ["add-exits", "--model", str(folder / "plain"), "--output_dir", str(folder / "exits"),
            "--task_name", task_name, "--data_dir", f"{glue_dir}/{task_name}"]  # fmt: skip
    if main(argv) != 0:
        raise SystemExit(f"add-exits failed on {task_name}")
    return json.loads((folder / "exits" / "add_exits.json").read_text())


def test_texts(task_name: str, glue_dir: str) -> list[tuple[str, str | None]]:
    """The task's unlabelled test texts (the exits never saw them): what certification runs on."""
    from pabee.glue import read_glue_tsv, task_dir

    task = get_task(task_name)
    rows = read_glue_tsv(task, task_dir(task, glue_dir) / task.test_splits[0].filename, test=True)
    return [(row["text"], row.get("text_pair")) for row in rows]


def original_logits(folder: Path, examples: list) -> torch.Tensor:
    """The plain classifier's own logits, through transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

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


def candidates(model) -> list[ExitSpec]:
    specs = [ExitSpec("patience", patience=p) for p in range(model.num_layers)]
    if not model.config.is_regression:
        specs += [ExitSpec("confidence", threshold=t) for t in CONFIDENCES]
    return specs


def certified(model, task, test_logits: np.ndarray, bound: float) -> ExitSpec:
    """The fastest setting certified on all the test texts to change at most `bound` of the answers."""
    specs = candidates(model)
    answers = answers_of(model, test_logits, specs)
    every = np.arange(len(test_logits))
    result = choose_from(model, task, answers, None, {"choose": every, "report": every}, 0.0,
                         Guarantee("disagreement", bound, 0.95))  # fmt: skip
    return next(row["spec"] for row in result["rows"] if row["chosen"])


def dev_row(model, task, dev_logits: torch.Tensor, labels: np.ndarray, spec: ExitSpec, full: np.ndarray) -> dict:
    predictions, exits = exit_answers(model, dev_logits, spec)
    if model.config.is_regression:
        changed = np.abs(predictions - full) > model.config.regression_threshold
    else:
        changed = predictions != full
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


def speed(folder: Path, specs: dict[str, ExitSpec], examples: list, tokenizer, threads: int, rounds: int) -> dict:
    """Measured speed-up of each setting at batch 32, all timed interleaved: on torch over the same model at full
    depth, on ORT int8 over the whole graph optimized and quantized (what a user deploys without pabee)."""
    from pabee.onnx_export import export_full_model, export_onnx

    features = common.features(tokenizer, examples)
    batches = make_batches(features, 32, tokenizer.pad_token_id or 0, True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_onnx(folder, work / "int8", quantize="int8", require_optimized=True)
        export_full_model(folder, work / "whole.onnx", "int8", require_optimized=True)
        torch_model, ort_model = load_runtime(folder), load_runtime(work / "int8", threads=threads)
        variants = {
            "torch full": runtime_speed.engine(torch_model, ExitSpec("patience", patience=0)),
            "ORT int8 whole graph": runtime_speed.WholeGraph(work / "whole.onnx", threads),
        }
        for name, spec in specs.items():
            variants[f"torch {name}"] = runtime_speed.engine(torch_model, spec)
            variants[f"ORT int8 {name}"] = runtime_speed.engine(ort_model, spec)
        seconds = common.time_passes(variants, batches, rounds)
    out = {}
    for name in specs:
        out[name] = {
            "torch": common.quartiles(common.ratios(seconds, "torch full", f"torch {name}")),
            "ORT int8": common.quartiles(common.ratios(seconds, "ORT int8 whole graph", f"ORT int8 {name}")),
        }
    return out


def measure_task(task_name: str, args) -> dict:
    folder = Path(args.work) / task_name
    done = folder / "result.json"
    result = json.loads(done.read_text()) if done.is_file() else evaluate_task(task_name, folder, args)
    if task_name in args.student and "student" not in result:
        layers = min(result["layers"] - 1, max(1, round(result["certified"]["2%"]["mean_layers"])))
        result["student"] = student(task_name, args.glue_dir, folder, layers)
        result["student"]["static_score"] = result["static"][layers - 1]
    common_dump(done, result)
    return result


def evaluate_task(task_name: str, folder: Path, args) -> dict:
    if not (folder / "plain").is_dir():
        finetune(task_name, args.glue_dir, folder)
    plain_seconds = json.loads((folder / "finetune.json").read_text())["seconds"]
    record = add_exits(task_name, args.glue_dir, folder) if not (folder / "exits" / "add_exits.json").is_file() else \
        json.loads((folder / "exits" / "add_exits.json").read_text())  # fmt: skip
    task = get_task(task_name)
    examples, labels = common.glue_split(task_name, args.glue_dir)
    pipe = PabeePipeline.from_pretrained(folder / "exits", backend="torch", batch_size=64)
    model = pipe.model
    dev_logits = pipe.all_layer_logits(examples)
    test_logits = pipe.all_layer_logits(test_texts(task_name, args.glue_dir))
    reference = original_logits(folder / "plain", examples)
    full = exit_answers(model, dev_logits, ExitSpec("patience", patience=0))[0]
    statics = [dev_row(model, task, dev_logits, labels, ExitSpec("static", threshold=k), full)["score"]
               for k in range(1, model.num_layers + 1)]  # fmt: skip
    result = {
        "task": task_name, "layers": model.num_layers, "train_examples": record["data"]["examples"],
        "seconds": {"plain_finetune": plain_seconds, **record["seconds"]},
        "full_depth": {"max_logit_diff": float((dev_logits[:, -1] - reference).abs().max()),
                       "answers_differ": answers_differ(model, full, reference)},
        "static": statics, "certified": {}, "test_texts": len(test_logits),
    }  # fmt: skip
    specs = {}
    for bound in BOUNDS:
        spec = certified(model, task, test_logits.numpy(), bound)
        row = dev_row(model, task, dev_logits, labels, spec, full)
        row["static_score"] = static_at(statics, row["mean_layers"])
        result["certified"][f"{bound:.0%}"] = row
        if not spec.is_full_model:
            specs[f"{bound:.0%}"] = spec
    timed = speed(folder / "exits", specs, examples, pipe.tokenizer, args.threads, args.rounds) if specs else {}
    for name, row in result["certified"].items():
        row["speed"] = timed.get(name)
        print(f"{task_name} <= {name}: {row}", file=sys.stderr, flush=True)
    return result


def answers_differ(model, full: np.ndarray, reference: torch.Tensor) -> int:
    from pabee.metrics import predictions_from_logits

    theirs = predictions_from_logits(reference.numpy(), model.config.is_regression)
    return int((np.abs(full - theirs) > 1e-5).sum()) if model.config.is_regression else int((full != theirs).sum())


def common_dump(path: Path, data: dict) -> None:
    from pabee.provenance import write_json

    write_json(path, data)


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    tasks = [measure_task(name, args) for name in args.task]
    return common.report(tasks=tasks, provenance={"command": " ".join(["python", *sys.argv])})


def render(report: dict) -> str:
    lines = common.heading("Exits for the model you already have", report["provenance"], "MiniLM, GLUE dev")
    return "\n".join(lines) + "\n" + json.dumps(report["tasks"], indent=1) + "\n"


def main() -> None:
    parser = common.parser(__doc__, "add_exits", threads=2, rounds=5)
    parser.add_argument("--task", action="append", default=[], help="GLUE task (repeatable).")
    parser.add_argument("--student", action="append", default=[], help="Tasks to train the student (b) on.")
    parser.add_argument("--work", default="runs/add_exits", help="Models and per-task results (resumable).")
    common.write_report(parser.parse_args(), measure, render)


if __name__ == "__main__":
    main()
