"""`pabee predict`: a file of texts in, one JSON line per example out (label, score, exit layer).

Input files are read by `pabee.data.read_text_file`: `.txt` (or no suffix, one example per line, a tab splitting
a pair), `.tsv` (a header, no quoting, like the GLUE files), `.csv` (a header, standard quoting) or `.jsonl`.
Column names default to `text` and `text_pair` and can be chosen (`--text_column sentence1
--text_pair_column sentence2` reads GLUE's RTE files). Every output line carries the input's line number, so it
can be joined back to the input.

A line the model cannot take (text that is not Unicode: a lone surrogate escape in a jsonl file, bytes that are not
UTF-8 in the others) costs only that line: its output line has `"error"` instead of an answer, the summary names
it, and every other line is classified.
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
from .folders import exit_setting_note
from .pipeline import Example, PabeePipeline
from .texts import example_problem

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


def _summary(answers: list[dict], seconds: float, pipe: PabeePipeline, problems: dict[int, str]) -> str:
    count, num_layers = len(answers), pipe.num_layers
    line = f"{count} examples in {seconds:.1f} s ({count / max(seconds, 1e-9):.1f} examples/s)"
    if count:
        average = sum(a["exit_layer"] for a in answers) / count
        line += f"; average exit layer {average:.2f} of {num_layers} ({num_layers / average:.2f}x fewer layers)"
    labels = Counter(a["label"] for a in answers if isinstance(a["label"], str))
    if labels:
        line += "; labels: " + ", ".join(f"{name} {n}" for name, n in labels.most_common())
    if problems:
        first, problem = next(iter(problems.items()))
        line += (
            f'; {len(problems)} line(s) not classified, marked "error" in the output (first: line {first}, {problem})'
        )
    return line


def _records(rows: list, answers: list[dict], problems: dict[int, str]) -> list[str]:
    """One JSON line per input row, in order: its answer, or its error (escaped to ASCII: the text is not Unicode)."""
    lines, given = [], iter(answers)
    for row in rows:
        record = {"line": row.line, "text": row.text}
        if row.text_pair is not None:
            record["text_pair"] = row.text_pair
        if row.line in problems:
            failed = {"label": None, "score": None, "exit_layer": None, "error": problems[row.line]}
            lines.append(json.dumps({**record, **failed}))
        else:
            lines.append(json.dumps({**record, **next(given)}, ensure_ascii=False))
    return lines


def run_predict(args: PredictArguments) -> dict[str, Any]:
    """Classify every example of `args.input`; write JSON lines to `args.output` (or stdout).

    Returns a summary: `examples` (classified), `errors` (lines not classified), `seconds`, `examples_per_s`,
    `avg_exit_layer`, `summary` (the printed line), `exit_setting` (which setting answered, and where it came from).
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
    problems = {row.line: problem for row in rows if (problem := example_problem(row.text, row.text_pair))}
    examples: list[Example] = [(row.text, row.text_pair) for row in rows if row.line not in problems]
    start = time.perf_counter()
    answers = pipe.format(*pipe.run(examples, progress=True)) if examples else []
    seconds = time.perf_counter() - start

    text = "\n".join(_records(rows, answers, problems)) + "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_atomic(out, text)
    return {
        "examples": len(answers),
        "errors": len(problems),
        "seconds": seconds,
        "examples_per_s": len(answers) / max(seconds, 1e-9),
        "avg_exit_layer": sum(a["exit_layer"] for a in answers) / len(answers) if answers else None,
        "summary": _summary(answers, seconds, pipe, problems),
        "exit_setting": exit_setting_note(args.model, pipe.exit_spec, pipe.model.config.exit_spec),
    }
