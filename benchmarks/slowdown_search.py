"""Slowdown attack, stage 1 (`slowdown.py --stage search`): a universal trigger that delays PABEE's exits.

`--trigger_length` whole-word tokens chosen greedily on a sample of TRAINING sentences to maximise the mean exit
layer under patience `--patience` (no cap). Each candidate costs one full-depth pass returning every layer's
logits; exit layers are read off them with `pabee.exits.sweep_exit_layers`, the rule real early exit uses.
Triggers are cached in `--triggers` (JSON), keyed by model digest and search settings.
"""

import json
import random
import re
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

from pabee import infer
from pabee.exits import ExitSpec, sweep_exit_layers

WHOLE_WORD = re.compile(r"[a-z]+|[0-9]+|[!-/:-@\[-`{-~]")  # vocab entries that tokenize to themselves after a space
FULL = ExitSpec("patience", patience=0)
SEARCH_SETTINGS = ("trigger_length", "search_examples", "screen_examples", "frequent", "vocab_screen")
SEARCH_SETTINGS += ("screened_per_position", "hotflip_k", "search_rounds", "min_words", "seed")


def attacked(examples: list[tuple[str, str | None]], trigger: str) -> list[tuple[str, str | None]]:
    """The trigger prepended to each example (to the first text of a pair)."""
    return [(f"{trigger} {text}", pair) for text, pair in examples]


def exit_layers(logits: np.ndarray, patience: int, max_exit_layer: int | None = None) -> np.ndarray:
    """1-based exit layer under patience of each row of every layer's logits `[..., layers, labels]`."""
    criterion = ExitSpec("patience", patience=patience, max_exit_layer=max_exit_layer).build()
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
