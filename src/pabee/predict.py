"""`pabee predict`: a file of texts in, one JSON line per example out (label, score, exit layer).

Input formats, by file suffix:

- `.txt` (or no suffix): one example per line; a tab splits a line into a text pair; blank lines are skipped;
- `.tsv`: a header row naming the text column (and for pairs the second column), tab-separated without
  quoting, like the GLUE files; `.csv`: the same with standard CSV quoting;
- `.jsonl`: one JSON object per line with the text (and text pair) fields.

Column names default to `text` and `text_pair` and can be chosen (`--text_column sentence1
--text_pair_column sentence2` reads GLUE's RTE files). Every output line carries the input's line number, so it
can be joined back to the input.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import read_jsonl_records
from .errors import DataError, PabeeError
from .pipeline import ATTENTION_KERNELS, DEFAULT_MAX_LENGTH, DTYPES, EXIT_OPTIONS, Example, PabeePipeline

csv.field_size_limit(sys.maxsize)


@dataclass
class PredictArguments:
    """Flags of `pabee predict`."""

    model: str = field(metadata={"help": "Fine-tuned PABEE model folder (e.g. the --output_dir of run-glue)."})
    input: str = field(metadata={"help": "Texts: .txt (one per line, a tab splits a pair), .tsv, .csv or .jsonl."})
    output: str | None = field(default=None, metadata={"help": "JSON-lines output file (default: standard output)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output file."})
    text_column: str = field(default="text", metadata={"help": "Column/field holding the text (tsv, csv, jsonl)."})
    text_pair_column: str = field(
        default="text_pair", metadata={"help": "Column/field holding the second text of a pair, where present."}
    )
    patience: int | None = field(default=None, metadata={"help": "Patience (0 = full model). Default: the model's."})
    exit_criterion: str | None = field(default=None, metadata={"help": "Exit rule, where the model supports it."})
    exit_threshold: float | None = field(default=None, metadata={"help": "The exit rule's threshold."})
    max_exit_layer: int | None = field(default=None, metadata={"help": "No example uses more layers than this."})
    batch_size: int = field(default=32, metadata={"help": "Examples per forward pass (batched by length)."})
    max_seq_length: int = field(
        default=DEFAULT_MAX_LENGTH, metadata={"help": "Tokens per example; longer inputs are truncated."}
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights' dtype (default: as saved, float32); bfloat16 is faster on recent CPUs.",
            "choices": list(DTYPES),
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel (default: the model's, sdpa).", "choices": list(ATTENTION_KERNELS)},
    )

    def exit_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EXIT_OPTIONS if getattr(self, name) is not None}


@dataclass
class InputRow:
    line: int
    text: str
    text_pair: str | None = None


def _read_text_lines(path: Path) -> list[InputRow]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) > 2:
                raise DataError(f"{path}, line {line_no}: {len(parts)} tab-separated fields; use 1 or 2 (a pair).")
            rows.append(InputRow(line_no, parts[0], parts[1] if len(parts) == 2 else None))
    return rows


def _read_table(path: Path, delimiter: str, text_column: str) -> list[tuple[int, dict]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    records = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if reader.fieldnames is None or text_column not in reader.fieldnames:
            raise DataError(
                f"{path}: the header must name a {text_column!r} column (found {reader.fieldnames}); "
                "choose it with --text_column."
            )
        for record in reader:
            if None in record or None in record.values():
                raise DataError(f"{path}, line {reader.line_num}: the number of columns differs from the header.")
            records.append((reader.line_num, record))
    return records


def read_inputs(path: str | Path, text_column: str = "text", text_pair_column: str = "text_pair") -> list[InputRow]:
    """Read a prediction input file (see the module docstring); `DataError` names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Missing input file {path}.")
    suffix = path.suffix.lower()
    if suffix in ("", ".txt"):
        rows = _read_text_lines(path)
    else:
        if suffix == ".jsonl":
            records = read_jsonl_records(path)
        elif suffix in (".tsv", ".csv"):
            records = _read_table(path, "\t" if suffix == ".tsv" else ",", text_column)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r}; use .txt, .tsv, .csv or .jsonl.")
        rows = []
        for line_no, record in records:
            text, pair = record.get(text_column), record.get(text_pair_column)
            if not isinstance(text, str):
                raise DataError(f"{path}, line {line_no}: {text_column!r} is missing or not a string.")
            if pair is not None and not isinstance(pair, str):
                raise DataError(f"{path}, line {line_no}: {text_pair_column!r} is not a string.")
            rows.append(InputRow(line_no, text, pair))
    if not rows:
        raise DataError(f"{path} holds no examples.")
    return rows


