"""What the benchmark scripts share: paths, flags, reports (provenance, JSON + Markdown), tables, data, timing.

The scripts run against the installed `pabee` (`python benchmarks/<script>.py`, which puts this folder on
`sys.path`). `python benchmarks/common.py --check` re-renders every committed results .md that a script renders
from its .json and compares them byte for byte.
"""

import argparse
import fnmatch
import importlib
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GLUE_DIR = os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue"))

# --- flags and reports ---------------------------------------------------------------------------------------------


def parser(doc: str, output: str, *, model: str | None = None, rounds: int | None = None):
    """The flags every script has: --glue_dir, --threads, --output (a results stem), --render_only; --model
    (TASK=FOLDER, repeatable, when `model` is None; else one folder, `model` the default); --rounds if given."""
    out = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is None:
        out.add_argument("--model", action="append", default=[], help="TASK=FOLDER, e.g. MRPC=runs/mrpc.")
    else:
        out.add_argument("--model", default=model, help="A fine-tuned PABEE folder (or a `pabee export` folder).")
    out.add_argument("--glue_dir", default=GLUE_DIR, help="GLUE data (default: $GLUE_DIR).")
    out.add_argument("--threads", type=int, default=2, help="Torch (and ONNX Runtime) threads.")
    if rounds is not None:
        out.add_argument("--rounds", type=int, default=rounds, help="Interleaved rounds.")
    out.add_argument("--output", default=str(RESULTS / output), help="Results stem: writes .json and .md.")
    out.add_argument("--render_only", action="store_true", help="Re-render --output.md from --output.json.")
    return out


def task_models(args: argparse.Namespace) -> dict[str, str]:
    """--model TASK=FOLDER flags as {task: folder}."""
    if not args.model or not all("=" in item for item in args.model):
        raise SystemExit("give each model as --model TASK=FOLDER, e.g. --model MRPC=runs/mrpc")
    return dict(item.split("=", 1) for item in args.model)


def report(**fields: Any) -> dict[str, Any]:
    """A results report: `fields`, then the provenance (command, date, versions, hardware) under "provenance"."""
    from pabee.provenance import provenance

    extra = fields.pop("provenance", {})
    return {**fields, "provenance": provenance(**extra)}


def write_report(args, measure: Callable[[Any], dict], render: Callable[[dict], str]) -> dict:
    """Measure (or, with --render_only, read --output.json), write the JSON and its rendered Markdown, print it."""
    from pabee.provenance import write_atomic, write_json

    stem = Path(args.output)
    if args.render_only:
        data = json.loads(stem.with_suffix(".json").read_text())
    else:
        data = measure(args)
        write_json(stem.with_suffix(".json"), data)
    text = render(data)
    write_atomic(stem.with_suffix(".md"), text)
    print(text)
    return data


def heading(title: str, provenance: dict, setup: str) -> list[str]:
    """A report's first lines: its title, the command that made it, then date, `CPU (flags)` and `setup`."""
    hw = provenance["hardware"]
    machine = f"{provenance['date']}; {hw.get('cpu')} ({', '.join(hw.get('cpu_flags', []))}); "
    return [f"# {title}", "", f"`{provenance['command']}`  ", machine + setup, ""]


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines: the header, `|---|` separators, one line per row of cells."""
    return [row(head), "|" + "---|" * len(head), *(row(cells) for cells in rows)]


def row(cells: list[Any]) -> str:
    """One Markdown table row (an empty cell is one space)."""
    return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"


# --- data ----------------------------------------------------------------------------------------------------------


def glue_split(task_name: str, glue_dir: str, split: str = "dev") -> tuple[list[tuple[str, str | None]], Any]:
    """Examples `(text, text_pair or None)` and labels (numpy) of a GLUE split, read strictly: `train`, `dev` (the
    task's first evaluation split) or `test` (its first test split, unlabelled: labels None)."""
    import numpy as np

    from pabee.glue import get_task, read_glue_tsv, task_dir

    task = get_task(task_name)
    splits = {"dev": task.eval_splits, "test": task.test_splits}
    filename = splits[split][0].filename if split in splits else "train.tsv"
    rows = read_glue_tsv(task, task_dir(task, glue_dir) / filename, test=split == "test")
    labels = None if split == "test" else np.asarray([r["label"] for r in rows])
    return [(r["text"], r.get("text_pair")) for r in rows], labels


def sst2_sentences(glue_dir: str) -> list[str]:
    """The SST-2 dev sentences (what the server benchmarks send, one per request)."""
    return [text for text, _ in glue_split("SST-2", glue_dir)[0]]


def features(tokenizer: Any, examples: list[tuple[str, str | None]], max_length: int = 128) -> list[dict]:
    """Unpadded single examples `{name: LongTensor[len]}`, as `pabee.bench.make_batches` takes them."""
    import torch

    encoded = [tokenizer(text, pair, truncation=True, max_length=max_length) for text, pair in examples]
    return [{name: torch.tensor(values) for name, values in e.items()} for e in encoded]


# --- timing --------------------------------------------------------------------------------------------------------


def time_passes(variants: dict[str, Callable], data: list[dict], rounds: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds of one pass over `data` by variant and round, through `pabee.bench.time_variants` (a shuffled order
    every round, after one warm-up round)."""
    import torch

    from pabee.bench import time_variants

    def over(forward: Callable) -> Callable[[Any], None]:
        def run(_: Any) -> None:
            with torch.inference_mode():
                for batch in data:
                    forward(batch)

        return run

    timings = time_variants({name: over(f) for name, f in variants.items()}, rounds, 1, seed)
    return {name: t.passes for name, t in timings.items()}


def quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return {"median": median, "q1": q1, "q3": q3}


def ratios(seconds: dict[str, list[float]], base: str, variant: str) -> list[float]:
    """Per round: the baseline's seconds over the variant's (the variant's speed-up)."""
    return [b / v for b, v in zip(seconds[base], seconds[variant], strict=True)]


# --- the re-render check -------------------------------------------------------------------------------------------

RENDERED = {  # results stems (glob) → the script whose `render` makes their .md from their .json
    "runtime_speed*": "runtime_speed",
    "adaptive_serving*": "adaptive_serving",
    "serve_sst2*": "load_test",
    "glue_v3": "reproduce_glue_v3",
    "add_exits*": "add_exits",
}


def check(results: Path = RESULTS) -> int:
    """Re-render every committed .md that a script renders from its .json; 0 when all are byte-identical."""
    failed = 0
    for path in sorted(results.glob("*.json")):
        scripts = [script for pattern, script in RENDERED.items() if fnmatch.fnmatch(path.stem, pattern)]
        if not scripts:
            continue
        module, stem = importlib.import_module(scripts[0]), path.with_suffix("")
        text = module.render(json.loads(path.read_text()))
        same = text == stem.with_suffix(".md").read_text()
        failed += not same
        print(f"{'identical' if same else 'DIFFERENT'}  {stem.name}.md  ({scripts[0]}.render)")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1:] != ["--check"]:
        sys.exit("usage: python benchmarks/common.py --check")
    sys.exit(check())
