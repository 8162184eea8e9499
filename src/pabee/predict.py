"""`pabee predict`: a file of texts in, one JSON line per example out (label, score, exit layer).

Input files are read by `pabee.data.read_text_file`: `.txt` (or no suffix, one example per line, a tab splitting
a pair), `.tsv` (a header, no quoting, like the GLUE files), `.csv` (a header, standard quoting) or `.jsonl`.
Column names default to `text` and `text_pair` and can be chosen (`--text_column sentence1
--text_pair_column sentence2` reads GLUE's RTE files). Every output line carries the input's line number, so it
can be joined back to the input.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .arguments import PredictArguments
from .data import read_text_file
from .errors import PabeeError
from .exits import ExitSpec
from .pipeline import Example, PabeePipeline

__all__ = ["run_predict"]


def _check_output(args: PredictArguments) -> Path | None:
    if args.output is None:
        return None
    out = Path(args.output)
    if out.is_dir():
        raise PabeeError(f"--output {out} is a folder; give a file name such as {out / 'predictions.jsonl'}.")
    if out.exists() and not args.overwrite:
        raise PabeeError(f"--output {out} exists; pass --overwrite to replace it.")
    return out


def _model_setting(spec: ExitSpec) -> str:
    return f"patience {spec.patience}" if spec.criterion == "patience" else f"exit criterion {spec.criterion}"


def _summary(answers: list[dict], seconds: float, pipe: PabeePipeline) -> str:
    count, num_layers = len(answers), pipe.num_layers
    average = sum(a["exit_layer"] for a in answers) / count
    own = pipe.model.config.exit_spec
    setting = ", ".join(f"{k} {v}" for k, v in pipe.exit_spec.changes_from(own).items())
    setting = setting or f"{_model_setting(own)}, the model's default"
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
    rows = read_text_file(args.input, args.text_column, args.text_pair_column)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        pipe = PabeePipeline.from_pretrained(args.model, batch_size=args.batch_size, **args.pipeline_options())
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
