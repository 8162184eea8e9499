"""The `pabee` command. Sub-commands parse their flags from typed dataclasses with `HfArgumentParser`.

Input errors (`PabeeError`) are reported as one line on stderr with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from .errors import PabeeError

# The research script's spellings that TrainingArguments no longer has, rewritten before parsing.
_RENAMED_FLAGS = {
    "--per_gpu_train_batch_size": "--per_device_train_batch_size",
    "--per_gpu_eval_batch_size": "--per_device_eval_batch_size",
}
_FALSE = {"false", "no", "0", "n", "f"}


def translate_seed_flags(argv: Sequence[str]) -> list[str]:
    """Map the original `run_glue_with_pabee.py` flags onto their `TrainingArguments` names."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        name, eq, value = arg.partition("=")
        if name in _RENAMED_FLAGS:
            out.append(_RENAMED_FLAGS[name] + eq + value)
        elif name == "--evaluate_during_training":
            explicit = (
                value if eq else (items[i + 1] if i + 1 < len(items) and not items[i + 1].startswith("-") else None)
            )
            if explicit is not None and not eq:
                i += 1
            if explicit is None or explicit.lower() not in _FALSE:
                out += ["--eval_strategy", "steps"]
        else:
            out.append(arg)
        i += 1
    return out


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def run_glue_main(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser, TrainingArguments

    from .train import RunGlueArguments, run_glue

    parser = HfArgumentParser(
        (RunGlueArguments, TrainingArguments),
        prog="pabee run-glue",
        description="Fine-tune and evaluate a PABEE model on a GLUE task (or your own data) across patiences.",
    )
    command = shlex.join(["pabee", "run-glue", *argv])
    argv = translate_seed_flags(argv)
    if not any(a in ("-h", "--help") for a in argv) and not _has_flag(argv, "--output_dir"):
        parser.error("the following arguments are required: --output_dir")
    try:
        args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own validation
        parser.error(str(error))
    run_glue(args, training_args, command=command)
    return 0


def bench_main(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    from .bench import BenchArguments, render_markdown, run_bench

    parser = HfArgumentParser(
        BenchArguments,
        prog="pabee bench",
        description="Wall-clock inference benchmark: full model vs batched early exit vs batch size 1.",
    )
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    report = run_bench(args, command=shlex.join(["pabee", "bench", *argv]))
    print(render_markdown(report))
    if args.output_dir:
        print(f"\nResults: {args.output_dir}/bench.md, bench.json")
    return 0


def predict_main(argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    from .predict import PredictArguments, run_predict

    parser = HfArgumentParser(
        PredictArguments,
        prog="pabee predict",
        description="Classify a file of texts with batched early exit; one JSON line per example.",
    )
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    result = run_predict(args)
    where = f"; wrote {args.output}" if args.output else ""
    print(f"pabee predict: {result['summary']}{where}", file=sys.stderr)
    return 0


def serve_main(argv: Sequence[str]) -> int:
    from importlib.util import find_spec

    from transformers import HfArgumentParser

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if find_spec(name) is None]
    if missing:
        raise PabeeError(f'the server needs {", ".join(missing)}: pip install "pabee[serve]"')
    from .serve import ServeArguments, run_server

    parser = HfArgumentParser(
        ServeArguments,
        prog="pabee serve",
        description="HTTP server with dynamic micro-batching and batched early exit: POST /predict, GET /health, "
        "GET /metrics.",
    )
    (args,) = parser.parse_args_into_dataclasses(args=list(argv))
    run_server(args)
    return 0


COMMANDS = {
    "run-glue": (run_glue_main, "fine-tune and evaluate PABEE on a GLUE task across patiences"),
    "bench": (bench_main, "measure wall-clock speed-up, batched throughput and training cost"),
    "predict": (predict_main, "classify a file of texts (txt, tsv, csv, jsonl) into JSON lines"),
    "serve": (serve_main, "HTTP server with dynamic micro-batching and early exit"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="pabee", description="Patience-based early exit for transformer classifiers.")
    top.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__

        print(f"pabee {__version__}")
        return 0
    command = top.parse_args(argv[:1]).command
    try:
        return COMMANDS[command][0](argv[1:])
    except PabeeError as error:
        print(f"pabee {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = "; run the same command again to resume from the last checkpoint" if command == "run-glue" else ""
        print(f"pabee {command}: interrupted{hint}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
