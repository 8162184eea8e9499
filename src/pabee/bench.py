"""`pabee bench`: wall-clock cost of early exit against the right baselines, on the same examples and process.

Variants, interleaved in a shuffled order on every repeat after warm-up, with a fixed thread count:

- `full`: the plain encoder forward + the last classifier, batched (what a user has without PABEE);
- `early_exit`: our per-example exit inside batches;
- `early_exit_bs1`: one example at a time, unpadded (the only mode of the research code);
- `no_exit`: our engine with patience >= layers, which it recognises and runs without the early heads;
- `heads_no_exit`: our engine computing every layer's head and exit test while nobody exits, the worst case
  of the engine's own overhead (a ready `NEVER_EXIT` criterion passed to the model).

Inputs are tokenized and padded into batches before timing, so only model time is measured. The command only
calls the model's public API: `--profile` reads the engine's `pabee.*` profiler labels, nothing is patched.
"""

from __future__ import annotations

import copy
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .arguments import BenchArguments
from .backbones import attention_kernel
from .errors import PabeeError
from .modeling import PabeeForSequenceClassification, Runtime, infer
from .rules import Array, ExitCriterion, ExitTracker, as_numpy
from .settings import ExitSpec, ExitSweep

__all__ = ["NEVER_EXIT", "NeverExit", "full_forward", "make_batches", "profile_early_exit", "run_bench"]

Batch = dict[str, torch.Tensor]
Variant = Callable[["Timing"], None]

# The engine's profiler labels (`modeling.profiler_label`) → the part names of `report["profile"]`.
PROFILE_PARTS = {
    "pabee.embeddings": "embeddings",
    "pabee.attention_masks": "attention masks",
    "pabee.layers": "layers",
    "pabee.classifiers": "classifiers",
    "pabee.exit_bookkeeping": "exit bookkeeping",
    "pabee.compaction": "compaction",
}
OTHER_PART = "other (python, output writes)"


# --- the never-exit rule -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeverExit(ExitCriterion):
    """A rule that could fire but never does, so every head and exit test runs: the engine's worst case."""

    name = "never"

    def tracker(self, batch_size: int) -> ExitTracker:
        return _NeverExitTracker()


class _NeverExitTracker(ExitTracker):
    def update(self, logits: Array) -> np.ndarray:
        return as_numpy(logits).argmax(axis=-1) < 0  # the same work as a real decision, and never True

    def keep(self, rows: np.ndarray) -> None:
        pass


NEVER_EXIT = NeverExit()


# --- inputs and forwards -------------------------------------------------------------------------------------------


