"""Slowdown attack, measured (slowdown.md): a universal trigger that delays PABEE's exits, and what
`max_exit_layer` bounds. Inputs on which consecutive layers never agree push every example to the last layer
(WAFFLE, NeurIPS 2023; SAME, ACL 2023); the cap bounds the worst case. On the fine-tuned SST-2 and MRPC models,
by stage:

1. search: `--trigger_length` whole-word tokens chosen greedily on TRAINING sentences to maximise the mean exit
   layer under patience `--patience` (no cap). Each candidate costs one full-depth pass returning every layer's
   logits; exit layers are read off them with `pabee.sweep_exit_layers`, the rule real early exit uses. Triggers
   are cached in `--triggers` (JSON), keyed by model digest and search settings.
2. measure: the model alone (`pabee.pipeline`, real early exit) on the DEV set, the cached trigger prepended (MRPC:
   to the first sentence), for patience P, P capped at k (`--max_exit_layer`), the model truncated at k and a
   perfect attack simulated without and with the cap; then `pabee serve` for the same settings under `--clients`
   closed-loop clients, the settings interleaved over `--rounds`.
3. report: `--output`.md from `--output`.json (`--stage report`, or `--render_only`).

Target: with `max_exit_layer` k, attacked inputs' p99 latency <= 1.05x the p99 of the model truncated at k.

    python benchmarks/slowdown.py --stage all --threads 2            # search (cached) + measure, ~20 min
    python benchmarks/slowdown.py --stage measure --overwrite        # re-measure with the cached triggers
"""

import asyncio
import json
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
import numpy as np
import serving
import torch

from pabee import ExitSpec, build_criterion, exit_spec_from, infer, sweep_exit_layers
from pabee.bench import time_variants
from pabee.metrics import compute_metrics
from pabee.provenance import portable_command, portable_path

TASKS = ("SST-2", "MRPC")
DEFAULT_MODELS = {"SST-2": "runs/sst2", "MRPC": "runs/mrpc"}
WHOLE_WORD = re.compile(r"[a-z]+|[0-9]+|[!-/:-@\[-`{-~]")  # vocab entries that tokenize to themselves after a space
FULL = ExitSpec("patience", patience=0)
SEARCH_SETTINGS = ("trigger_length", "search_examples", "screen_examples", "frequent", "vocab_screen")
SEARCH_SETTINGS += ("screened_per_position", "hotflip_k", "search_rounds", "min_words", "seed")

