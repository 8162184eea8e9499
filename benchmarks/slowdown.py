"""Slowdown attack, measured: a universal trigger that delays PABEE's exits, and what `max_exit_layer` bounds.

Early exit has an attack of its own: inputs on which consecutive layers never agree push every example to the
last layer (WAFFLE, NeurIPS 2023, attacks PABEE; SAME, ACL 2023). `max_exit_layer` caps the worst case. This
script measures both on the fine-tuned SST-2 and MRPC models:

1. **search** — a universal trigger: `--trigger_length` whole-word tokens chosen greedily on a sample of TRAINING
   sentences to maximise the mean exit layer under the exit rule (patience `--patience`, no cap). Each candidate
   costs one full-depth pass that returns every layer's logits; the exit layer under patience is read off them in
   numpy (the rule real early exit uses; checked against `pabee.exits.sweep_exit_layers`). Candidates: the
   `--frequent` most frequent whole-word tokens of the training text (screened as the trigger repeated), then
   coordinate rounds where each position tries the HotFlip top-k tokens (gradient of the expected agreement of
   consecutive layers' softmaxes w.r.t. the trigger embeddings) and the best frequent tokens. Triggers are cached
   in `--triggers` (JSON), keyed by model digest and search settings, so `--stage measure` skips the search.
2. **measure** — the model alone (`pabee.pipeline`, real early exit) on the DEV set, clean vs triggered (the
   trigger prepended; MRPC: to the first sentence): mean exit layer, accuracy (MRPC also F1) for patience P,
   patience P with `max_exit_layer` k, and the model truncated at k (`static` k); the real exits are compared
   with the one-pass sweep. Then `pabee serve` for the same three exit settings, clean and attacked inputs,
   `--clients` closed-loop clients sending one example per request; examples/s, p50/p99 latency, mean exit layer
   from /metrics. Settings are interleaved over `--rounds` rounds in one process; medians and per-round ratios.

Target: with `max_exit_layer` k, attacked inputs' p99 latency <= 1.05x the p99 of the model truncated at k.

    python benchmarks/slowdown.py --stage all --threads 2            # search (cached) + measure, ~20 min
    python benchmarks/slowdown.py --stage measure --overwrite        # re-measure with the cached triggers

Results: `--output`.json (all numbers, provenance) and .md (rendered; `--render_only` re-renders it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # load_test.py, beside this script
from load_test import (  # noqa: E402
    Connection,
    free_port,
    launch_server,
    load_average,
    metrics_text,
    percentile,
    stop_server,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ("SST-2", "MRPC")
DEFAULT_MODELS = {"SST-2": "runs/sst2", "MRPC": "runs/mrpc"}
WHOLE_WORD = re.compile(r"[a-z]+|[0-9]+|[!-/:-@\[-`{-~]")  # vocab entries that tokenize to themselves after a space


# --- data ----------------------------------------------------------------------------------------------------


def load_split(task_name: str, glue_dir: str, split: str) -> tuple[list[tuple[str, str | None]], np.ndarray]:
    """Examples `(text, text_pair or None)` and labels of a GLUE split (`train` or `dev`), read strictly."""
    from pabee.glue import get_task, read_glue_tsv, task_dir

    task = get_task(task_name)
    rows = read_glue_tsv(task, task_dir(task, glue_dir) / f"{split}.tsv")
    return [(r["text"], r.get("text_pair")) for r in rows], np.array([r["label"] for r in rows])


def attacked(examples: list[tuple[str, str | None]], trigger: str) -> list[tuple[str, str | None]]:
    """The trigger prepended to each example (to the first text of a pair)."""
    return [(f"{trigger} {text}", pair) for text, pair in examples]


# --- exit layers from one full pass ----------------------------------------------------------------------------


def patience_exit_layers(predictions: np.ndarray, patience: int, max_exit_layer: int | None = None) -> np.ndarray:
    """1-based exit layer of each example under PABEE's rule, from every layer's predicted class `[N, layers]`.

    Layer i agrees when its class equals layer i-1's; an example leaves at the first layer where `patience`
    layers in a row have agreed, else at the cap (the last layer without one). Same rule as
    `pabee.exits.PatienceCriterion`, which `check_exit_rule` confirms on real logits.
    """
    n, layers = predictions.shape
    limit = layers if max_exit_layer is None else min(max_exit_layer, layers)
    exits = np.full(n, limit, dtype=np.int64)
    if not 0 < patience < limit - 1:
        return exits
    counter = np.zeros(n, dtype=np.int64)
    running = np.ones(n, dtype=bool)
    for layer in range(1, limit - 1):
        agree = predictions[:, layer] == predictions[:, layer - 1]
        counter = np.where(agree, counter + 1, 0)
        leaving = running & (counter >= patience)
        exits[leaving] = layer + 1
        running &= ~leaving
    return exits


def exit_score(predictions: np.ndarray, patience: int) -> dict[str, float]:
    """What the search maximises on a sample's predictions `[N, layers]`: the mean exit layer, then (tie-break) the
    mean number of consecutive layers that disagree before the last one."""
    flips = (predictions[:, 1:-1] != predictions[:, :-2]).sum(-1)
    return {"mean_exit_layer": float(patience_exit_layers(predictions, patience).mean()), "flips": float(flips.mean())}


def surrogate_exit_layers(logits: np.ndarray, patience: int, chunk: int = 512) -> np.ndarray:
    """Mean exit layer per candidate from predicted logits `[candidates, N, layers, labels]`, in chunks."""
    out = np.empty(logits.shape[0])
    for start in range(0, len(out), chunk):
        part = logits[start : start + chunk].argmax(-1)  # [c, N, layers]
        c, n, layers = part.shape
        out[start : start + chunk] = patience_exit_layers(part.reshape(c * n, layers), patience).reshape(c, n).mean(1)
    return out


def check_exit_rule(all_logits: np.ndarray, patience: int, max_exit_layer: int | None) -> None:
    """The numpy rule gives the same exit layers as the project's `sweep_exit_layers` on these logits."""
    import torch

    from pabee.exits import make_criterion, sweep_exit_layers

    ours = patience_exit_layers(all_logits.argmax(-1), patience, max_exit_layer)
    criterion = make_criterion("patience", patience=patience, max_exit_layer=max_exit_layer)
    theirs = sweep_exit_layers(criterion, torch.as_tensor(all_logits)).numpy()
    if not np.array_equal(ours, theirs):
        raise AssertionError(f"numpy exit rule disagrees with sweep_exit_layers on {(ours != theirs).sum()} rows")


