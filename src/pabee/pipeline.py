"""Texts in, answers out: tokenize, batch by length, run batched early exit, name the labels.

`PabeePipeline` is the one place that turns user texts into model inputs and model outputs into
`{"label", "score", "exit_layer"}`; `pabee predict`, `pabee serve` and `run-glue --do_predict` all go through it.

What an answer holds:

- single-label classification: `label` is the class name from `config.id2label`, `score` its softmax
  probability at the exit layer;
- regression (`num_labels == 1`): `label` is `None` and `score` the predicted value itself;
- multi-label classification: `label` lists the names whose sigmoid probability is >= 0.5, `score` their
  probabilities in the same order;
- `exit_layer`: the 1-based layer the example answered from.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .folders import load_runtime, load_tokenizer
from .modeling import Runtime, infer
from .rules import build_criterion
from .settings import ExitSpec, exit_spec_from
from .texts import example_problem

__all__ = ["PabeePipeline", "as_example", "pipeline", "plan_batches", "supported_length"]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_MAX_LENGTH = 128  # run-glue's default --max_seq_length: what the models here were trained with
DEFAULT_BATCH_OVERHEAD = 32.0  # a forward's fixed cost in padded tokens; fit on MiniLM + SST-2, 2 CPU threads
Example = tuple[str, str | None]  # (text, text_pair or None)
Prediction = dict[str, Any]


def as_example(item: Any, position: int | None = None) -> Example:
    """Normalise one input: a string, a `(text, text_pair)` pair, or a `{"text", "text_pair"}` mapping.

    Raises:
        ValueError: naming the position of an input that is none of these.
    """
    where = "" if position is None else f" (input {position})"
    if isinstance(item, str):
        return item, None
    if isinstance(item, Mapping):
        text, pair = item.get("text"), item.get("text_pair")
        if isinstance(text, str) and (pair is None or isinstance(pair, str)):
            return text, pair
        raise ValueError(f"A mapping input needs a string 'text' and optionally a string 'text_pair'{where}.")
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return item[0], item[1]
    raise ValueError(f"An input must be a string or a (text, text_pair) pair of strings{where}; got {item!r:.80}.")


def supported_length(model: Runtime, tokenizer: Any, max_length: int) -> int:
    """`max_length`, capped at what the encoder's positions and the tokenizer support."""
    limits = [max_length, getattr(model.config.encoder_config, "max_position_embeddings", None)]
    limits.append(getattr(tokenizer, "model_max_length", None))
    return min(v for v in limits if isinstance(v, int) and v > 0)