PERFECT = "perfect attack"  # settings whose names start so simulate it: attacked inputs only
PLAIN, CAPPED, STATIC, NO_CAP, PERFECT_CAPPED = range(5)  # the settings' places in `exit_settings`
RATIOS = {  # name: (setting, input) over (setting, input), of which measure; `pabee serve` rounds of each
    "attack_p99": ((PLAIN, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "attack_p50": ((PLAIN, "attacked"), (PLAIN, "clean"), "p50_ms"),
    "attack_throughput": ((PLAIN, "clean"), (PLAIN, "attacked"), "examples_per_s"),
    "target_p99": ((CAPPED, "attacked"), (STATIC, "attacked"), "p99_ms"),
    "capped_vs_static_clean_p99": ((CAPPED, "attacked"), (STATIC, "clean"), "p99_ms"),
    "capped_vs_uncapped_attacked_p99": ((CAPPED, "attacked"), (PLAIN, "attacked"), "p99_ms"),
    "capped_vs_static_attacked_throughput": ((STATIC, "attacked"), (CAPPED, "attacked"), "examples_per_s"),
    "target_perfect_p99": ((PERFECT_CAPPED, "attacked"), (STATIC, "attacked"), "p99_ms"),
    "perfect_capped_throughput_vs_static": ((STATIC, "attacked"), (PERFECT_CAPPED, "attacked"), "examples_per_s"),
    "perfect_p99_vs_clean": ((NO_CAP, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "perfect_p50_vs_clean": ((NO_CAP, "attacked"), (PLAIN, "clean"), "p50_ms"),
    "perfect_throughput_vs_clean": ((PLAIN, "clean"), (NO_CAP, "attacked"), "examples_per_s"),
    "perfect_capped_p99_vs_clean": ((PERFECT_CAPPED, "attacked"), (PLAIN, "clean"), "p99_ms"),
    "perfect_p99_vs_perfect_capped": ((NO_CAP, "attacked"), (PERFECT_CAPPED, "attacked"), "p99_ms"),
}


# --- stage 1: the trigger search ------------------------------------------------------------------------------------


def attacked(examples: list[tuple[str, str | None]], trigger: str) -> list[tuple[str, str | None]]:
    """The trigger prepended to each example (to the first text of a pair)."""
    return [(f"{trigger} {text}", pair) for text, pair in examples]


def exit_layers(logits: np.ndarray, patience: int, max_exit_layer: int | None = None) -> np.ndarray:
    """1-based exit layer under patience of each row of every layer's logits `[..., layers, labels]`."""
    criterion = build_criterion(ExitSpec("patience", patience=patience, max_exit_layer=max_exit_layer))
    flat = torch.from_numpy(np.ascontiguousarray(logits)).reshape(-1, *logits.shape[-2:])
    return sweep_exit_layers(criterion, flat).numpy().reshape(logits.shape[:-2])


def exit_score(logits: np.ndarray, patience: int) -> dict[str, float]:
    """What the search maximises on a sample's logits `[N, layers, labels]`: the mean exit layer, then (tie-break)
    the mean number of consecutive layers that disagree before the last one."""
    predictions = logits.argmax(-1)
    flips = (predictions[:, 1:-1] != predictions[:, :-2]).sum(-1)
    return {"mean_exit_layer": float(exit_layers(logits, patience).mean()), "flips": float(flips.mean())}


def surrogate_exit_layers(logits: np.ndarray, patience: int, chunk: int = 512) -> np.ndarray:
    """Mean exit layer per candidate from predicted logits `[candidates, N, layers, labels]`, in chunks."""
    return np.concatenate([exit_layers(logits[i : i + chunk], patience).mean(1) for i in range(0, len(logits), chunk)])


def layer_logits(model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> np.ndarray:
    """Every layer's logits `[N, layers, labels]` from one full-depth pass, rows batched by length."""
    order = common.length_order(rows)
    out = np.empty((len(rows), model.num_layers, model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = common.pad([rows[i] for i in chunk], pad_id)
            out[chunk] = infer(model, batch, FULL, all_layers=True).all_logits.float().numpy()
    return out


def token_rows(features: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The pipeline's unpadded features with their attention masks."""
    return [{**f, "attention_mask": [1] * len(f["input_ids"])} for f in features]


class TriggerSearch:
    """Scores triggers on a fixed sample of token sequences: the trigger goes right after `[CLS]`.

    Inserting token ids after `[CLS]` is what tokenizing `"<trigger> <text>"` gives when every trigger token is a
    whole-word vocabulary entry (checked on the sample at the end of the search).
    """

    def __init__(self, pipe: Any, examples: list[tuple[str, str | None]], args: Any) -> None:
        self.pipe, self.model, self.tokenizer, self.args = pipe, pipe.model, pipe.tokenizer, args
        self.length, self.patience = args.trigger_length, args.patience
        features = pipe.tokenize(examples)
        room = pipe.max_length - self.length  # keep every row untruncated with the trigger in it
        self.keep = [i for i, f in enumerate(features) if len(f["input_ids"]) <= room]
        self.examples = [examples[i] for i in self.keep]
        self.features = [features[i] for i in self.keep]
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.embeddings = self.model.get_input_embeddings().weight.detach()  # [vocab, hidden]
        self.allowed = whole_word_ids(self.tokenizer, self.embeddings.shape[0])
        self.vocab = np.flatnonzero(self.allowed)
        self.passes = 0  # example forwards so far (one per example and trigger, or per example and gradient)
        self.began, self.log = time.perf_counter(), []

    def rows(self, trigger: list[int], subset: int | None = None) -> list[dict[str, list[int]]]:
        out = []
        for f in self.features[:subset]:
            row = {"input_ids": [f["input_ids"][0], *trigger, *f["input_ids"][1:]]}
            if "token_type_ids" in f:
                row["token_type_ids"] = [0] * (len(trigger) + 1) + f["token_type_ids"][1:]
            out.append(row)
        return token_rows(out)

    def score(self, triggers: list[list[int]], subset: int | None = None):
        """Per trigger: mean exit layer under patience on the sample and mean disagreeing layer pairs (tie-break);
        and the logits `[triggers, N, layers, labels]` they came from."""
        rows = [row for t in triggers for row in self.rows(t, subset)]
        self.passes += len(rows)
        logits = layer_logits(self.model, rows, self.pad_id, self.args.search_batch)
        logits = logits.reshape(len(triggers), -1, *logits.shape[1:])
        return [exit_score(x, self.patience) for x in logits], logits

    def isolated_logits(self, ids: np.ndarray) -> np.ndarray:
        """Every layer's logits `[V, layers, labels]` of `[CLS] v v ... v [SEP]` (the trigger length), per token."""
        cls, sep = self.features[0]["input_ids"][0], self.features[0]["input_ids"][-1]
        n = self.length + 2
        rows = [{"input_ids": [cls, *[int(v)] * (n - 2), sep], "attention_mask": [1] * n} for v in ids]
        if "token_type_ids" in self.features[0]:
            rows = [{**r, "token_type_ids": [0] * n} for r in rows]
        self.passes += len(rows) * n / statistics.fmean(len(f["input_ids"]) for f in self.features)  # in tokens
        return layer_logits(self.model, rows, self.pad_id, 512)

    def mixing_weights(self) -> np.ndarray:
        """The trigger's share of each sample row's tokens `[N, 1, 1]`: with mean pooling, roughly its share of the
        pooled state and so (the classifiers being linear) of every layer's logits."""
        n = np.array([len(f["input_ids"]) for f in self.features], dtype=np.float32)
        return (self.length / (self.length + n))[:, None, None]

    def gradient(self, trigger: list[int]) -> np.ndarray:
        """d loss / d trigger embeddings `[T, hidden]`; loss = expected agreement of consecutive layers before the
        last (Σ_l <softmax_l, softmax_l+1>), averaged over the sample. Lower loss: fewer agreeing layers."""
        rows = self.rows(trigger)
        order, position = common.length_order(rows), torch.arange(1, 1 + len(trigger))
        total = torch.zeros(len(trigger), self.embeddings.shape[1])
        self.model.requires_grad_(False)
        for start in range(0, len(order), self.args.search_batch):
            chunk = order[start : start + self.args.search_batch]
            batch = common.pad([rows[i] for i in chunk], self.pad_id)
            trigger_embeds = self.embeddings[torch.tensor(trigger)].clone().requires_grad_(True)
            embeds = self.embeddings[batch.pop("input_ids")].clone()
            embeds[:, position] = trigger_embeds.expand(len(chunk), -1, -1)
            p = self.model(inputs_embeds=embeds, **batch, output_all_logits=True).all_logits.float().softmax(-1)
            agreement = (p[:, :-2] * p[:, 1:-1]).sum(-1).sum(-1)  # pairs (l, l+1) with l+1 < last layer
            (agreement.sum() / len(rows)).backward()
            total += trigger_embeds.grad
        self.passes += 3 * len(rows)  # a backward costs about two forwards
        return total.numpy()

    def hotflip(self, trigger: list[int], gradient: np.ndarray, position: int, k: int) -> list[int]:
        """The k allowed tokens whose swap into `position` lowers the loss most to first order."""
        e = self.embeddings.numpy()
        change = (e - e[trigger[position]]) @ gradient[position]  # [vocab] first-order change of the loss
        change[~self.allowed] = np.inf
        change[trigger[position]] = np.inf
        return [int(i) for i in np.argsort(change)[:k]]

    def note(self, step: str, **extra: Any) -> None:
        names = self.tokenizer.convert_ids_to_tokens(self.trigger)
        self.log.append({"step": step, **extra, "trigger": names, **self.best})
        self.log[-1]["seconds"] = time.perf_counter() - self.began
        print(f"{step}: {' '.join(names)!r} -> {self.best}", flush=True)

    def screen(self, frequent: list[int]) -> None:
        """Whole-vocabulary surrogate screen, then frequent + surrogate-best tokens (repeated) scored in context: the
        first trigger, and the best screened tokens for the coordinate rounds."""
        args, names = self.args, self.tokenizer.convert_ids_to_tokens
        clean_scores, clean = self.score([[]])
        self.clean_score, self.clean = clean_scores[0], clean[0]
        print(f"clean train sample ({len(self.examples)}): {self.clean_score}", flush=True)
        self.weights, self.isolated = self.mixing_weights(), self.isolated_logits(self.vocab)  # [V, layers, labels]
        # [V, N, layers, labels]: each token's logits mixed into the sample's by its share of the tokens
        predicted = (1 - self.weights) * self.clean[None] + self.weights * self.isolated[:, None]
        surrogate = surrogate_exit_layers(predicted, self.patience)
        by_surrogate = [int(v) for v in self.vocab[np.argsort(-surrogate, kind="stable")[: args.vocab_screen]]]
        screened = frequent + [v for v in by_surrogate if v not in frequent]
        screen, _ = self.score([[v] * self.length for v in screened], subset=args.screen_examples)
        ranked = [screened[i] for i in sorted(range(len(screened)), key=lambda i: key(screen[i]), reverse=True)]
        self.best_screened = ranked[: args.screened_per_position]
        self.trigger = [ranked[0]] * self.length
        (self.best,), self.current = self.score([self.trigger])
        origin = "frequent" if ranked[0] in frequent else "vocabulary surrogate"
        self.note("screen", candidates=len(screened), best_candidate_from=origin, best_candidate=names([ranked[0]])[0])

    def candidates(self, position: int) -> dict[int, str]:
        """Tokens to try at `position`, each with where it came from: HotFlip's, the surrogate's (anchored at the
        current trigger's logits) and the screen's best."""
        sources: dict[int, str] = {}
        for v in self.hotflip(self.trigger, self.gradient(self.trigger), position, self.args.hotflip_k):
            sources.setdefault(v, "hotflip")
        swap = self.isolated - self.isolated[int(np.searchsorted(self.vocab, self.trigger[position]))]
        predicted = self.current[0][None] + self.weights / self.length * swap[:, None]
        order = np.argsort(-surrogate_exit_layers(predicted, self.patience), kind="stable")
        for v in self.vocab[order[: self.args.hotflip_k]]:
            sources.setdefault(int(v), "surrogate")
        for v in self.best_screened:
            sources.setdefault(v, "screen")
        sources.pop(self.trigger[position], None)
        return sources

    def coordinate_rounds(self) -> None:
        """Each position in turn tries its candidates in context; rounds stop when one changes nothing."""
        for round_ in range(self.args.search_rounds):
            changed = False
            for position in range(self.length):
                sources = self.candidates(position)
                tokens = list(sources)
                options = [self.trigger[:position] + [c] + self.trigger[position + 1 :] for c in tokens]
                scores, logits = self.score(options)
                top = max(range(len(options)), key=lambda i: key(scores[i]))
                if key(scores[top]) > key(self.best):
                    self.trigger, self.best, self.current, changed = (
                        options[top],
                        scores[top],
                        logits[top : top + 1],
                        True,
                    )
                best = {"best_candidate_from": sources[tokens[top]]}
                best["best_candidate"] = self.tokenizer.convert_ids_to_tokens([tokens[top]])[0]
                self.note(f"round {round_ + 1}, position {position + 1}", candidates=len(options), **best)
            if not changed:
                break


def key(score: dict[str, float]) -> tuple[float, float]:
    return score["mean_exit_layer"], score["flips"]


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


def search_trigger(task: str, model_path: str, args: Any) -> dict[str, Any]:
    """Greedy coordinate search of a universal trigger on training sentences; the cache entry for it.

    Candidate tokens come from three places: the most frequent whole-word tokens of the training text; a screen of
    the whole (whole-word) vocabulary by a linear-mixing surrogate (each token's own logits `[CLS] v v v [SEP]`,
    mixed into the sample's logits by its share of the tokens, the exit rule applied to them); and, per position,
    HotFlip (the gradient of the expected agreement of consecutive layers) and the same surrogate anchored at the
    current trigger's logits. Every candidate kept is scored in context by a real full-depth pass.
    """
    from pabee.pipeline import pipeline
    from pabee.provenance import portable_path

    torch.manual_seed(args.seed)
    pipe = pipeline(model_path)
    train, _ = common.glue_split(task, args.glue_dir, "train")
    rng = random.Random(args.seed)
    pool = [i for i, (text, pair) in enumerate(train) if pair is not None or len(text.split()) >= args.min_words]
    chosen = rng.sample(pool, min(args.search_examples, len(pool)))
    search = TriggerSearch(pipe, [train[i] for i in chosen], args)
    texts = [t for ex in rng.sample(train, min(20_000, len(train))) for t in ex if t]
    search.screen(frequent_ids(pipe.tokenizer, texts, search.allowed, args.frequent))
    search.coordinate_rounds()
    # The id-level insertion must be what the tokenizer makes of the text with the trigger prepended.
    names = pipe.tokenizer.convert_ids_to_tokens(search.trigger)
    produced = [f["input_ids"] for f in pipe.tokenize(attacked(search.examples, " ".join(names)))]
    if [r["input_ids"] for r in search.rows(search.trigger)] != produced:
        raise AssertionError(f"trigger {' '.join(names)!r} does not tokenize as inserted ids")
    return {
        "task": task,
        "model": portable_path(model_path),
        "trigger": " ".join(names),
        "trigger_tokens": names,
        "train_sample_size": len(search.examples),
        "train_sample_rows": [chosen[i] for i in search.keep],  # 0-based rows of train.tsv (after its header)
        "train_sample_clean": search.clean_score,
        "train_sample_triggered": search.best,
        "search_seconds": time.perf_counter() - search.began,
        "example_passes": round(search.passes),
        "log": search.log,
        "exit_rule": "sweep_exit_layers",
    }


def cache_key(task: str, model_path: str, args: Any) -> dict[str, Any]:
    """What a cached trigger depends on: the model's weights and every search setting."""
    from pabee.provenance import file_digest

    weights = Path(model_path) / "model.safetensors"
    digest = file_digest(weights) if weights.is_file() else None
    return {"task": task, "model_sha256": digest, "patience": args.patience} | {
        name: getattr(args, name) for name in SEARCH_SETTINGS
    }


def stage_search(args: Any) -> None:
    """A trigger per task, searched unless one with these settings is cached (or --research)."""
    from pabee.provenance import portable_path, provenance, write_json

    torch.set_num_threads(args.threads)
    path = Path(args.triggers)
    cache = json.loads(path.read_text()) if path.is_file() else {"triggers": []}
    for task in args.tasks:
        key = cache_key(task, args.models[task], args)
        cached = [e for e in cache["triggers"] if e["key"] == key]
        if cached and not args.research:
            print(f"[{task}] cached trigger {cached[0]['trigger']!r} (use --research to search again)", flush=True)
            continue
        entry = search_trigger(task, args.models[task], args)
        entry |= {"key": key, "provenance": provenance(model=portable_path(args.models[task]))}
        cache["triggers"] = [e for e in cache["triggers"] if e["key"] != key] + [entry]
        write_json(path, cache)
        print(f"[{task}] trigger {entry['trigger']!r} in {entry['search_seconds']:.0f} s -> {path}", flush=True)


def cached_trigger(task: str, args: Any) -> dict[str, Any]:
    path, key = Path(args.triggers), cache_key(task, args.models[task], args)
    for entry in json.loads(path.read_text())["triggers"] if path.is_file() else []:
        if entry["key"] == key:
            return entry
    raise SystemExit(f"No cached trigger for {task} with these settings in {path}; run --stage search first.")


# --- stage 2: the measurements --------------------------------------------------------------------------------------


def exit_settings(args: Any) -> dict[str, dict[str, Any]]:
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


# --- the model alone -----------------------------------------------------------------------------------------------


def model_alone(task: str, pipe: Any, entry: dict[str, Any], args: Any) -> dict[str, Any]:
    """Dev set, clean vs triggered: one-pass sweep over patiences, and real early exit for each exit setting."""
    from pabee.glue import get_task

    dev, labels = common.glue_split(task, args.glue_dir)
    dev, labels = (dev[: args.dev_examples], labels[: args.dev_examples]) if args.dev_examples else (dev, labels)
    inputs = {"clean": dev, "attacked": attacked(dev, entry["trigger"])}
    out: dict[str, Any] = {"num_examples": len(dev), "sweep": {}, "per_layer": {}, "settings": {}}
    tokens = {name: [len(f["input_ids"]) for f in pipe.tokenize(x)] for name, x in inputs.items()}
    out["mean_tokens"] = {name: statistics.fmean(lengths) for name, lengths in tokens.items()}
    # What the search computed on its training sample (one pass, the exit rule) against real early exit.
    train, _ = common.glue_split(task, args.glue_dir, "train")
    sample, spec = [train[i] for i in entry["train_sample_rows"]], ExitSpec("patience", patience=args.patience)
    out["search_check"] = {
        name: {
            "search_mean_exit_layer": entry[f"train_sample_{name}"]["mean_exit_layer"],
            "real_mean_exit_layer": float(pipe.run(examples, exit_spec=spec)[1].float().mean()),
        }
        for name, examples in (("clean", sample), ("triggered", attacked(sample, entry["trigger"])))
    }
    metrics = get_task(task).metrics
    for name, examples in inputs.items():
        # Tokenized exactly as the pipeline (and the server) does it.
        logits = layer_logits(pipe.model, token_rows(pipe.tokenize(examples)), pipe.tokenizer.pad_token_id, 32)
        predictions = logits.argmax(-1)
        out["sweep"][name] = []
        for p in range(pipe.num_layers):
            exits = exit_layers(logits, p)
            answers = predictions[np.arange(len(dev)), exits - 1]
            out["sweep"][name].append({"patience": p, "avg_exit_layer": float(exits.mean())})
            out["sweep"][name][-1] |= compute_metrics(metrics, answers, labels)
        out["per_layer"][name] = [compute_metrics(metrics, predictions[:, i], labels) for i in range(pipe.num_layers)]
        for setting, options in exit_settings(args).items():
            result = real_exits(pipe, examples, exit_spec_from(options, ExitSpec()), logits, labels, metrics)
            out["settings"].setdefault(setting, {})[name] = result
            print(f"[{task}] model alone, {setting}, {name}: {result}", flush=True)
    if args.bs1_examples:
        out["one_at_a_time"] = one_at_a_time(task, pipe, dev, entry["trigger"], args)
    return out


def real_exits(pipe: Any, examples: list, spec: ExitSpec, logits: np.ndarray, labels, metrics) -> dict[str, Any]:
    """Real early exit at one setting, against the exits and answers read off the one-pass `logits`."""
    began = time.perf_counter()
    real_logits, real = pipe.run(examples, exit_spec=spec)
    seconds, real = time.perf_counter() - began, real.numpy()
    swept = sweep_exit_layers(build_criterion(spec, pipe.model.config), torch.as_tensor(logits)).numpy()
    swept_answers = logits.argmax(-1)[np.arange(len(examples)), swept - 1]
    answers = real_logits.argmax(-1).numpy()
    return {
        **compute_metrics(metrics, answers, labels),
        "avg_exit_layer": float(real.mean()),
        "exit_histogram": np.bincount(real, minlength=pipe.num_layers + 1)[1:].tolist(),
        "examples_per_s": len(examples) / seconds,
        "one_pass_avg_exit_layer": float(swept.mean()),
        "exit_layers_equal_one_pass": int((swept == real).sum()),
        "answers_equal_one_pass": int((swept_answers == answers).sum()),
    }


def one_at_a_time(task: str, pipe: Any, dev: list, trigger: str, args: Any) -> dict[str, Any]:
    """The model alone, one example per call (what a 1-client server runs, without HTTP): per-example latency of
    the settings the verdicts compare, interleaved over `--rounds` rounds on the same random dev examples."""
    settings = exit_settings(args)
    names = list(settings)
    combos = [(names[PLAIN], "clean")] + [(name, "attacked") for name in names]  # every setting, PLAIN first
    rows = random.Random(args.seed).sample(range(len(dev)), min(args.bs1_examples, len(dev)))
    inputs = {"clean": [dev[i] for i in rows], "attacked": attacked([dev[i] for i in rows], trigger)}

    def variant(setting: str, name: str):
        spec = exit_spec_from(settings[setting], ExitSpec())

        def run(timing) -> None:
            for example in inputs[name]:
                began = time.perf_counter()
                pipe.run([example], exit_spec=spec)
                timing.latencies.append(time.perf_counter() - began)

        return run

    timings = time_variants({f"{s} | {n}": variant(s, n) for s, n in combos}, args.rounds, 1, args.seed)
    out: dict[str, Any] = {"examples": len(rows), "settings": {}}
    for label, timing in timings.items():
        pooled = timing.latencies
        rounds = [pooled[i : i + len(rows)] for i in range(0, len(pooled), len(rows))]
        out["settings"][label] = {
            "examples_per_s": len(pooled) / sum(pooled),
            "p50_ms": 1000 * serving.percentile(pooled, 50),
            "p99_ms": 1000 * serving.percentile(pooled, 99),
            "p99_ms_per_round": [1000 * serving.percentile(r, 99) for r in rounds],
            "mean_ms_per_round": [1000 * statistics.fmean(r) for r in rounds],
        }
        print(f"[{task}] one at a time, {label}: {out['settings'][label]}", flush=True)
    return out | alone_ratios(out["settings"], names, args.target)


def alone_ratios(settings: dict[str, dict], names: list[str], target: float) -> dict[str, Any]:
    """The verdicts of the one-at-a-time runs: capped (real trigger, perfect attack) over truncated, p99."""

    def ratio(a: int, b: int) -> dict[str, Any]:
        x, y = settings[f"{names[a]} | attacked"], settings[f"{names[b]} | attacked"]
        means = [m / n for m, n in zip(x["mean_ms_per_round"], y["mean_ms_per_round"], strict=True)]
        return {"p99": x["p99_ms"] / y["p99_ms"], "mean_per_round": means, "met": x["p99_ms"] / y["p99_ms"] <= target}

    clean, hit = settings[f"{names[PLAIN]} | clean"], settings[f"{names[PLAIN]} | attacked"]
    return {
        "target": ratio(CAPPED, STATIC),
        "target_perfect": ratio(PERFECT_CAPPED, STATIC),
        "attack_p99": hit["p99_ms"] / clean["p99_ms"],
        "attack_mean": clean["examples_per_s"] / hit["examples_per_s"],
        "perfect_p99": settings[f"{names[NO_CAP]} | attacked"]["p99_ms"] / clean["p99_ms"],
    }


# --- the server ----------------------------------------------------------------------------------------------------


def measure_load(port: int, requests: list[bytes], clients: int, args: Any, seed: int) -> dict:
    """Warm up, then one timed run; throughput, latency percentiles and the exit layers /metrics counted."""

    async def drive(seconds: float, seed: int) -> tuple[list[tuple], float]:
        began = asyncio.get_running_loop().time()
        rows = await serving.closed_loop(port, requests, clients, began + seconds, seed=seed)
        return serving.answered(rows), max([began, *(row[1] for row in rows)]) - began

    asyncio.run(drive(args.warmup, seed + 7919))
    before, load_before = serving.metrics(port), serving.load_average()
    rows, wall = asyncio.run(drive(args.duration, seed))
    diff = {name: value - before.get(name, 0.0) for name, value in serving.metrics(port).items()}
    buckets = {float(n.split('"')[1]): v for n, v in diff.items() if n.startswith("pabee_exit_layer_bucket")}
    cumulative = [buckets[le] for le in sorted(buckets) if le != float("inf")]  # layers 1..L, cumulative counts
    latencies = [row[1] - row[0] for row in rows]
    return {
        "requests": len(latencies),
        "seconds": wall,
        "examples_per_s": len(latencies) / wall,
        "p50_ms": 1000 * serving.percentile(latencies, 50),
        "p99_ms": 1000 * serving.percentile(latencies, 99),
        "mean_ms": 1000 * statistics.fmean(latencies),
        "avg_exit_layer": diff["pabee_exit_layer_sum"] / diff["pabee_exit_layer_count"],
        "exit_histogram": [int(b - a) for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)],
        "avg_batch_size": diff["pabee_batch_size_sum"] / max(1.0, diff["pabee_batch_size_count"]),
        "forward_busy": diff["pabee_batch_duration_seconds_sum"] / wall,
        "load_average_before": load_before,
    }


def serve_rounds(args: Any, triggers: dict[str, str]) -> dict[str, Any]:
    """Every task × exit setting × clients × input, interleaved over `--rounds`; per-round results."""
    settings = exit_settings(args)
    runs: dict[str, dict[str, list[dict]]] = {task: {} for task in args.tasks}
    requests = {}
    for task in args.tasks:
        dev, _ = common.glue_split(task, args.glue_dir)
        requests[task] = {"clean": serving.bodies(dev), "attacked": serving.bodies(attacked(dev, triggers[task]))}
    names = list(settings)
    for round_ in range(args.rounds):
        for task in args.tasks:
            for setting in names[round_ % len(names) :] + names[: round_ % len(names)]:  # rotated each round
                options = serving.flags(threads=args.threads, no_access_log=True, **settings[setting])
                with serving.serving(args.models[task], options, "slowdown.log") as (port, _):
                    for clients in args.clients:
                        order = ("clean", "attacked") if round_ % 2 == 0 else ("attacked", "clean")
                        if setting.startswith(PERFECT):  # a simulated attack: attacked inputs (their lengths)
                            order = ("attacked",)
                        for name in order:
                            # Same seed for clean and attacked: the same dev examples in the same order.
                            result = measure_load(port, requests[task][name], clients, args, 100 * round_ + clients)
                            label = f"{setting} | {name} | {clients} client{'s' if clients > 1 else ''}"
                            runs[task].setdefault(label, []).append(result)
                            print(f"round {round_ + 1}/{args.rounds} [{task}] {label}: {result}", flush=True)
    return runs


def summarise(runs: dict[str, list[dict]], args: Any) -> dict[str, Any]:
    """Medians over rounds per setting, and the ratios within each round that the verdicts use."""
    keys = ("examples_per_s", "p50_ms", "p99_ms", "mean_ms", "avg_exit_layer", "avg_batch_size", "forward_busy")
    medians = {label: {k: statistics.median(r[k] for r in rs) for k in keys} for label, rs in runs.items()}
    names = list(exit_settings(args))
    out: dict[str, Any] = {"medians": medians, "by_clients": {}}
    for clients in args.clients:
        suffix = f"{clients} client{'s' if clients > 1 else ''}"
        by = out["by_clients"][suffix] = {}
        for ratio, ((a, x), (b, y), key) in RATIOS.items():
            top, bottom = runs[f"{names[a]} | {x} | {suffix}"], runs[f"{names[b]} | {y} | {suffix}"]
            per_round = [p[key] / q[key] for p, q in zip(top, bottom, strict=True)]
            by[ratio] = {
                "of_medians": statistics.median(p[key] for p in top) / statistics.median(q[key] for q in bottom),
                "per_round": per_round,
                "median_per_round": statistics.median(per_round),
            }
        for name in ("target", "target_perfect"):
            by[f"{name}_met"] = by[f"{name}_p99"]["of_medians"] <= args.target
            by[f"{name}_met_rounds"] = sum(r <= args.target for r in by[f"{name}_p99"]["per_round"])
    out["note"] = f"patience {args.patience}, cap k={args.max_exit_layer}"
    return out


def stage_measure(args: Any) -> dict[str, Any]:
    """The report: the model alone per task, then the server rounds."""
    from pabee.pipeline import pipeline

    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    entries = {task: cached_trigger(task, args) for task in args.tasks}
    alone = {task: model_alone(task, pipeline(args.models[task]), entries[task], args) for task in args.tasks}
    alone_seconds, load_start, serve_began = time.perf_counter() - began, serving.load_average(), time.perf_counter()
    runs = serve_rounds(args, {task: e["trigger"] for task, e in entries.items()})
    tasks = {}
    for task in args.tasks:
        patience = json.loads((Path(args.models[task]) / "config.json").read_text())["patience"]
        trigger = {k: v for k, v in entries[task].items() if k != "provenance"}
        tasks[task] = {
            "model": portable_path(args.models[task]),
            "model_config_patience": patience,
            "trigger": trigger,
        }
        tasks[task] |= {"model_alone": alone[task], "server": summarise(runs[task], args), "server_runs": runs[task]}
    argv = [portable_command(arg) for arg in sys.argv]
    return common.report(
        **{k: getattr(args, k) for k in ("patience", "max_exit_layer")},
        target_ratio=args.target,
        exit_rule="sweep_exit_layers",
        **{k: getattr(args, k) for k in ("threads", "clients", "rounds", "duration", "warmup")},
        settings=exit_settings(args),
        tasks=tasks,
        elapsed_seconds={
            "model_alone": alone_seconds,
            "server": time.perf_counter() - serve_began,
            "measure_total": time.perf_counter() - began,
            "search_recorded": {task: entries[task]["search_seconds"] for task in args.tasks},
        },
        load_average_start=load_start,
        load_average_end=serving.load_average(),
        provenance={
            "models": {task: portable_path(model) for task, model in args.models.items()},
            "data": portable_path(Path(args.glue_dir).resolve()),
            "triggers": portable_path(Path(args.triggers).resolve()),
            "stage_command": argv,
        },
    )


# --- stage 3: the report --------------------------------------------------------------------------------------------

NUMPY_RULE = {  # how exit layers were read off one pass: reports before `exit_rule` used a numpy copy of the rule
    None: (
        " in numpy (checked equal to `pabee.exits.sweep_exit_layers`)",
        "in numpy",
        ", and the search's numpy rule for patience",
    ),
    "sweep_exit_layers": (" with `pabee.exits.sweep_exit_layers`", "applied", ""),
}


def render(report: dict[str, Any]) -> str:
    lines = header(report) + summary_lines(report) + what_was_done(report)
    for task, t in report["tasks"].items():
        metrics = ["accuracy", "f1"] if task == "MRPC" else ["accuracy"]
        lines += trigger_and_model_alone(report, task, t, metrics) + one_at_a_time_lines(report, t["model_alone"])
        lines += sweep_lines(report, t["model_alone"], metrics) + server_lines(report, t) + search_log(t["trigger"])
    return "\n".join([*lines, "", "## Caveats", "", *(f"- {c}" for c in CAVEATS)]) + "\n"


def _metric_cells(row: dict[str, Any], metrics: list[str]) -> str:
    return " | ".join(f"{100 * row[m]:.1f}" for m in metrics)


def _heads(metrics: list[str]) -> list[str]:
    return ["Acc" if m == "accuracy" else "F1" for m in metrics]


def header(report: dict[str, Any]) -> list[str]:
    p, k = report["patience"], report["max_exit_layer"]
    prov, elapsed = report["provenance"], report["elapsed_seconds"]
    hw = prov["hardware"]
    return [
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
    ]


def what_was_done(report: dict[str, Any]) -> list[str]:
    p, k, rule = report["patience"], report["max_exit_layer"], NUMPY_RULE[report.get("exit_rule")]
    return [
        "## What was done",
        "",
        "- **Trigger** (`--stage search`): a universal sequence of whole-word tokens, chosen greedily on a random "
        "sample of *training* examples to maximise the mean exit layer under patience "
        f"{p} (no cap), then prepended to every *dev* example (MRPC: to the first sentence). Each candidate costs "
        "one full-depth pass returning all layers' logits; exit layers under patience are read off them"
        f"{rule[0]}. Candidates, each scored in context by such a pass: the "
        "most frequent whole-word tokens of the training text and the best of the whole whole-word vocabulary by a "
        "linear-mixing surrogate (each token's own per-layer logits, `[CLS] v v v [SEP]`, mixed into the sample's "
        "clean logits by the trigger's share of the tokens, as mean pooling and linear heads roughly do; exit rule "
        f"{rule[1]}), each tried as the token repeated; then coordinate rounds in which each position tries the "
        "HotFlip top-k (gradient of the expected agreement Σ<softmax_l, softmax_l+1> of consecutive layers before "
        "the last w.r.t. the trigger embeddings), the surrogate's top-k for a swap at that position, and the best "
        "screened tokens, keeping the best; rounds stop when one changes nothing.",
        "- **Model alone** (`pabee.pipeline`, real early exit, batches of 32) on the whole dev set, clean vs "
        f"attacked, for patience {p}; patience {p} with `max_exit_layer` {k}; the model truncated at layer {k} "
        f"(`static` {k}: the plain model's first {k} layers and classifier {k}). Real exits are compared with the "
        f"one-pass sweep (`sweep_exit_layers`{rule[2]}).",
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


def trigger_and_model_alone(report: dict[str, Any], task: str, t: dict[str, Any], metrics: list[str]) -> list[str]:
    trig, alone, n = t["trigger"], t["model_alone"], t["model_alone"]["num_examples"]
    rule = "numpy rule" if trig.get("exit_rule") is None else "the exit rule"
    lines = [
        "",
        f"## {task} (`{t['model']}`)",
        "",
        f"The model's `config.json` says patience {t['model_config_patience']} (run-glue saves the first of "
        f"`--patience 1,2,3,4,5`); this uses patience {report['patience']}.",
        "",
        f"**Trigger: `{trig['trigger']}`** — searched on {trig['train_sample_size']} training examples in "
        f"{trig['search_seconds']:.0f} s ({trig['example_passes']} example passes); on that sample the mean exit "
        f"layer went {trig['train_sample_clean']['mean_exit_layer']:.3f} → "
        f"{trig['train_sample_triggered']['mean_exit_layer']:.3f} (search, one pass + {rule}); real early "
        f"exit on the same sample in this run: {alone['search_check']['clean']['real_mean_exit_layer']:.3f} → "
        f"{alone['search_check']['triggered']['real_mean_exit_layer']:.3f}. Dev examples average "
        f"{alone['mean_tokens']['clean']:.1f} tokens, so the trigger is "
        f"{len(trig['trigger_tokens']) / alone['mean_tokens']['attacked']:.0%} of the tokens the mean-pooled "
        "classifiers average over.",
        "",
        f"Model alone, dev ({n} examples), real early exit:",
        "",
    ]
    head = ["Exit setting", "Input", *_heads(metrics), "Avg. exit layer", "Exits per layer", "One-pass avg. exit"]
    rows = [
        [
            setting,
            name,
            _metric_cells(r, metrics),
            f"{r['avg_exit_layer']:.2f}",
            " / ".join(map(str, r["exit_histogram"])),
        ]
        + [
            f"{r['one_pass_avg_exit_layer']:.2f}",
            f"{r['exit_layers_equal_one_pass']}/{n}",
            f"{r['examples_per_s']:.0f}",
        ]
        for setting, by_input in alone["settings"].items()
        for name, r in by_input.items()
    ]
    return lines + common.table([*head, "Exits equal to one pass", "ex/s (one run)"], rows)


def one_at_a_time_lines(report: dict[str, Any], alone: dict[str, Any]) -> list[str]:
    if "one_at_a_time" not in alone:
        return []
    one, k = alone["one_at_a_time"], report["max_exit_layer"]
    lines = [
        "",
        f"Model alone, one example per call ({one['examples']} random dev examples, {report['rounds']} "
        "interleaved rounds, latencies pooled; no HTTP: what a 1-client server computes):",
        "",
    ]
    rows = [
        [*label.split(" | "), f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}"]
        + [", ".join(f"{v:.2f}" for v in r["p99_ms_per_round"])]
        for label, r in one["settings"].items()
    ]
    lines += common.table(["Exit setting", "Input", "ex/s", "p50 ms", "p99 ms", "p99 ms per round"], rows)
    return lines + [
        "",
        f"- Target, model alone (attacked p99 with `max_exit_layer` {k} / the truncated model's): real "
        f"trigger **{one['target']['p99']:.3f}x** ({'met' if one['target']['met'] else 'missed'}); "
        f"perfect attack **{one['target_perfect']['p99']:.3f}x** "
        f"({'met' if one['target_perfect']['met'] else 'missed'}; mean latency per round "
        f"{', '.join(f'{v:.3f}' for v in one['target_perfect']['mean_per_round'])}x).",
        f"- The real trigger without a cap: p99 {one['attack_p99']:.3f}x clean's, mean latency "
        f"{one['attack_mean']:.3f}x; a perfect attack without a cap: p99 {one['perfect_p99']:.3f}x clean's.",
    ]


def sweep_lines(report: dict[str, Any], alone: dict[str, Any], metrics: list[str]) -> list[str]:
    heads = " | ".join(_heads(metrics))
    rows = [
        [
            "0 (full)" if c["patience"] == 0 else c["patience"],
            f"{c['avg_exit_layer']:.2f}",
            f"{a['avg_exit_layer']:.2f}",
        ]
        + [_metric_cells(c, metrics), _metric_cells(a, metrics)]
        for c, a in zip(alone["sweep"]["clean"], alone["sweep"]["attacked"], strict=True)
    ]
    head = ["Patience", "Clean avg. exit", "Attacked avg. exit", f"Clean {heads}", f"Attacked {heads}"]
    table = common.table(head, rows)
    table[1] = "|---|---|---|" + "---|" * (2 * len(metrics))
    intro = f"Every patience from the one-pass sweep (the trigger was searched for patience {report['patience']}):"
    return ["", intro, "", *table]


def server_lines(report: dict[str, Any], t: dict[str, Any]) -> list[str]:
    lines = ["", f"Server, medians over {report['rounds']} rounds:", ""]
    rows = []
    for label, r in t["server"]["medians"].items():
        setting, name, clients = label.split(" | ")
        rows.append([setting, name, clients.split()[0], f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.1f}"])
        rows[-1] += [f"{r['p99_ms']:.1f}", f"{r['avg_exit_layer']:.2f}", f"{r['avg_batch_size']:.1f}"]
    head = ["Exit setting", "Input", "Clients", "ex/s", "p50 ms", "p99 ms", "Avg. exit layer (/metrics)", "Avg. batch"]
    lines += [*common.table(head, rows), "", "Ratios (of the medians; per round in brackets):", ""]
    for suffix, r in t["server"]["by_clients"].items():
        lines += ratio_lines(report, suffix, r)
    lines += ["", "Per round:", ""]
    rows = []
    for label, rs in t["server_runs"].items():
        setting, name, clients = label.split(" | ")
        for i, r in enumerate(rs, start=1):
            rows.append([setting, name, clients.split()[0], i, f"{r['examples_per_s']:.1f}", f"{r['p50_ms']:.1f}"])
            rows[-1] += [f"{r['p99_ms']:.1f}", f"{r['avg_exit_layer']:.2f}", r["load_average_before"]]
    head = ["Exit setting", "Input", "Clients", "Round", "ex/s", "p50 ms", "p99 ms", "Avg. exit layer", "Load before"]
    return lines + common.table(head, rows)


def ratio_lines(report: dict[str, Any], suffix: str, r: dict[str, Any]) -> list[str]:
    p, k, target = report["patience"], report["max_exit_layer"], report["target_ratio"]

    def fmt(x: dict[str, Any]) -> str:
        return f"**{x['of_medians']:.3f}x** [{', '.join(f'{v:.3f}' for v in x['per_round'])}]"

    verdict, verdict_perfect = ("met" if r[f"{name}_met"] else "missed" for name in ("target", "target_perfect"))
    return [
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


def search_log(trig: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "Search log (the best candidate of each step and where it came from; the trigger changes only if it "
        "beats the current one):",
        "",
    ]
    rows = [
        [s["step"], s["candidates"], f"`{s.get('best_candidate', '')}` ({s['best_candidate_from']})"]
        + [f"`{' '.join(s['trigger'])}`", f"{s['mean_exit_layer']:.3f}", f"{s['flips']:.2f}", f"{s['seconds']:.0f}"]
        for s in trig["log"]
    ]
    head = ["Step", "Candidates", "Best candidate (from)", "Trigger after", "Mean exit (train sample)", "Flips", "s"]
    return lines + common.table(head, rows)


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


# --- the command ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None):
    parser = common.parser(__doc__, "slowdown", threads=1, rounds=3)
    parser.add_argument("--stage", choices=["search", "measure", "report", "all"], default="all")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated: SST-2, MRPC.")
    parser.add_argument("--patience", type=int, default=2, help="Exit patience (searched for and served).")
    parser.add_argument("--max_exit_layer", type=int, default=4, help="The cap k (and the truncated model's k).")
    search = parser.add_argument_group("search")
    search.add_argument("--trigger_length", type=int, default=3)
    search.add_argument("--search_examples", type=int, default=64, help="Training examples the trigger is fit on.")
    search.add_argument("--screen_examples", type=int, default=16, help="Of those, the ones screening tokens.")
    search.add_argument("--frequent", type=int, default=100, help="Frequent whole-word tokens screened.")
    search.add_argument("--vocab_screen", type=int, default=40, help="Best vocabulary tokens by surrogate screened.")
    search.add_argument("--screened_per_position", type=int, default=4, help="Screened tokens tried per position.")
    search.add_argument("--hotflip_k", type=int, default=8, help="HotFlip (and surrogate) tokens tried per position.")
    search.add_argument("--search_rounds", type=int, default=2, help="Coordinate rounds (stops early if stuck).")
    search.add_argument("--search_batch", type=int, default=64, help="Rows per forward in the search.")
    search.add_argument("--min_words", type=int, default=10, help="Single-sentence training examples: min. words.")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--triggers", default=str(common.RESULTS / "slowdown_triggers.json"), help="Trigger cache.")
    search.add_argument("--research", action="store_true", help="Search again even if a trigger is cached.")
    measure = parser.add_argument_group("measure")
    measure.add_argument("--dev_examples", type=int, default=0, help="Model alone: first N dev examples (0: all).")
    measure.add_argument("--bs1_examples", type=int, default=120, help="Model alone one at a time: N dev examples.")
    measure.add_argument("--clients", default="1,16", help="Closed-loop client counts (comma-separated).")
    measure.add_argument("--duration", type=float, default=5.0, help="Measured seconds per setting and round.")
    measure.add_argument("--warmup", type=float, default=1.0, help="Unmeasured seconds first.")
    measure.add_argument("--target", type=float, default=1.05, help="Capped attacked p99 / truncated p99 bound.")
    measure.add_argument("--overwrite", action="store_true", help="Replace existing results.")
    args = parser.parse_args(argv)
    args.render_only |= args.stage == "report"
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.models = DEFAULT_MODELS | (common.task_models(args) if args.model else {})
    if not set(args.tasks) | set(args.models) <= set(TASKS):
        parser.error(f"tasks and --model TASK=FOLDER: TASK is one of {', '.join(TASKS)}")
    args.clients = [int(c) for c in args.clients.split(",")]
    if args.max_exit_layer < 1 or args.patience < 1 or args.rounds < 1 or min(args.clients) < 1:
        parser.error("--patience, --max_exit_layer, --rounds and --clients must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    measuring = args.stage in ("measure", "all") and not args.render_only
    if measuring and Path(args.output).with_suffix(".json").exists() and not args.overwrite:
        raise SystemExit(f"{Path(args.output).with_suffix('.json')} exists; pass --overwrite to replace it.")
    began = time.perf_counter()
    if args.stage in ("search", "all") and not args.render_only:
        stage_search(args)
        print(f"search stage: {time.perf_counter() - began:.0f} s", flush=True)
    if measuring or args.render_only:
        common.write_report(args, stage_measure, render)


if __name__ == "__main__":
    main()