def pad(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors of token rows (`input_ids`, `token_type_ids`, `attention_mask`)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    return {
        name: torch.tensor([r[name] + [pad_id if name == "input_ids" else 0] * (width - len(r[name])) for r in rows])
        for name in rows[0]
    }


def layer_logits(model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> np.ndarray:
    """Every layer's logits `[N, layers, labels]` from one full-depth pass, rows batched by length."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out = np.empty((len(rows), model.num_layers, model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            logits = model(**pad([rows[i] for i in chunk], pad_id), output_all_logits=True).all_logits
            out[chunk] = logits.float().numpy()
    return out


def token_rows(features: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The pipeline's unpadded features with their attention masks."""
    return [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in features]


# --- trigger search ------------------------------------------------------------------------------------------


class TriggerSearch:
    """Scores triggers on a fixed sample of token sequences: the trigger goes right after `[CLS]`.

    Inserting token ids after `[CLS]` is what tokenizing `"<trigger> <text>"` gives when every trigger token is a
    whole-word vocabulary entry (checked on the sample at the end of the search).
    """

    def __init__(self, pipe: Any, examples: list[tuple[str, str | None]], trigger_length: int, batch_size: int):
        self.pipe, self.model, self.tokenizer = pipe, pipe.model, pipe.tokenizer
        self.batch_size = batch_size
        self.trigger_length = trigger_length
        features = pipe.tokenize(examples)
        room = pipe.max_length - trigger_length  # keep every row untruncated with the trigger in it
        self.keep = [i for i, f in enumerate(features) if len(f["input_ids"]) <= room]
        self.examples = [examples[i] for i in self.keep]
        self.features = [features[i] for i in self.keep]
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.embeddings = self.model.get_input_embeddings().weight.detach()  # [vocab, hidden]
        self.passes = 0  # example forwards so far (one per example and trigger, or per example and gradient)

    def rows(self, trigger: list[int], subset: int | None = None) -> list[dict[str, list[int]]]:
        out = []
        for f in self.features[:subset]:
            row = {"input_ids": [f["input_ids"][0], *trigger, *f["input_ids"][1:]]}
            if "token_type_ids" in f:
                row["token_type_ids"] = [0] * (len(trigger) + 1) + f["token_type_ids"][1:]
            out.append(row)
        return token_rows(out)

    def all_logits(self, rows: list[dict[str, list[int]]]) -> np.ndarray:
        self.passes += len(rows)
        return layer_logits(self.model, rows, self.pad_id, self.batch_size)

    def score(self, triggers: list[list[int]], patience: int, subset: int | None = None):
        """Per trigger: mean exit layer under patience on the sample and mean disagreeing layer pairs (tie-break);
        and the logits `[triggers, N, layers, labels]` they came from."""
        rows = [row for t in triggers for row in self.rows(t, subset)]
        logits = self.all_logits(rows).reshape(len(triggers), -1, self.model.num_layers, self.model.config.num_labels)
        return [exit_score(x.argmax(-1), patience) for x in logits], logits

    def isolated_logits(self, ids: np.ndarray) -> np.ndarray:
        """Every layer's logits `[V, layers, labels]` of `[CLS] v v ... v [SEP]` (the trigger length), per token."""
        cls, sep = self.features[0]["input_ids"][0], self.features[0]["input_ids"][-1]
        n = self.trigger_length + 2
        rows = [{"input_ids": [cls, *[int(v)] * (n - 2), sep], "attention_mask": [1] * n} for v in ids]
        if "token_type_ids" in self.features[0]:
            rows = [{**r, "token_type_ids": [0] * n} for r in rows]
        self.passes += len(rows) * n / statistics.fmean(len(f["input_ids"]) for f in self.features)  # in tokens
        return layer_logits(self.model, rows, self.pad_id, 512)

    def mixing_weights(self) -> np.ndarray:
        """The trigger's share of each sample row's tokens `[N, 1, 1]`: with mean pooling, roughly its share of the
        pooled state and so (the classifiers being linear) of every layer's logits."""
        n = np.array([len(f["input_ids"]) for f in self.features], dtype=np.float32)
        return (self.trigger_length / (self.trigger_length + n))[:, None, None]

    def gradient(self, trigger: list[int]) -> np.ndarray:
        """d loss / d trigger embeddings `[T, hidden]`; loss = expected agreement of consecutive layers before the
        last (Σ_l <softmax_l, softmax_l+1>), averaged over the sample. Lower loss: fewer agreeing layers."""
        import torch

        rows = self.rows(trigger)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        position = torch.arange(1, 1 + len(trigger))
        total = torch.zeros(len(trigger), self.embeddings.shape[1])
        self.model.requires_grad_(False)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = pad([rows[i] for i in chunk], self.pad_id)
            trigger_embeds = self.embeddings[torch.tensor(trigger)].clone().requires_grad_(True)
            embeds = self.embeddings[batch.pop("input_ids")].clone()
            embeds[:, position] = trigger_embeds.expand(len(chunk), -1, -1)
            all_logits = self.model(inputs_embeds=embeds, **batch, output_all_logits=True).all_logits
            p = all_logits.float().softmax(-1)
            agreement = (p[:, :-2] * p[:, 1:-1]).sum(-1).sum(-1)  # pairs (l, l+1) with l+1 < last layer
            (agreement.sum() / len(rows)).backward()
            total += trigger_embeds.grad
        self.passes += 3 * len(rows)  # a backward costs about two forwards
        return total.numpy()

    def hotflip(self, trigger: list[int], gradient: np.ndarray, position: int, allowed: np.ndarray, k: int):
        """The k allowed tokens whose swap into `position` lowers the loss most to first order."""
        e = self.embeddings.numpy()
        change = (e - e[trigger[position]]) @ gradient[position]  # [vocab] first-order change of the loss
        change[~allowed] = np.inf
        change[trigger[position]] = np.inf
        return [int(i) for i in np.argsort(change)[:k]]


def whole_word_ids(tokenizer: Any, size: int) -> np.ndarray:
    """Mask over the `size` embedding rows: entries that are a whole lowercase word, a number or one ASCII
    punctuation mark (no `##` pieces, no specials)."""
    allowed = np.zeros(size, dtype=bool)
    for token, i in tokenizer.get_vocab().items():
        if i < len(allowed) and WHOLE_WORD.fullmatch(token) and token not in tokenizer.all_special_tokens:
            allowed[i] = True
    return allowed


def frequent_ids(tokenizer: Any, texts: list[str], allowed: np.ndarray, n: int) -> list[int]:
    """The n most frequent allowed tokens in `texts`."""
    counts: Counter[int] = Counter()
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        counts.update(i for i in ids if allowed[i])
    return [i for i, _ in counts.most_common(n)]


def search_trigger(task: str, model_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy coordinate search of a universal trigger on training sentences; the cache entry for it.

    Candidate tokens come from three places: the most frequent whole-word tokens of the training text; a screen of
    the whole (whole-word) vocabulary by a linear-mixing surrogate (each token's own logits `[CLS] v v v [SEP]`,
    mixed into the sample's logits by its share of the tokens, the exit rule applied in numpy); and, per position,
    HotFlip (the gradient of the expected agreement of consecutive layers) and the same surrogate anchored at the
    current trigger's logits. Every candidate kept is scored in context by a real full-depth pass.
    """
    import torch

    from pabee.pipeline import pipeline

    began = time.perf_counter()
    torch.manual_seed(args.seed)
    pipe = pipeline(model_path)
    train, _ = load_split(task, args.glue_dir, "train")
    rng = random.Random(args.seed)
    pool = [i for i, (text, pair) in enumerate(train) if pair is not None or len(text.split()) >= args.min_words]
    chosen = rng.sample(pool, min(args.search_examples, len(pool)))
    sample = [train[i] for i in chosen]
    search = TriggerSearch(pipe, sample, args.trigger_length, args.search_batch)
    allowed = whole_word_ids(pipe.tokenizer, search.embeddings.shape[0])
    vocab = np.flatnonzero(allowed)
    texts = [t for ex in rng.sample(train, min(20_000, len(train))) for t in ex if t]
    frequent = frequent_ids(pipe.tokenizer, texts, allowed, args.frequent)
    names = pipe.tokenizer.convert_ids_to_tokens
    patience, length = args.patience, args.trigger_length
    log: list[dict[str, Any]] = []

    def key(s: dict[str, float]) -> tuple[float, float]:
        return s["mean_exit_layer"], s["flips"]

    def note(step: str, **extra: Any) -> None:
        log.append({"step": step, **extra, "trigger": names(trigger), **best, "seconds": time.perf_counter() - began})
        print(f"[{task}] {step}: {' '.join(names(trigger))!r} -> {best}", flush=True)

    # The rule the search uses is the project's: check it once on real logits (the clean sample).
    clean_scores, clean = search.score([[]], patience)
    check_exit_rule(clean[0], patience, None)
    check_exit_rule(clean[0], patience, args.max_exit_layer)
    clean_score = clean_scores[0]
    print(f"[{task}] clean train sample ({len(search.examples)}): {clean_score}", flush=True)

    # 1. Whole-vocabulary surrogate screen, then frequent + surrogate-best tokens (repeated) in context.
    weights = search.mixing_weights()
    isolated = search.isolated_logits(vocab)  # [V, layers, labels]
    predicted = (1 - weights) * clean[0][None] + weights * isolated[:, None]  # [V, N, layers, labels]
    surrogate = surrogate_exit_layers(predicted, patience)
    by_surrogate = [int(v) for v in vocab[np.argsort(-surrogate, kind="stable")[: args.vocab_screen]]]
    screened = frequent + [v for v in by_surrogate if v not in frequent]
    screen, _ = search.score([[v] * length for v in screened], patience, subset=args.screen_examples)
    ranked = [screened[i] for i in sorted(range(len(screened)), key=lambda i: key(screen[i]), reverse=True)]
    best_screened = ranked[: args.screened_per_position]
    trigger = [ranked[0]] * length
    (best,), current = search.score([trigger], patience)
    note(
        "screen",
        candidates=len(screened),
        best_candidate_from="frequent" if ranked[0] in frequent else "vocabulary surrogate",
        best_candidate=names([ranked[0]])[0],
    )

    # 2. Coordinate rounds: each position tries HotFlip's, the surrogate's and the screen's best tokens.
    index_of = {int(v): i for i, v in enumerate(vocab)}
    for round_ in range(args.search_rounds):
        changed = False
        for position in range(length):
            sources: dict[int, str] = {}
            gradient = search.gradient(trigger)
            for v in search.hotflip(trigger, gradient, position, allowed, args.hotflip_k):
                sources.setdefault(v, "hotflip")
            swap = isolated - isolated[index_of[trigger[position]]]  # [V, layers, labels]
            predicted = current[0][None] + weights / length * swap[:, None]
            for v in vocab[np.argsort(-surrogate_exit_layers(predicted, patience), kind="stable")[: args.hotflip_k]]:
                sources.setdefault(int(v), "surrogate")
            for v in best_screened:
                sources.setdefault(v, "screen")
            sources.pop(trigger[position], None)
            candidates = list(sources)
            options = [trigger[:position] + [c] + trigger[position + 1 :] for c in candidates]
            scores, logits = search.score(options, patience)
            top = max(range(len(options)), key=lambda i: key(scores[i]))
            if key(scores[top]) > key(best):
                trigger, best, current, changed = options[top], scores[top], logits[top : top + 1], True
            note(
                f"round {round_ + 1}, position {position + 1}",
                candidates=len(options),
                best_candidate_from=sources[candidates[top]],
                best_candidate=names([candidates[top]])[0],
            )
        if not changed:
            break

    # The id-level insertion must be what the tokenizer makes of the text with the trigger prepended.
    text = " ".join(names(trigger))
    expected = [r["input_ids"] for r in search.rows(trigger)]
    produced = [f["input_ids"] for f in pipe.tokenize(attacked(search.examples, text))]
    if expected != produced:
        raise AssertionError(f"trigger {text!r} does not tokenize as inserted ids")
    return {
        "task": task,
        "model": model_path,
        "trigger": text,
        "trigger_tokens": names(trigger),
        "train_sample_size": len(search.examples),
        "train_sample_rows": [chosen[i] for i in search.keep],  # 0-based rows of train.tsv (after its header)
        "train_sample_clean": clean_score,
        "train_sample_triggered": best,
        "search_seconds": time.perf_counter() - began,
        "example_passes": round(search.passes),
        "log": log,
    }


def cache_key(task: str, model_path: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a cached trigger depends on: the model's weights and every search setting."""
    from pabee.provenance import file_digest

    weights = Path(model_path) / "model.safetensors"
    return {
        "task": task,
        "model_sha256": file_digest(weights) if weights.is_file() else None,
        "patience": args.patience,
        **{
            name: getattr(args, name)
            for name in (
                "trigger_length",
                "search_examples",
                "screen_examples",
                "frequent",
                "vocab_screen",
                "screened_per_position",
                "hotflip_k",
                "search_rounds",
                "min_words",
                "seed",
            )
        },
    }


def stage_search(args: argparse.Namespace) -> None:
    import torch

    from pabee.provenance import provenance, write_json

    torch.set_num_threads(args.threads)
    path = Path(args.triggers)
    cache = json.loads(path.read_text()) if path.is_file() else {"triggers": []}
    for task in args.tasks:
        model_path = args.models[task]
        key = cache_key(task, model_path, args)
        cached = [e for e in cache["triggers"] if e["key"] == key]
        if cached and not args.research:
            print(f"[{task}] cached trigger {cached[0]['trigger']!r} (use --research to search again)", flush=True)
            continue
        entry = search_trigger(task, model_path, args)
        entry["key"] = key
        entry["provenance"] = provenance(model=model_path)
        cache["triggers"] = [e for e in cache["triggers"] if e["key"] != key] + [entry]
        write_json(path, cache)
        print(f"[{task}] trigger {entry['trigger']!r} in {entry['search_seconds']:.0f} s -> {path}", flush=True)


def cached_trigger(task: str, args: argparse.Namespace) -> dict[str, Any]:
    path = Path(args.triggers)
    key = cache_key(task, args.models[task], args)
    entries = json.loads(path.read_text())["triggers"] if path.is_file() else []
    for entry in entries:
        if entry["key"] == key:
            return entry
    raise SystemExit(f"No cached trigger for {task} with these settings in {path}; run --stage search first.")


# --- measure: the model alone ----------------------------------------------------------------------------------


PERFECT = "perfect attack"  # settings whose names start so simulate it: attacked inputs only


def exit_settings(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The exit settings measured, as pipeline options (and `pabee serve` flags): patience P, patience P capped
    at k, the model truncated at k; and a perfect attack simulated without and with the cap.

    A perfect slowdown attack makes every example's layers disagree, so nobody exits before the cap (or the last
    layer). Entropy below 0 never holds, so `entropy 0` runs exactly that: every example through the early-exit
    loop (each layer's classifier and the exit bookkeeping) to the last layer, or to k with the cap.
    """
    p, k = args.patience, args.max_exit_layer
    never = {"exit_criterion": "entropy", "exit_threshold": 0.0}
    return {
        f"patience {p}": {"patience": p},
        f"patience {p}, max_exit_layer {k}": {"patience": p, "max_exit_layer": k},
        f"static {k} (truncated model)": {"exit_criterion": "static", "exit_threshold": float(k)},
        f"{PERFECT}, no cap (entropy 0)": never,
        f"{PERFECT}, max_exit_layer {k} (entropy 0)": {**never, "max_exit_layer": k},
    }


def model_alone(task: str, model_path: str, entry: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Dev set, clean vs triggered: one-pass sweep over patiences, and real early exit for each exit setting."""
    import torch

    from pabee.exits import ExitSpec, sweep_exit_layers
    from pabee.glue import get_task
    from pabee.metrics import compute_metrics
    from pabee.pipeline import pipeline

    metrics = get_task(task).metrics
    pipe = pipeline(model_path)
    dev, labels = load_split(task, args.glue_dir, "dev")
    if args.dev_examples:
        dev, labels = dev[: args.dev_examples], labels[: args.dev_examples]
    trigger = entry["trigger"]
    inputs = {"clean": dev, "attacked": attacked(dev, trigger)}
    out: dict[str, Any] = {"num_examples": len(dev), "sweep": {}, "per_layer": {}, "settings": {}}
    out["mean_tokens"] = {
        name: statistics.fmean(len(f["input_ids"]) for f in pipe.tokenize(examples))
        for name, examples in inputs.items()
    }

    # What the search computed on its training sample (one pass + numpy rule) against real early exit.
    train, _ = load_split(task, args.glue_dir, "train")
    sample = [train[i] for i in entry["train_sample_rows"]]
    spec = ExitSpec("patience", patience=args.patience)
    out["search_check"] = {
        name: {
            "search_mean_exit_layer": entry[f"train_sample_{name}"]["mean_exit_layer"],
            "real_mean_exit_layer": float(pipe.run(examples, exit_spec=spec)[1].float().mean()),
        }
        for name, examples in (("clean", sample), ("triggered", attacked(sample, trigger)))
    }
    for name, examples in inputs.items():
        # Tokenized exactly as the pipeline (and the server) does it.
        logits = layer_logits(pipe.model, token_rows(pipe.tokenize(examples)), pipe.tokenizer.pad_token_id, 32)
        predictions = logits.argmax(-1)
        out["sweep"][name] = [
            {
                "patience": p,
                "avg_exit_layer": float((exits := patience_exit_layers(predictions, p)).mean()),
                **compute_metrics(metrics, predictions[np.arange(len(dev)), exits - 1], labels),
            }
            for p in range(0, pipe.num_layers)
        ]
        out["per_layer"][name] = [compute_metrics(metrics, predictions[:, i], labels) for i in range(pipe.num_layers)]
        for setting, options in exit_settings(args).items():
            spec = ExitSpec.from_options(options)
            began = time.perf_counter()
            real_logits, real_exits = pipe.run(examples, exit_spec=spec)
            seconds = time.perf_counter() - began
            real_exits = real_exits.numpy()
            swept = sweep_exit_layers(pipe.model.get_exit_criterion(spec), torch.as_tensor(logits)).numpy()
            if spec.criterion == "patience":  # the search's numpy rule, too
                check_exit_rule(logits, spec.patience, spec.max_exit_layer)
            swept_answers = predictions[np.arange(len(dev)), swept - 1]
            real_answers = real_logits.argmax(-1).numpy()
            out["settings"].setdefault(setting, {})[name] = {
                **compute_metrics(metrics, real_answers, labels),
                "avg_exit_layer": float(real_exits.mean()),
                "exit_histogram": np.bincount(real_exits, minlength=pipe.num_layers + 1)[1:].tolist(),
                "examples_per_s": len(dev) / seconds,
                "one_pass_avg_exit_layer": float(swept.mean()),
                "exit_layers_equal_one_pass": int((swept == real_exits).sum()),
                "answers_equal_one_pass": int((swept_answers == real_answers).sum()),
            }
            r = out["settings"][setting][name]
            print(
                f"[{task}] model alone, {setting}, {name}: exit {r['avg_exit_layer']:.3f} "
                f"(one pass {r['one_pass_avg_exit_layer']:.3f}, equal {r['exit_layers_equal_one_pass']}/{len(dev)}), "
                + ", ".join(f"{m} {r[m]:.4f}" for m in metrics)
                + f", {r['examples_per_s']:.0f} ex/s",
                flush=True,
            )
    if args.bs1_examples:
        out["one_at_a_time"] = one_at_a_time(task, pipe, dev, trigger, args)
    return out


def one_at_a_time(task: str, pipe: Any, dev: list, trigger: str, args: argparse.Namespace) -> dict[str, Any]:
    """The model alone, one example per call (what a 1-client server runs, without HTTP): per-example latency of
    the settings the verdicts compare, interleaved over `--rounds` rounds on the same random dev examples."""
    from pabee.exits import ExitSpec

    settings = exit_settings(args)
    plain, capped, static, perfect, perfect_capped = settings
    combos = [(plain, "clean"), (plain, "attacked"), (capped, "attacked"), (static, "attacked")]
    combos += [(perfect, "attacked"), (perfect_capped, "attacked")]
    rows = random.Random(args.seed).sample(range(len(dev)), min(args.bs1_examples, len(dev)))
    inputs = {"clean": [dev[i] for i in rows], "attacked": attacked([dev[i] for i in rows], trigger)}
    runs: dict[str, list[list[float]]] = {f"{s} | {n}": [] for s, n in combos}
    for round_ in range(args.rounds):
        for setting, name in combos if round_ % 2 == 0 else combos[::-1]:
            spec = ExitSpec.from_options(settings[setting])
            pipe.run(inputs[name][:5], exit_spec=spec)  # warm up this path
            latencies = []
            for example in inputs[name]:
                began = time.perf_counter()
                pipe.run([example], exit_spec=spec)
                latencies.append(time.perf_counter() - began)
            runs[f"{setting} | {name}"].append(latencies)
    out: dict[str, Any] = {"examples": len(rows), "settings": {}}
    for label, rounds in runs.items():
        pooled = [x for r in rounds for x in r]
        out["settings"][label] = {
            "examples_per_s": len(pooled) / sum(pooled),
            "p50_ms": 1000 * percentile(pooled, 50),
            "p99_ms": 1000 * percentile(pooled, 99),
            "p99_ms_per_round": [1000 * percentile(r, 99) for r in rounds],
            "mean_ms_per_round": [1000 * statistics.fmean(r) for r in rounds],
        }
        r = out["settings"][label]
        print(f"[{task}] one at a time, {label}: {r['examples_per_s']:.1f} ex/s, p99 {r['p99_ms']:.1f} ms", flush=True)

    def ratio(a: str, b: str) -> dict[str, Any]:
        x, y = out["settings"][f"{a} | attacked"], out["settings"][f"{b} | attacked"]
        return {
            "p99": x["p99_ms"] / y["p99_ms"],
            "mean_per_round": [m / n for m, n in zip(x["mean_ms_per_round"], y["mean_ms_per_round"], strict=True)],
        }

    out["target"] = ratio(capped, static)
    out["target_perfect"] = ratio(perfect_capped, static)
    for key in ("target", "target_perfect"):
        out[key]["met"] = out[key]["p99"] <= args.target
    clean, hit = out["settings"][f"{plain} | clean"], out["settings"][f"{plain} | attacked"]
    out["attack_p99"] = hit["p99_ms"] / clean["p99_ms"]
    out["attack_mean"] = clean["examples_per_s"] / hit["examples_per_s"]
    out["perfect_p99"] = out["settings"][f"{perfect} | attacked"]["p99_ms"] / clean["p99_ms"]
    return out


# --- measure: the server ---------------------------------------------------------------------------------------


def start_server(model: str, options: dict[str, Any], threads: int, port: int, log: Path) -> subprocess.Popen:
    """`pabee serve` with the exit `options`, once /health answers."""
    flags = ["--threads", str(threads), "--no_access_log"]
    for name, value in options.items():
        flags += [f"--{name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return launch_server(model, flags, port, log)


def scrape(port: int) -> dict[str, float]:
    """The server's exit-layer histogram (per layer and totals) and batch counters from /metrics."""
    values: dict[str, float] = {}
    for line in metrics_text(port).splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(("pabee_exit_layer", "pabee_batch_size_", "pabee_batch_duration_seconds_sum")):
            values[name] = float(value)
    return values


async def drive(port: int, bodies: list[bytes], clients: int, seconds: float, seed: int) -> dict[str, Any]:
    """Closed-loop clients sending random bodies for `seconds`; latencies of every request and the wall time."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: list[str] = []
    began = loop.time()
    stop = began + seconds
    last = began

    async def client(index: int) -> None:
        nonlocal last
        rng = random.Random(seed * 1000 + index)
        connection = Connection(port)
        try:
            while loop.time() < stop:
                body = bodies[rng.randrange(len(bodies))]
                sent = loop.time()
                status, answer = await connection.request("POST", "/predict", body)
                ended = loop.time()
                last = max(last, ended)
                if status != 200:
                    errors.append(f"{status}: {answer[:200]!r}")
                else:
                    latencies.append(ended - sent)
        finally:
            await connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return {"latencies": latencies, "wall": last - began}


def measure_load(port: int, bodies: list[bytes], clients: int, args: argparse.Namespace, seed: int) -> dict:
    """Warm up, then one timed run; throughput, latency percentiles and the exit layers /metrics counted."""
    asyncio.run(drive(port, bodies, clients, args.warmup, seed + 7919))
    before = scrape(port)
    load_before = load_average()
    run = asyncio.run(drive(port, bodies, clients, args.duration, seed))
    after = scrape(port)
    diff = {name: after[name] - before.get(name, 0.0) for name in after}
    count = diff["pabee_exit_layer_count"]
    buckets = {
        float(name.split('"')[1]): value
        for name, value in diff.items()
        if name.startswith("pabee_exit_layer_bucket") and "+Inf" not in name
    }
    cumulative = [buckets[le] for le in sorted(buckets)]  # layers 1..L, cumulative counts
    latencies = run["latencies"]
    return {
        "requests": len(latencies),
        "seconds": run["wall"],
        "examples_per_s": len(latencies) / run["wall"],
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "avg_exit_layer": diff["pabee_exit_layer_sum"] / count,
        "exit_histogram": [int(b - a) for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)],
        "avg_batch_size": diff["pabee_batch_size_sum"] / max(1.0, diff["pabee_batch_size_count"]),
        "forward_busy": diff["pabee_batch_duration_seconds_sum"] / run["wall"],
        "load_average_before": load_before,
    }


def request_bodies(examples: list[tuple[str, str | None]]) -> list[bytes]:
    return [json.dumps({"texts": [text if pair is None else [text, pair]]}).encode() for text, pair in examples]


def serve_rounds(args: argparse.Namespace, triggers: dict[str, str]) -> dict[str, Any]:
    """Every task × exit setting × clients × input, interleaved over `--rounds`; per-round results."""
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    settings = exit_settings(args)
    runs: dict[str, dict[str, list[dict]]] = {task: {} for task in args.tasks}
    bodies = {}
    for task in args.tasks:
        dev, _ = load_split(task, args.glue_dir, "dev")
        bodies[task] = {"clean": request_bodies(dev), "attacked": request_bodies(attacked(dev, triggers[task]))}
    names = list(settings)
    for round_ in range(args.rounds):
        for task in args.tasks:
            shift = round_ % len(names)
            for setting in names[shift:] + names[:shift]:  # rotate the order of the servers each round
                port = free_port()
                server = start_server(args.models[task], settings[setting], args.threads, port, logs / "slowdown.log")
                try:
                    for clients in args.clients:
                        order = ("clean", "attacked") if round_ % 2 == 0 else ("attacked", "clean")
                        if setting.startswith(PERFECT):  # a simulated attack: attacked inputs (their lengths)
                            order = ("attacked",)
                        for name in order:
                            # Same seed for clean and attacked: the same dev examples in the same order.
                            seed = 100 * round_ + clients
                            result = measure_load(port, bodies[task][name], clients, args, seed)
                            label = f"{setting} | {name} | {clients} client{'s' if clients > 1 else ''}"
                            runs[task].setdefault(label, []).append(result)
                            print(
                                f"round {round_ + 1}/{args.rounds} [{task}] {label}: "
                                f"{result['examples_per_s']:.1f} ex/s, p50 {result['p50_ms']:.1f} ms, "
                                f"p99 {result['p99_ms']:.1f} ms, exit {result['avg_exit_layer']:.2f}, "
                                f"batch {result['avg_batch_size']:.1f}, load {result['load_average_before']}",
                                flush=True,
                            )
                finally:
                    stop_server(server)
    return runs


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians over rounds per setting, and the ratios within each round that the verdicts use."""
    keys = ("examples_per_s", "p50_ms", "p99_ms", "mean_ms", "avg_exit_layer", "avg_batch_size", "forward_busy")
    medians = {label: {k: statistics.median(r[k] for r in rs) for k in keys} for label, rs in runs.items()}
    p, k = args.patience, args.max_exit_layer
    plain, capped, static, perfect, perfect_capped = exit_settings(args)
    out: dict[str, Any] = {"medians": medians, "by_clients": {}}
    for clients in args.clients:
        suffix = f"{clients} client{'s' if clients > 1 else ''}"

        def runs_of(setting: str, name: str, suffix: str = suffix) -> list[dict]:
            return runs[f"{setting} | {name} | {suffix}"]

        def ratio(a: list[dict], b: list[dict], key: str) -> dict[str, Any]:
            per_round = [x[key] / y[key] for x, y in zip(a, b, strict=True)]
            return {
                "of_medians": statistics.median(x[key] for x in a) / statistics.median(y[key] for y in b),
                "per_round": per_round,
                "median_per_round": statistics.median(per_round),
            }

        target = ratio(runs_of(capped, "attacked"), runs_of(static, "attacked"), "p99_ms")
        target_perfect = ratio(runs_of(perfect_capped, "attacked"), runs_of(static, "attacked"), "p99_ms")
        out["by_clients"][suffix] = {
            # How much the attack slows the uncapped model: attacked over clean.
            "attack_p99": ratio(runs_of(plain, "attacked"), runs_of(plain, "clean"), "p99_ms"),
            "attack_p50": ratio(runs_of(plain, "attacked"), runs_of(plain, "clean"), "p50_ms"),
            "attack_throughput": ratio(runs_of(plain, "clean"), runs_of(plain, "attacked"), "examples_per_s"),
            # The target: capped, attacked p99 over the model truncated at k on the same attacked inputs.
            "target_p99": target,
            "target_met": target["of_medians"] <= args.target,
            "target_met_rounds": sum(r <= args.target for r in target["per_round"]),
            "capped_vs_static_clean_p99": ratio(runs_of(capped, "attacked"), runs_of(static, "clean"), "p99_ms"),
            "capped_vs_uncapped_attacked_p99": ratio(
                runs_of(capped, "attacked"), runs_of(plain, "attacked"), "p99_ms"
            ),
            "capped_vs_static_attacked_throughput": ratio(
                runs_of(static, "attacked"), runs_of(capped, "attacked"), "examples_per_s"
            ),
            # The target against a perfect attack: nobody exits before k, against the model truncated at k.
            "target_perfect_p99": target_perfect,
            "target_perfect_met": target_perfect["of_medians"] <= args.target,
            "target_perfect_met_rounds": sum(r <= args.target for r in target_perfect["per_round"]),
            "perfect_capped_throughput_vs_static": ratio(
                runs_of(static, "attacked"), runs_of(perfect_capped, "attacked"), "examples_per_s"
            ),
            # What a perfect attack costs without a cap (every example to the last layer), and with it.
            "perfect_p99_vs_clean": ratio(runs_of(perfect, "attacked"), runs_of(plain, "clean"), "p99_ms"),
            "perfect_p50_vs_clean": ratio(runs_of(perfect, "attacked"), runs_of(plain, "clean"), "p50_ms"),
            "perfect_throughput_vs_clean": ratio(
                runs_of(plain, "clean"), runs_of(perfect, "attacked"), "examples_per_s"
            ),
            "perfect_capped_p99_vs_clean": ratio(
                runs_of(perfect_capped, "attacked"), runs_of(plain, "clean"), "p99_ms"
            ),
            "perfect_p99_vs_perfect_capped": ratio(
                runs_of(perfect, "attacked"), runs_of(perfect_capped, "attacked"), "p99_ms"
            ),
        }
    out["note"] = f"patience {p}, cap k={k}"
    return out


def stage_measure(args: argparse.Namespace) -> None:
    import torch

    from pabee.provenance import provenance, write_atomic, write_json

    out = Path(args.output)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    entries = {task: cached_trigger(task, args) for task in args.tasks}
    alone = {}
    for task in args.tasks:
        alone[task] = model_alone(task, args.models[task], entries[task], args)
    alone_seconds = time.perf_counter() - began
    load_start = load_average()
    serve_began = time.perf_counter()
    runs = serve_rounds(args, {task: e["trigger"] for task, e in entries.items()})
    report = {
        "patience": args.patience,
        "max_exit_layer": args.max_exit_layer,
        "target_ratio": args.target,
        "threads": args.threads,
        "clients": args.clients,
        "rounds": args.rounds,
        "duration": args.duration,
        "warmup": args.warmup,
        "settings": exit_settings(args),
        "tasks": {
            task: {
                "model": args.models[task],
                "model_config_patience": json.loads((Path(args.models[task]) / "config.json").read_text())["patience"],
                "trigger": {k: v for k, v in entries[task].items() if k not in ("provenance",)},
                "model_alone": alone[task],
                "server": summarise(runs[task], args),
                "server_runs": runs[task],
            }
            for task in args.tasks
        },
        "elapsed_seconds": {
            "model_alone": alone_seconds,
            "server": time.perf_counter() - serve_began,
            "measure_total": time.perf_counter() - began,
            "search_recorded": {task: entries[task]["search_seconds"] for task in args.tasks},
        },
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "provenance": provenance(
            models=args.models, data=args.glue_dir, triggers=str(args.triggers), stage_command=sys.argv
        ),
    }
    write_json(out.with_suffix(".json"), report)
    write_atomic(out.with_suffix(".md"), render_markdown(report))
    print(render_markdown(report))


# --- report --------------------------------------------------------------------------------------------------


def _metric_cells(row: dict[str, Any], metrics: list[str]) -> str:
    return " | ".join(f"{100 * row[m]:.1f}" for m in metrics)


def render_markdown(report: dict[str, Any]) -> str:
    p, k, target = report["patience"], report["max_exit_layer"], report["target_ratio"]
    prov = report["provenance"]
    hw = prov["hardware"]
    elapsed = report["elapsed_seconds"]
    lines = [
        "# Slowdown attack on PABEE, measured: a universal trigger, and what `max_exit_layer` bounds",
        "",
        "Early exit can be attacked: inputs on which consecutive layers keep disagreeing push every example to the "
        "last layer (WAFFLE, NeurIPS 2023; SAME, ACL 2023). This measures a cheap such attack on the fine-tuned "
        f"6-layer MiniLM PABEE models, at **patience {p}**, and the cap `max_exit_layer` = **{k}** against it.",
        "",
        f"Command: `{prov['command']}`  ",
        f"Date: {prov['date']}; torch {prov['versions']['torch']}, transformers {prov['versions']['transformers']}; "
        f"{hw['cpu']}, {hw['cpu_count']} cores, CPU flags {', '.join(hw['cpu_flags']) or 'none reported'}; "
        f"{report['threads']} torch thread(s) here and in the server.  ",
        f"Load average (1/5/15 min) at the start and end of the server runs: {report['load_average_start']} → "
        f"{report['load_average_end']} (a shared machine).  ",
        f"Elapsed: model alone {elapsed['model_alone']:.0f} s, server {elapsed['server']:.0f} s; trigger search "
        + ", ".join(f"{t} {s:.0f} s" for t, s in elapsed["search_recorded"].items())
        + " (cached in the triggers file; a measure-only run skips it).",
        "",
        *summary_lines(report),
        "## What was done",
        "",
        "- **Trigger** (`--stage search`): a universal sequence of whole-word tokens, chosen greedily on a random "
        "sample of *training* examples to maximise the mean exit layer under patience "
        f"{p} (no cap), then prepended to every *dev* example (MRPC: to the first sentence). Each candidate costs "
        "one full-depth pass returning all layers' logits; exit layers under patience are read off them in numpy "
        "(checked equal to `pabee.exits.sweep_exit_layers`). Candidates, each scored in context by such a pass: the "
        "most frequent whole-word tokens of the training text and the best of the whole whole-word vocabulary by a "
        "linear-mixing surrogate (each token's own per-layer logits, `[CLS] v v v [SEP]`, mixed into the sample's "
        "clean logits by the trigger's share of the tokens, as mean pooling and linear heads roughly do; exit rule "
        "in numpy), each tried as the token repeated; then coordinate rounds in which each position tries the "
        "HotFlip top-k (gradient of the expected agreement Σ<softmax_l, softmax_l+1> of consecutive layers before "
        "the last w.r.t. the trigger embeddings), the surrogate's top-k for a swap at that position, and the best "
        "screened tokens, keeping the best; rounds stop when one changes nothing.",
        "- **Model alone** (`pabee.pipeline`, real early exit, batches of 32) on the whole dev set, clean vs "
        f"attacked, for patience {p}; patience {p} with `max_exit_layer` {k}; the model truncated at layer {k} "
        f"(`static` {k}: the plain model's first {k} layers and classifier {k}). Real exits are compared with the "
        "one-pass sweep (`sweep_exit_layers`, and the search's numpy rule for patience).",
        "- **A perfect attack, simulated**: one that made every example's layers disagree would let nobody exit "
        f"before the cap. `--exit_criterion entropy --exit_threshold 0` never fires (entropy is never below 0), so "
        "every example runs the early-exit loop (each layer's classifier and the exit bookkeeping) to the last "
        f"layer, or to layer {k} with `max_exit_layer` {k}: the most any slowdown attack can cost, without and with "
        "the cap. The target is checked against it too, since the real trigger leaves most examples below the cap.",
        f"- **Server**: `pabee serve --threads {report['threads']}` (default micro-batching: 32 texts, 5 ms) for the "
        "same settings (the simulated perfect attack on attacked inputs only); closed-loop clients "
        f"({', '.join(map(str, report['clients']))}) each sending one random "
        f"dev example per request (the same examples clean and attacked), {report['warmup']:g} s warm-up + "
        f"{report['duration']:g} s measured per setting; the settings interleaved over {report['rounds']} rounds "
        "in one process (server order rotated, clean/attacked order alternated); medians over rounds, and ratios "
        "within each round. Latency is measured by the client (HTTP included); the mean exit layer is the server's "
        "`pabee_exit_layer` histogram over the timed window.",
    ]
    for task, t in report["tasks"].items():
        trig, alone, server = t["trigger"], t["model_alone"], t["server"]
        metrics = ["accuracy", "f1"] if task == "MRPC" else ["accuracy"]
        heads = " | ".join("Acc" if m == "accuracy" else "F1" for m in metrics)
        n = alone["num_examples"]
        lines += [
            "",
            f"## {task} (`{t['model']}`)",
            "",
            f"The model's `config.json` says patience {t['model_config_patience']} (run-glue saves the first of "
            f"`--patience 1,2,3,4,5`); this uses patience {p}.",
            "",
            f"**Trigger: `{trig['trigger']}`** — searched on {trig['train_sample_size']} training examples in "
            f"{trig['search_seconds']:.0f} s ({trig['example_passes']} example passes); on that sample the mean exit "
            f"layer went {trig['train_sample_clean']['mean_exit_layer']:.3f} → "
            f"{trig['train_sample_triggered']['mean_exit_layer']:.3f} (search, one pass + numpy rule); real early "
            f"exit on the same sample in this run: {alone['search_check']['clean']['real_mean_exit_layer']:.3f} → "
            f"{alone['search_check']['triggered']['real_mean_exit_layer']:.3f}. Dev examples average "
            f"{alone['mean_tokens']['clean']:.1f} tokens, so the trigger is "
            f"{len(trig['trigger_tokens']) / alone['mean_tokens']['attacked']:.0%} of the tokens the mean-pooled "
            "classifiers average over.",
            "",
            f"Model alone, dev ({n} examples), real early exit:",
            "",
            f"| Exit setting | Input | {heads} | Avg. exit layer | Exits per layer | One-pass avg. exit | "
            "Exits equal to one pass | ex/s (one run) |",
            "|---|---|" + "---|" * len(metrics) + "---|---|---|---|---|",
        ]
        for setting, by_input in alone["settings"].items():
            for name, r in by_input.items():
                lines.append(
                    f"| {setting} | {name} | {_metric_cells(r, metrics)} | {r['avg_exit_layer']:.2f} | "
                    f"{' / '.join(map(str, r['exit_histogram']))} | {r['one_pass_avg_exit_layer']:.2f} | "
                    f"{r['exit_layers_equal_one_pass']}/{n} | {r['examples_per_s']:.0f} |"
                )
        if "one_at_a_time" in alone:
            one = alone["one_at_a_time"]
            lines += [
                "",
                f"Model alone, one example per call ({one['examples']} random dev examples, {report['rounds']} "
                "interleaved rounds, latencies pooled; no HTTP: what a 1-client server computes):",
                "",
                "| Exit setting | Input | ex/s | p50 ms | p99 ms | p99 ms per round |",
                "|---|---|---|---|---|---|",
            ]
            for label, r in one["settings"].items():
                setting, name = label.split(" | ")
                lines.append(
                    f"| {setting} | {name} | {r['examples_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                    f"{', '.join(f'{v:.2f}' for v in r['p99_ms_per_round'])} |"
                )
            lines += [
                "",
                f"- Target, model alone (attacked p99 with `max_exit_layer` {k} / the truncated model's): real "
                f"trigger **{one['target']['p99']:.3f}x** ({'met' if one['target']['met'] else 'missed'}); "
                f"perfect attack **{one['target_perfect']['p99']:.3f}x** "
                f"({'met' if one['target_perfect']['met'] else 'missed'}; mean latency per round "
                f"{', '.join(f'{v:.3f}' for v in one['target_perfect']['mean_per_round'])}x).",
                f"- The real trigger without a cap: p99 {one['attack_p99']:.3f}x clean's, mean latency "
                f"{one['attack_mean']:.3f}x; a perfect attack without a cap: p99 {one['perfect_p99']:.3f}x clean's.",
            ]
        clean_sweep, attacked_sweep = alone["sweep"]["clean"], alone["sweep"]["attacked"]
        lines += [
            "",
            f"Every patience from the one-pass sweep (the trigger was searched for patience {p}):",
            "",
            f"| Patience | Clean avg. exit | Attacked avg. exit | Clean {heads} | Attacked {heads} |",
            "|---|---|---|" + "---|" * (2 * len(metrics)),
        ]
        for c, a in zip(clean_sweep, attacked_sweep, strict=True):
            label = "0 (full)" if c["patience"] == 0 else str(c["patience"])
            lines.append(
                f"| {label} | {c['avg_exit_layer']:.2f} | {a['avg_exit_layer']:.2f} | "
                f"{_metric_cells(c, metrics)} | {_metric_cells(a, metrics)} |"
            )
        lines += [
            "",
            f"Server, medians over {report['rounds']} rounds:",
            "",
            "| Exit setting | Input | Clients | ex/s | p50 ms | p99 ms | Avg. exit layer (/metrics) | Avg. batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label, r in server["medians"].items():
            setting, name, clients = label.split(" | ")
            lines.append(
                f"| {setting} | {name} | {clients.split()[0]} | {r['examples_per_s']:.1f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['avg_exit_layer']:.2f} | {r['avg_batch_size']:.1f} |"
            )
        lines += ["", "Ratios (of the medians; per round in brackets):", ""]
        for suffix, r in server["by_clients"].items():

            def fmt(x: dict[str, Any]) -> str:
                return f"**{x['of_medians']:.3f}x** [{', '.join(f'{v:.3f}' for v in x['per_round'])}]"

            verdict = "met" if r["target_met"] else "missed"
            verdict_perfect = "met" if r["target_perfect_met"] else "missed"
            lines += [
                f"- {suffix}: the attack without a cap, attacked / clean: p50 {fmt(r['attack_p50'])}, p99 "
                f"{fmt(r['attack_p99'])}; throughput clean / attacked {fmt(r['attack_throughput'])}.",
                f"- {suffix}: **target** (attacked p99 with `max_exit_layer` {k} ≤ {target:g}x the p99 of the model "
                f"truncated at {k}, same attacked inputs): {fmt(r['target_p99'])} — **{verdict}** "
                f"({r['target_met_rounds']}/{len(r['target_p99']['per_round'])} rounds within). Against the "
                f"truncated model on clean inputs: {fmt(r['capped_vs_static_clean_p99'])}; against the uncapped "
                f"model on attacked inputs: {fmt(r['capped_vs_uncapped_attacked_p99'])}.",
                f"- {suffix}: **target against a perfect attack** (nobody exits before {k}; p99 with `max_exit_layer` "
                f"{k} ≤ {target:g}x the truncated model's): {fmt(r['target_perfect_p99'])} — **{verdict_perfect}** "
                f"({r['target_perfect_met_rounds']}/{len(r['target_perfect_p99']['per_round'])} rounds within); "
                f"throughput truncated / capped {fmt(r['perfect_capped_throughput_vs_static'])}.",
                f"- {suffix}: a perfect attack without a cap (every example to the last layer), against clean inputs "
                f"at patience {p}: p50 {fmt(r['perfect_p50_vs_clean'])}, p99 {fmt(r['perfect_p99_vs_clean'])}, "
                f"throughput clean / attacked {fmt(r['perfect_throughput_vs_clean'])}. With the cap its p99 is "
                f"{fmt(r['perfect_capped_p99_vs_clean'])} clean's; uncapped / capped p99 "
                f"{fmt(r['perfect_p99_vs_perfect_capped'])}.",
            ]
        lines += [
            "",
            "Per round:",
            "",
            "| Exit setting | Input | Clients | Round | ex/s | p50 ms | p99 ms | Avg. exit layer | Load before |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, rs in t["server_runs"].items():
            setting, name, clients = label.split(" | ")
            for i, r in enumerate(rs, start=1):
                lines.append(
                    f"| {setting} | {name} | {clients.split()[0]} | {i} | {r['examples_per_s']:.1f} | "
                    f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['avg_exit_layer']:.2f} | "
                    f"{r['load_average_before']} |"
                )
        lines += [
            "",
            "Search log (the best candidate of each step and where it came from; the trigger changes only if it "
            "beats the current one):",
            "",
            "| Step | Candidates | Best candidate (from) | Trigger after | Mean exit (train sample) | Flips | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for step in trig["log"]:
            lines.append(
                f"| {step['step']} | {step['candidates']} | `{step.get('best_candidate', '')}` "
                f"({step['best_candidate_from']}) | `{' '.join(step['trigger'])}` | {step['mean_exit_layer']:.3f} | "
                f"{step['flips']:.2f} | {step['seconds']:.0f} |"
            )
    lines += ["", "## Caveats", ""]
    lines += [f"- {c}" for c in CAVEATS]
    return "\n".join(lines) + "\n"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The headline numbers and verdicts, per task."""
    p, k, target = report["patience"], report["max_exit_layer"], report["target_ratio"]
    plain = f"patience {p}"
    lines = ["## Summary", ""]
    for task, t in report["tasks"].items():
        alone, server = t["model_alone"], t["server"]["by_clients"]
        clean, hit = alone["settings"][plain]["clean"], alone["settings"][plain]["attacked"]
        capped = alone["settings"][f"patience {p}, max_exit_layer {k}"]["attacked"]
        transfer = "" if hit["avg_exit_layer"] > clean["avg_exit_layer"] else " (the trigger did not transfer to dev)"
        lines.append(
            f"- **{task}**, trigger `{t['trigger']['trigger']}`: dev mean exit layer at patience {p}: "
            f"{clean['avg_exit_layer']:.2f} → {hit['avg_exit_layer']:.2f}{transfer}; with `max_exit_layer` {k}: "
            f"{capped['avg_exit_layer']:.2f}. A perfect attack would take every example to layer "
            f"{len(alone['per_layer']['clean'])} (with the cap: {k})."
        )
        parts = []
        if "one_at_a_time" in alone:
            one = alone["one_at_a_time"]
            parts.append(
                f"model alone, one at a time: {one['target']['p99']:.3f}x real trigger, "
                f"{one['target_perfect']['p99']:.3f}x perfect attack"
            )
        for suffix, r in server.items():
            parts.append(
                f"server, {suffix}: {r['target_p99']['of_medians']:.3f}x real trigger "
                f"({r['target_met_rounds']}/{len(r['target_p99']['per_round'])} rounds ≤ {target:g}), "
                f"{r['target_perfect_p99']['of_medians']:.3f}x perfect attack "
                f"({r['target_perfect_met_rounds']}/{len(r['target_perfect_p99']['per_round'])} rounds)"
            )
        lines.append(
            f"  - Target (capped attacked p99 / truncated-at-{k} p99 ≤ {target:g}): " + "; ".join(parts) + "."
        )
        uncapped = [
            f"{suffix}: real trigger p50 {r['attack_p50']['of_medians']:.2f}x, perfect attack p50 "
            f"{r['perfect_p50_vs_clean']['of_medians']:.2f}x / p99 {r['perfect_p99_vs_clean']['of_medians']:.2f}x"
            f" / throughput ÷{r['perfect_throughput_vs_clean']['of_medians']:.2f}"
            for suffix, r in server.items()
        ]
        lines.append("  - Without a cap, against clean inputs (server): " + "; ".join(uncapped) + ".")
    lines += [
        "- Verdicts on p99 latency differ by a few percent from round to round on this shared machine, and at 16 "
        "clients (queueing, micro-batches) by far more: read the per-round ratios before the verdict. "
        "The model-alone numbers (no HTTP, no client processes on the same cores) are the steadier check.",
        "",
    ]
    return lines


CAVEATS = [
    "One universal trigger per task, searched greedily on a small training sample with a first-order (HotFlip) "
    "candidate list, against a 6-layer model: a lower bound on what an attacker gets. Per-input attacks (WAFFLE, "
    "SAME) optimise each input and can push more examples to the last layer.",
    "The trigger is not constrained to keep the label or to read naturally; accuracy on attacked inputs is reported "
    "but an attacker who only wants to slow the service does not care about it.",
    "Latency is measured on a shared 2-core VM with the clients on the same cores as the server; settings are "
    "interleaved and per-round ratios listed because the machine's speed drifts between minutes. A p99 over "
    "`--duration` seconds rests on the slowest few requests (1 client: about 250 requests, so 2-3 of them; "
    "16 clients: 6-9 of 600-900), which is why a 5% bound cannot be resolved in every round.",
    "A cap bounds compute, not accuracy: with the cap, attacked inputs answer from layer k's classifier.",
    "Mean pooling dilutes a short trigger: it is T / (T + n) of the tokens every classifier averages over (see each "
    "task's trigger line), and the early layers, whose agreement decides the first exits, are the most "
    "bag-of-words-like. Longer triggers (`--trigger_length`) move more examples; they were not measured here.",
    "The perfect attack is simulated with an exit rule that never fires (entropy 0), not with inputs: it costs what "
    "inputs on which no two consecutive layers agree would cost, through the same early-exit loop.",
]


# --- command line ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["search", "measure", "all"], default="all")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated: SST-2, MRPC.")
    parser.add_argument("--model", action="append", default=[], help="TASK=FOLDER (default runs/sst2, runs/mrpc).")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--patience", type=int, default=2, help="Exit patience (searched for and served).")
    parser.add_argument("--max_exit_layer", type=int, default=4, help="The cap k (and the truncated model's k).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and in the server.")
    # search
    parser.add_argument("--trigger_length", type=int, default=3)
    parser.add_argument("--search_examples", type=int, default=64, help="Training examples the trigger is fit on.")
    parser.add_argument("--screen_examples", type=int, default=16, help="Of those, the ones screening tokens.")
    parser.add_argument("--frequent", type=int, default=100, help="Frequent whole-word tokens screened.")
    parser.add_argument("--vocab_screen", type=int, default=40, help="Best vocabulary tokens by surrogate screened.")
    parser.add_argument(
        "--screened_per_position", type=int, default=4, help="Best screened tokens tried per position."
    )
    parser.add_argument("--hotflip_k", type=int, default=8, help="HotFlip (and surrogate) tokens tried per position.")
    parser.add_argument("--search_rounds", type=int, default=2, help="Coordinate rounds (stops early if stuck).")
    parser.add_argument("--search_batch", type=int, default=64, help="Rows per forward in the search.")
    parser.add_argument("--min_words", type=int, default=10, help="Single-sentence training examples: min. words.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--triggers", default=str(RESULTS / "slowdown_triggers.json"), help="Trigger cache (JSON).")
    parser.add_argument("--research", action="store_true", help="Search again even if a trigger is cached.")
    # measure
    parser.add_argument("--dev_examples", type=int, default=0, help="Model alone: first N dev examples (0: all).")
    parser.add_argument("--bs1_examples", type=int, default=120, help="Model alone one at a time: N dev examples.")
    parser.add_argument("--clients", default="1,16", help="Closed-loop client counts (comma-separated).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="Measured seconds per setting and round.")
    parser.add_argument("--warmup", type=float, default=1.0, help="Unmeasured seconds first.")
    parser.add_argument("--target", type=float, default=1.05, help="Capped attacked p99 / truncated p99 bound.")
    parser.add_argument("--output", default=str(RESULTS / "slowdown"), help="Results stem (.json and .md).")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing results.")
    parser.add_argument("--render_only", action="store_true", help="Re-render --output.md from --output.json.")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; use {', '.join(TASKS)}")
    args.models = dict(DEFAULT_MODELS)
    for item in args.model:
        task, _, folder = item.partition("=")
        if task not in TASKS or not folder:
            parser.error(f"--model {item!r}: use TASK=FOLDER with TASK in {', '.join(TASKS)}")
        args.models[task] = folder
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.max_exit_layer < 1 or args.patience < 1 or args.rounds < 1 or min(args.clients) < 1:
        parser.error("--patience, --max_exit_layer, --rounds and --clients must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output)
    if args.render_only:
        report = json.loads(out.with_suffix(".json").read_text())
        from pabee.provenance import write_atomic

        write_atomic(out.with_suffix(".md"), render_markdown(report))
        return
    if args.stage in ("measure", "all") and out.with_suffix(".json").exists() and not args.overwrite:
        raise SystemExit(f"{out.with_suffix('.json')} exists; pass --overwrite to replace it.")
    began = time.perf_counter()
    if args.stage in ("search", "all"):
        stage_search(args)
        print(f"search stage: {time.perf_counter() - began:.0f} s", flush=True)
    if args.stage in ("measure", "all"):
        measure_began = time.perf_counter()
        stage_measure(args)
        print(f"measure stage: {time.perf_counter() - measure_began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