def make_batches(features: list[Batch], batch_size: int, pad_id: int, sort_by_length: bool) -> list[Batch]:
    """Right-padded batches from unpadded single examples (each `{name: LongTensor[len]}`)."""
    order = list(range(len(features)))
    if sort_by_length:
        order.sort(key=lambda i: len(features[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        batch = {}
        for name in chunk[0]:
            fill = pad_id if name == "input_ids" else 0
            batch[name] = torch.stack(
                [torch.nn.functional.pad(f[name], (0, width - len(f[name])), value=fill) for f in chunk]
            )
        batches.append(batch)
    return batches


def full_forward(model: Runtime, batch: Batch) -> torch.Tensor:
    """The baseline: the encoder's own forward, then the last layer's classifier (on ONNX Runtime: every layer
    session, the full model of that backend)."""
    if not isinstance(model, PabeeForSequenceClassification):
        return infer(model, batch, ExitSpec("patience", patience=0)).logits
    out = model.encoder(**batch)
    if model.config.pooling == "pooler":
        return model.classifiers[-1](out.pooler_output)
    return model.classify(model.num_layers - 1, out.last_hidden_state, batch["attention_mask"])


def _engine(model: Runtime, setting: ExitSpec | ExitCriterion) -> Callable[[Batch], Any]:
    """Our forward with one exit setting: a spec, or a ready criterion (`NEVER_EXIT`) used as it is."""
    return lambda batch: infer(model, batch, setting)


# --- timing ------------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of each timed pass, and per-example latencies for the batch-size-1 loop."""

    passes: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _summary(timing: Timing, examples: int) -> dict[str, float]:
    median = statistics.median(timing.passes)
    out = {
        "examples": examples,
        "seconds_median": median,
        "seconds_min": min(timing.passes),
        "seconds_max": max(timing.passes),
        "spread_pct": 100 * (max(timing.passes) - min(timing.passes)) / median,
        "examples_per_s": examples / median,
    }
    if timing.latencies:
        out.update({f"latency_p{q}_ms": 1000 * _percentile(timing.latencies, q) for q in (50, 90, 99)})
    return out


def time_variants(variants: dict[str, Variant], repeats: int, warmup: int, seed: int) -> dict[str, Timing]:
    """Run every variant `warmup + repeats` times, in a fresh shuffled order each round (drift hits all alike)."""
    timings = {name: Timing() for name in variants}
    rng = random.Random(seed)
    progress = tqdm(total=(warmup + repeats) * len(variants), desc="Timing", unit="pass", leave=False)
    for round_ in range(warmup + repeats):
        order = list(variants)
        rng.shuffle(order)
        for name in order:
            progress.update()
            scratch = Timing()
            start = time.perf_counter()
            variants[name](scratch)
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                timings[name].passes.append(elapsed)
                timings[name].latencies.extend(scratch.latencies)
    progress.close()
    return timings


def _over_batches(forward: Callable[[Batch], Any], batches: list[Batch]) -> Variant:
    def run(_: Timing) -> None:
        with torch.inference_mode():
            for batch in batches:
                forward(batch)

    return run


def _one_by_one(forward: Callable[[Batch], Any], singles: list[Batch]) -> Variant:
    """One example at a time, each one's latency recorded (the research code's only mode)."""

    def run(timing: Timing) -> None:
        with torch.inference_mode():
            for batch in singles:
                start = time.perf_counter()
                forward(batch)
                timing.latencies.append(time.perf_counter() - start)

    return run


def profile_early_exit(model: Runtime, batches: list[Batch], spec: ExitSpec, passes: int = 3) -> dict[str, float]:
    """Seconds per pass in each labelled part of the early-exit forward, and the unattributed rest.

    The parts are the engine's own `pabee.*` labels read from torch's profiler (they do not nest, so each label's
    total CPU time is its share); the model is only called, never altered.
    """
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(passes):
            for batch in batches:
                infer(model, batch, spec)
        total = (time.perf_counter() - start) / passes
    parts = dict.fromkeys(PROFILE_PARTS.values(), 0.0)
    for event in profiler.key_averages():
        if event.key in PROFILE_PARTS:
            parts[PROFILE_PARTS[event.key]] += event.cpu_time_total / 1e6 / passes  # µs → s per pass
    parts[OTHER_PART] = max(total - sum(parts.values()), 0.0)
    parts["total"] = total
    return parts


# --- stages of `run_bench` ---------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What every variant runs on: the model, the tokenized examples in batches, and the exit settings to time."""

    model: Runtime
    model_label: str
    source: str
    features: list[Batch]
    batches: dict[int, list[Batch]]
    singles: list[Batch]
    specs: list[ExitSpec]
    sweep: ExitSweep

    @property
    def no_exit(self) -> ExitSpec:
        """A patience the counter cannot reach, uncapped: the engine's plain path, comparable with `full`."""
        return ExitSpec("patience", patience=self.model.num_layers)


def _output_dir(args: BenchArguments) -> Path | None:
    """The results folder, refused before any work if it already holds results we were not told to replace."""
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None and (out_dir / "bench.json").exists() and not args.overwrite_output_dir:
        raise PabeeError(f"{out_dir / 'bench.json'} exists; pass --overwrite_output_dir to replace it.")
    return out_dir


def _load_texts(args: BenchArguments) -> tuple[list[tuple[str, str | None]], str]:
    """(text, text_pair) examples and where they came from: `--input_file`, else the GLUE task's dev set."""
    if args.input_file is not None:
        from .data import read_text_file

        examples = [(row.text, row.text_pair) for row in read_text_file(args.input_file)]
        source = str(Path(args.input_file).resolve())
    else:
        from .data import load_glue
        from .glue import get_task

        task = get_task(args.task_name)
        data = load_glue(task, args.data_dir, train=False, evaluate=True, test=False)
        split = task.eval_splits[0].name
        dataset = data.eval[split]
        pairs = dataset["text_pair"] if "text_pair" in dataset.column_names else [None] * len(dataset)
        examples = list(zip(dataset["text"], pairs, strict=True))
        source = data.sources[split]
    if not examples:
        raise PabeeError("No examples to benchmark.")
    return examples[: args.max_examples], source


def _load_model(args: BenchArguments) -> tuple[Runtime, Any, str]:
    """The model in eval mode, its tokenizer, and how the report names it (portably: `portable_path`)."""
    from transformers import AutoTokenizer

    from .folders import load_runtime, load_tokenizer
    from .pretrained import bundled_model_path
    from .provenance import portable_path

    if args.backend == "onnxruntime":
        model = load_runtime(args.model, "onnxruntime", threads=args.threads)
        return model, load_tokenizer(args.model), f"{portable_path(args.model)} (ONNX Runtime, {model.precision})"
    if args.model is None:
        torch.manual_seed(args.seed)
        path = str(bundled_model_path())
        model = PabeeForSequenceClassification.from_backbone(path)
        if args.attn_implementation:
            model.set_attn_implementation(args.attn_implementation)
        label = f"{portable_path(path)} (fresh, untrained heads)"
    else:
        path, label = args.model, portable_path(args.model)
        try:
            extra = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
            model = PabeeForSequenceClassification.from_pretrained(path, **extra)
        except (OSError, ValueError) as error:
            raise PabeeError(f"Cannot load a PABEE model from {path!r}: {error}") from None
    return model.eval(), AutoTokenizer.from_pretrained(path), label


def _exit_specs(args: BenchArguments, model: Runtime) -> tuple[list[ExitSpec], ExitSweep]:
    """Every setting to time, checked against the model, under the cap (the flag's, else the model's own)."""
    sweep = args.sweep.or_cap_of(model.config.exit_spec)
    by_criterion = args.sweep_specs(model.config, sweep)
    return [spec for specs in by_criterion.values() for spec in specs], sweep


def load_workload(args: BenchArguments) -> Workload:
    """Texts (cheap, so a bad file fails first), then the model, its checked settings and the padded batches."""
    texts, source = _load_texts(args)
    model, tokenizer, model_label = _load_model(args)
    specs, sweep = _exit_specs(args, model)
    features = []
    for text, pair in texts:
        encoded = tokenizer(text, pair, truncation=True, max_length=args.max_seq_length, return_tensors="pt")
        features.append({k: v[0] for k, v in encoded.items()})
    pad_id = tokenizer.pad_token_id or 0
    batches = {b: make_batches(features, b, pad_id, args.sort_by_length) for b in args.batch_size_list}
    singles = make_batches(features[: args.bs1_examples], 1, pad_id, sort_by_length=False)
    return Workload(model, model_label, source, features, batches, singles, specs, sweep)


def build_variants(work: Workload, batch_sizes: list[int]) -> dict[str, Variant]:
    """Every timed variant by name: batched ones per batch size, then the batch-size-1 loops."""
    full = partial(full_forward, work.model)
    variants: dict[str, Variant] = {}
    for b in batch_sizes:
        data = work.batches[b]
        variants[f"full/bs{b}"] = _over_batches(full, data)
        variants[f"no_exit/bs{b}"] = _over_batches(_engine(work.model, work.no_exit), data)
        variants[f"heads_no_exit/bs{b}"] = _over_batches(_engine(work.model, NEVER_EXIT), data)
        for spec in work.specs:
            variants[f"early_exit/{spec.key}/bs{b}"] = _over_batches(_engine(work.model, spec), data)
    # The plain model one example at a time: how much batching can gain here at all, exits aside.
    variants["full_bs1"] = _one_by_one(full, work.singles)
    for spec in work.specs:
        variants[f"early_exit_bs1/{spec.key}"] = _one_by_one(_engine(work.model, spec), work.singles)
    return variants


def exit_layers_and_check(work: Workload, batch_size: int) -> tuple[dict[str, np.ndarray], float]:
    """Each setting's exit layers, and how far the engine's no-exit logits are from `full` (outside timing)."""
    batches = work.batches[batch_size]
    no_exit = _engine(work.model, work.no_exit)
    with torch.inference_mode():
        full_logits = torch.cat([full_forward(work.model, b) for b in batches])
        engine_logits = torch.cat([no_exit(b).logits for b in batches])
        exits = {
            spec.key: torch.cat([_engine(work.model, spec)(b).exit_layers for b in batches]).numpy()
            for spec in work.specs
        }
    return exits, float((full_logits - engine_logits).abs().max())


def _rows(
    work: Workload, summary: dict[str, dict[str, float]], exits: dict[str, np.ndarray], batch_sizes: list[int]
) -> list[dict[str, Any]]:
    """One row per setting and batch size: exit layers against measured speed-ups and the batch-size-1 loop."""
    layers, rows = work.model.num_layers, []
    for spec in work.specs:
        avg = float(exits[spec.key].mean())
        bs1 = summary[f"early_exit_bs1/{spec.key}"]
        for b in batch_sizes:
            ee, full = summary[f"early_exit/{spec.key}/bs{b}"], summary[f"full/bs{b}"]
            measured = full["seconds_median"] / ee["seconds_median"]
            rows.append(
                {
                    **spec.describe(),
                    "batch_size": b,
                    "avg_exit_layer": avg,
                    "layer_speed_up": layers / avg,
                    "measured_speed_up": measured,
                    "measured_over_layer": measured / (layers / avg),
                    "examples_per_s": ee["examples_per_s"],
                    "full_examples_per_s": full["examples_per_s"],
                    "bs1_examples_per_s": bs1["examples_per_s"],
                    "batched_over_bs1": ee["examples_per_s"] / bs1["examples_per_s"],
                    **{f"bs1_latency_p{q}_ms": bs1[f"latency_p{q}_ms"] for q in (50, 90, 99)},
                }
            )
    return rows


def _overhead(summary: dict[str, dict[str, float]], variant: str, batch_sizes: list[int]) -> dict[str, float]:
    """% more time than the plain forward, per batch size."""
    return {
        str(b): 100 * (summary[f"{variant}/bs{b}"]["seconds_median"] / summary[f"full/bs{b}"]["seconds_median"] - 1)
        for b in batch_sizes
    }


def _settings(args: BenchArguments, work: Workload) -> dict[str, Any]:
    """What was run, for the report's header."""
    return {
        "examples": len(work.features),
        "bs1_examples": len(work.singles),
        "layers": work.model.num_layers,
        **work.sweep.describe(),
        "batch_sizes": args.batch_size_list,
        "sort_by_length": args.sort_by_length,
        "max_seq_length": args.max_seq_length,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "attn_implementation": attention_kernel(work.model.config.encoder_config),
    }


def summarise(
    args: BenchArguments,
    work: Workload,
    timings: dict[str, Timing],
    exits: dict[str, np.ndarray],
    max_diff: float,
    command: str | None,
) -> dict[str, Any]:
    """The JSON report from the raw timings (`report.bench_markdown` renders it)."""
    from .provenance import portable_path, provenance

    batch_sizes = args.batch_size_list
    summary = {
        name: _summary(t, len(work.singles) if "bs1" in name else len(work.features)) for name, t in timings.items()
    }
    return {
        "provenance": provenance(command, model=work.model_label, data=portable_path(work.source)),
        "settings": _settings(args, work),
        "check_full_vs_engine_max_abs_diff": max_diff,
        "variants": summary,
        "rows": _rows(work, summary, exits, batch_sizes),
        "full_batched_over_bs1": {
            str(b): summary[f"full/bs{b}"]["examples_per_s"] / summary["full_bs1"]["examples_per_s"]
            for b in batch_sizes
        },
        "no_exit_overhead_pct": _overhead(summary, "no_exit", batch_sizes),
        "heads_no_exit_overhead_pct": _overhead(summary, "heads_no_exit", batch_sizes),
    }


def write_report(out_dir: Path, report: dict[str, Any]) -> None:
    """`bench.json` and `bench.md`, each written atomically."""
    from .provenance import write_atomic, write_json
    from .report import bench_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "bench.json", report)
    write_atomic(out_dir / "bench.md", bench_markdown(report) + "\n")


def run_bench(args: BenchArguments, command: str | None = None) -> dict[str, Any]:
    """Time every variant; return the report (also written to `--output_dir` when given)."""
    out_dir = _output_dir(args)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    work = load_workload(args)
    variants = build_variants(work, args.batch_size_list)
    exits, max_diff = exit_layers_and_check(work, args.batch_size_list[0])
    timings = time_variants(variants, args.repeats, args.warmup, args.seed)
    report = summarise(args, work, timings, exits, max_diff, command)
    if args.profile:
        report["profile"] = {
            f"{spec.key}/bs{b}": profile_early_exit(work.model, work.batches[b], spec)
            for spec in work.specs
            for b in args.batch_size_list
        }
    if args.training_cost:
        last = args.batch_size_list[-1]
        report["training_cost"] = training_step_cost(work.model, work.features, last, args.repeats, args.seed)
    if out_dir is not None:
        write_report(out_dir, report)
    return report


# --- training cost -----------------------------------------------------------------------------------------------


def _plain_twin(model: PabeeForSequenceClassification) -> torch.nn.Module:
    """Plain fine-tuning's model (`AutoModelForSequenceClassification`) with the same encoder weights."""
    from transformers import AutoModelForSequenceClassification

    plain_config = copy.deepcopy(model.config.encoder_config)
    plain_config.num_labels = model.config.num_labels
    plain = AutoModelForSequenceClassification.from_config(plain_config)
    plain.base_model.load_state_dict(model.encoder.state_dict(), strict=False)
    return plain.train()


def training_step_cost(
    model: PabeeForSequenceClassification, features: list[Batch], batch_size: int, repeats: int, seed: int
) -> dict[str, float]:
    """Median seconds per optimizer step: PABEE (all heads, weighted loss) vs plain fine-tuning, same batch."""
    torch.manual_seed(seed)
    nets = {"pabee": copy.deepcopy(model).train(), "plain": _plain_twin(model)}
    optimizers = {name: torch.optim.AdamW(net.parameters(), lr=1e-5) for name, net in nets.items()}
    batch = make_batches(features[:batch_size], batch_size, 0, sort_by_length=False)[0]
    labels = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float if model.config.is_regression else torch.long)

    def step(name: str) -> Variant:
        def run(_: Timing) -> None:
            nets[name](**batch, labels=labels).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    timings = time_variants({n: step(n) for n in nets}, max(repeats, 5) * 2, 2, seed)
    medians = {n: statistics.median(t.passes) for n, t in timings.items()}
    return {
        "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "plain_model": type(nets["plain"]).__name__,
        "pabee_step_s": medians["pabee"],
        "plain_step_s": medians["plain"],
        "ratio": medians["pabee"] / medians["plain"],
    }