def plan_batches(lengths: Sequence[int], max_batch_size: int, overhead: float) -> list[tuple[int, int]]:
    """Split examples sorted by length into contiguous batches that waste little work on padding.

    Cost model: a forward pass costs `overhead` (in token-equivalents) plus one unit per padded token, i.e.
    `size × longest`. Dynamic programming finds the split of minimal total cost with at most `max_batch_size`
    examples per batch: similar lengths share a batch, and a few very long inputs do not pad many short ones.

    Args:
        lengths: token counts, ascending.
    Returns:
        `(start, end)` index ranges covering `lengths` in order.
    """
    best = [0.0] + [float("inf")] * len(lengths)  # best[i]: cheapest cost of the first i examples
    cut = [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        longest = lengths[end - 1]
        for start in range(max(0, end - max_batch_size), end):
            cost = best[start] + overhead + (end - start) * longest
            if cost < best[end]:
                best[end], cut[end] = cost, start
    ranges = []
    end = len(lengths)
    while end > 0:
        ranges.append((cut[end], end))
        end = cut[end]
    return ranges[::-1]


class PabeePipeline:
    """Batched early-exit classification of raw texts and text pairs.

    Examples are tokenized together, sorted by length, split into batches of at most `batch_size` that carry
    little padding (`plan_batches`), run with batched early exit, and returned in input order.

    Args:
        model: a PABEE runtime: the torch model (put in eval mode here) or an export on ONNX Runtime.
        tokenizer: its tokenizer.
        batch_size: most examples per forward pass.
        batch_overhead: the fixed cost of one forward pass in padded-token equivalents, for splitting a call's
            examples into batches (see `plan_batches`); a huge value gives plain batches of `batch_size`.
        max_length: tokens per example; longer inputs are truncated (pairs: the longer part first). Capped at
            what the model and tokenizer support.
        device: where to run a torch model (default: where it is).
        exit_spec: the exit setting for every call (default: the model config's), checked here.
        exit_keywords: the setting's fields as keywords over `exit_spec` (`patience=2`; `pabee.settings`).

    Example:
        >>> classify = pabee.pipeline("runs/sst2")
        >>> classify("a gripping, funny film")
        {'label': 'positive', 'score': 0.97, 'exit_layer': 2}
    """

    def __init__(
        self,
        model: Runtime,
        tokenizer: Any,
        *,
        batch_size: int = 32,
        batch_overhead: float = DEFAULT_BATCH_OVERHEAD,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str | torch.device | None = None,
        exit_spec: ExitSpec | None = None,
        **exit_keywords: Any,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: use a whole number >= 1.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length={max_length!r} is invalid: use a whole number >= 2.")
        self.model, self.device = _placed(model, device)
        self.tokenizer = tokenizer
        self.batch_size, self.batch_overhead = batch_size, batch_overhead
        self.max_length = supported_length(model, tokenizer, max_length)
        self.exit_spec = exit_spec_from(exit_keywords, exit_spec or model.config.exit_spec)
        self.criterion = build_criterion(self.exit_spec, model.config)  # bad values fail now, not on first use
        # What an answer looks like, read off the config once: a config read costs a microsecond or two
        # (transformers' attribute hooks), a dozen a call at batch size 1.
        config = model.config
        self._num_labels = config.num_labels
        self._problem = "regression" if config.is_regression else config.problem_type
        names = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(config.num_labels)]
        self._labels = None if config.is_regression else names

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        backend: str | None = None,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        threads: int | None = None,
        **kwargs: Any,
    ) -> PabeePipeline:
        """Load a saved PABEE model (or an export) and its tokenizer from a folder (`PabeeError` if it is neither).

        `backend` is `"torch"` or `"onnxruntime"` (a folder written by `pabee export`); `None` picks by the folder.
        `threads` sets ONNX Runtime's threads per session (torch's are process-wide: `torch.set_num_threads`).
        `dtype` and `attn_implementation` are passed to transformers' `from_pretrained`. On CPUs with bfloat16
        instructions (AVX512-BF16, AMX), `dtype="bfloat16"` roughly doubles throughput for a small change in the
        numbers (see `benchmarks/results/bf16_sst2.md`).
        """
        runtime = load_runtime(
            model_dir, backend, threads=threads, dtype=dtype, attn_implementation=attn_implementation
        )
        return cls(runtime, load_tokenizer(model_dir), **kwargs)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def labels(self) -> list[str] | None:
        """Class names in id order (`None` for regression), as the model's config named them when the pipeline
        was made."""
        return None if self._labels is None else list(self._labels)

    def __call__(
        self,
        inputs: Any,
        *,
        batch_size: int | None = None,
        progress: bool = False,
        exit_spec: ExitSpec | None = None,
        **exit_keywords: Any,
    ) -> Prediction | list[Prediction]:
        """Classify one input (returns one answer) or a list of inputs (returns a list, in input order).

        An input is a string, a `(text, text_pair)` pair or a `{"text", "text_pair"}` mapping; singles and pairs
        may be mixed. `exit_spec`, and exit keywords over it (`patience=3`), set this call's exit setting.
        """
        single = isinstance(inputs, (str, Mapping)) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs)
        )
        items = [inputs] if single else list(inputs)
        examples = [as_example(item, i) for i, item in enumerate(items)]
        spec = exit_spec_from(exit_keywords, exit_spec or self.exit_spec)
        logits, exit_layers = self.run(examples, batch_size=batch_size, progress=progress, exit_spec=spec)
        answers = self.format(logits, exit_layers)
        return answers[0] if single else answers

    def tokenize(self, examples: Sequence[Example]) -> list[dict[str, list[int]]]:
        """Unpadded features per example; singles and pairs are tokenized in two calls, then put back in order.

        Raises:
            ValueError: naming the first input that is not Unicode text (a lone surrogate), which the tokenizer
                refuses with an error that names no input, for all of them. The texts are looked at only then:
                callers that take texts from users (`pabee predict`, the server) check each one once, before.
        """
        features: list[dict[str, list[int]] | None] = [None] * len(examples)
        for is_pair in (False, True):
            rows = [i for i, (_, pair) in enumerate(examples) if (pair is not None) == is_pair]
            if not rows:
                continue
            texts = [examples[i][0] for i in rows]
            pairs = [examples[i][1] for i in rows] if is_pair else None
            try:
                encoded = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
            except TypeError:  # the fast tokenizers' answer to a lone surrogate: say which input holds it
                for i in rows:
                    if problem := example_problem(*examples[i]):
                        raise ValueError(f"Input {i}: {problem}; the tokenizer cannot take it.") from None
                raise
            names = [name for name in MODEL_INPUTS if name in encoded]
            for j, i in enumerate(rows):
                features[i] = {name: encoded[name][j] for name in names}
        return features

    def _pad(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right padding, which lets the engine cut trailing columns once the longest rows exit."""
        width = max(len(f["input_ids"]) for f in features)
        pad_id = self.tokenizer.pad_token_id or 0
        batch = {}
        for name in features[0]:
            fill = pad_id if name == "input_ids" else 0
            rows = [f[name] + [fill] * (width - len(f[name])) for f in features]
            batch[name] = torch.tensor(rows, dtype=torch.long, device=self.device)
        return batch

    def _forwards(
        self, examples: Sequence[Example], batch_size: int | None, spec: ExitSpec, all_layers: bool = False
    ) -> Iterator[tuple[list[int], Any]]:
        """Tokenize, sort by length, plan padding-aware batches and run them one by one: `(positions in
        examples, the engine's output)` per forward pass, shortest inputs first."""
        features = self.tokenize(examples)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        lengths = [len(features[i]["input_ids"]) for i in order]
        if getattr(self.model, "training", False):  # a torch model trained further after the pipeline was made
            self.model.eval()
        # Built once per call, not per forward pass; the pipeline's own setting was built when it was made.
        criterion = self.criterion if spec == self.exit_spec else build_criterion(spec, self.model.config)
        for start, end in plan_batches(lengths, batch_size or self.batch_size, self.batch_overhead):
            rows = order[start:end]
            batch = self._pad([features[i] for i in rows])
            with torch.inference_mode():
                out = infer(self.model, batch, criterion, all_layers=all_layers)
            yield rows, out

    def run_batches(
        self, examples: Sequence[Example], *, batch_size: int | None = None, exit_spec: ExitSpec | None = None
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Run the forward passes one by one, shortest inputs first, yielding each pass's results as it ends:
        `(positions in examples, logits [n, num_labels], exit_layers [n])`. A server answers from these early."""
        for rows, out in self._forwards(examples, batch_size, exit_spec or self.exit_spec):
            yield rows, out.logits.float().cpu(), out.exit_layers.cpu()

    def all_layer_logits(
        self, examples: Sequence[Example], *, batch_size: int | None = None, progress: bool = False
    ) -> torch.Tensor:
        """Every layer's logits `[N, layers, num_labels]` in input order, from one full pass (shortest inputs
        first): any exit setting's answers can be read off them (`pabee calibrate` compares them all)."""
        out = torch.empty(len(examples), self.num_layers, self.model.config.num_labels)
        with tqdm(total=len(examples), unit="ex", desc="All layers", disable=not progress) as bar:
            for rows, result in self._forwards(examples, batch_size, self.exit_spec, all_layers=True):
                out[torch.tensor(rows)] = result.all_logits.float().cpu()
                bar.update(len(rows))
        return out

    def run(
        self,
        examples: Sequence[Example],
        *,
        batch_size: int | None = None,
        progress: bool = False,
        exit_spec: ExitSpec | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs in input order: `logits` `[N, num_labels]` at each example's exit layer, `exit_layers` `[N]`."""
        batches = self.run_batches(examples, batch_size=batch_size, exit_spec=exit_spec)
        if len(examples) == 1:  # one pass, in order: its tensors are the answer (the server's batch size 1)
            return next(batches)[1:]
        logits = torch.empty(len(examples), self._num_labels)
        exit_layers = torch.empty(len(examples), dtype=torch.long)
        with tqdm(total=len(examples), unit="ex", desc="Predicting", disable=not progress) as bar:
            for rows, batch_logits, batch_exits in batches:
                index = torch.tensor(rows)
                logits[index], exit_layers[index] = batch_logits, batch_exits
                bar.update(len(rows))
        return logits, exit_layers

    def format(self, logits: torch.Tensor, exit_layers: torch.Tensor) -> list[Prediction]:
        """`{"label", "score", "exit_layer"}` per row, as the module docstring describes."""
        layers = exit_layers.tolist()
        if self._problem == "regression":
            values = logits[:, 0].tolist()
            return [{"label": None, "score": v, "exit_layer": e} for v, e in zip(values, layers, strict=True)]
        names = self._labels
        if self._problem == "multi_label_classification":
            answers = []
            for row, layer in zip(torch.sigmoid(logits).tolist(), layers, strict=True):
                chosen = [i for i, p in enumerate(row) if p >= 0.5]
                answers.append(
                    {"label": [names[i] for i in chosen], "score": [row[i] for i in chosen], "exit_layer": layer}
                )
            return answers
        best, ids = torch.softmax(logits, dim=-1).max(dim=-1)
        return [
            {"label": names[i], "score": p, "exit_layer": e}
            for i, p, e in zip(ids.tolist(), best.tolist(), layers, strict=True)
        ]


def _placed(model: Runtime, device: str | torch.device | None) -> tuple[Runtime, torch.device]:
    """A torch model moved to `device` (if given) in eval mode, and where its inputs go; other runtimes take CPU
    tensors."""
    if isinstance(model, torch.nn.Module):
        model = model.eval() if device is None else model.to(device).eval()
        return model, next(model.parameters()).device
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError("The ONNX Runtime backend runs on the CPU here; use the torch backend for a GPU.")
    return model, torch.device("cpu")


def pipeline(
    model: str | Path | Runtime, tokenizer: Any = None, *, exit_spec: ExitSpec | None = None, **kwargs: Any
) -> PabeePipeline:
    """A `PabeePipeline` from a saved model folder (tokenizer loaded from it) or from a model and tokenizer.

    Example:
        >>> classify = pabee.pipeline("runs/mrpc", patience=2)
        >>> classify([("He left.", "He went away."), ("It rained.", "Stocks fell.")])
        [{'label': 'equivalent', 'score': 0.81, 'exit_layer': 3}, ...]

    Keyword arguments are `PabeePipeline`'s (the exit setting among them: `exit_spec`, or its fields as keywords
    over the model's own, `patience=2`), plus `backend`, `threads`, `dtype` and `attn_implementation` when loading
    from a folder (an export from `pabee export` runs on ONNX Runtime).
    """
    loading = {name: kwargs.pop(name, None) for name in ("backend", "threads", "dtype", "attn_implementation")}
    if isinstance(model, (str, Path)):
        model, tokenizer = load_runtime(model, **loading), load_tokenizer(model)
    elif tokenizer is None:
        raise ValueError("Give the tokenizer with a model object (or pass a model folder).")
    else:
        for name, value in loading.items():
            if value is not None:
                raise ValueError(f"{name}= applies when loading from a folder; set it on the model object instead.")
    return PabeePipeline(model, tokenizer, exit_spec=exit_spec, **kwargs)