def _check_output(args: PredictArguments) -> Path | None:
    if args.output is None:
        return None
    out = Path(args.output)
    if out.is_dir():
        raise PabeeError(f"--output {out} is a folder; give a file name such as {out / 'predictions.jsonl'}.")
    if out.exists() and not args.overwrite:
        raise PabeeError(f"--output {out} exists; pass --overwrite to replace it.")
    return out


def _model_setting(config) -> str:
    criterion = getattr(config, "exit_criterion", "patience")
    return f"patience {config.patience}" if criterion == "patience" else f"exit criterion {criterion}"


def _summary(answers: list[dict], seconds: float, pipe: PabeePipeline) -> str:
    count, num_layers = len(answers), pipe.num_layers
    average = sum(a["exit_layer"] for a in answers) / count
    setting = ", ".join(f"{k} {v}" for k, v in pipe.exit_options.items())
    setting = setting or f"{_model_setting(pipe.model.config)}, the model's default"
    line = (
        f"{count} examples in {seconds:.1f} s ({count / seconds:.1f} examples/s); "
        f"average exit layer {average:.2f} of {num_layers} ({num_layers / average:.2f}x fewer layers; {setting})"
    )
    labels = Counter(a["label"] for a in answers if isinstance(a["label"], str))
    if labels:
        line += "; labels: " + ", ".join(f"{name} {n}" for name, n in labels.most_common())
    return line


def run_predict(args: PredictArguments) -> dict[str, Any]:
    """Classify every example of `args.input`; write JSON lines to `args.output` (or stdout).

    Returns a summary: `examples`, `seconds`, `examples_per_s`, `avg_exit_layer`, `summary` (the printed line).
    """
    import torch

    from .provenance import write_atomic

    out = _check_output(args)
    if not Path(args.model).is_dir():
        raise PabeeError(f"--model {args.model} is not a folder.")
    rows = read_inputs(args.input, args.text_column, args.text_pair_column)
    if args.threads is not None:
        if args.threads < 1:
            raise PabeeError(f"--threads {args.threads} is invalid; use a whole number >= 1.")
        torch.set_num_threads(args.threads)
    try:
        pipe = PabeePipeline.from_pretrained(
            args.model,
            batch_size=args.batch_size,
            max_length=args.max_seq_length,
            exit_options=args.exit_options(),
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
        )
    except ValueError as error:
        raise PabeeError(str(error)) from None
    examples: list[Example] = [(row.text, row.text_pair) for row in rows]
    start = time.perf_counter()
    logits, exit_layers = pipe.run(examples, progress=True)
    seconds = time.perf_counter() - start
    answers = pipe.format(logits, exit_layers)

    lines = []
    for row, answer in zip(rows, answers, strict=True):
        record = {"line": row.line, "text": row.text}
        if row.text_pair is not None:
            record["text_pair"] = row.text_pair
        lines.append(json.dumps({**record, **answer}, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
    summary = _summary(answers, seconds, pipe)
    return {
        "examples": len(answers),
        "seconds": seconds,
        "examples_per_s": len(answers) / seconds,
        "avg_exit_layer": sum(a["exit_layer"] for a in answers) / len(answers),
        "summary": summary,
    }
