"""The `pabee` command: a table of sub-commands, each a set of argument dataclasses (`pabee.arguments`) and a
function that runs it. Flags are parsed with `HfArgumentParser`.

An unknown or malformed flag is one line on stderr with exit code 2; a bad value (`PabeeError`) is one line on
stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import PabeeError, require_extra

__all__ = ["COMMANDS", "Command", "command_parser", "main", "run_command", "translate_seed_flags"]

# The research script's spellings that TrainingArguments no longer has, rewritten before parsing.
_RENAMED_FLAGS = {
    "--per_gpu_train_batch_size": "--per_device_train_batch_size",
    "--per_gpu_eval_batch_size": "--per_device_eval_batch_size",
}
_FALSE = {"false", "no", "0", "n", "f"}
_TRUE = {"true", "yes", "1", "y", "t"}


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
            if explicit is not None and explicit.lower() not in _TRUE | _FALSE:
                raise PabeeError(f"--evaluate_during_training {explicit!r} is invalid: use true or false.")
            if explicit is None or explicit.lower() not in _FALSE:
                out += ["--eval_strategy", "steps"]
        else:
            out.append(arg)
        i += 1
    return out


class _OneLineErrors:
    """An argparse parser whose usage errors are one line naming the flag, not the whole usage (run-glue's, with
    `TrainingArguments`, runs to a hundred lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _TopParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _run_glue(parsed: tuple, command: str) -> int:
    from .train import run_glue

    run_glue(*parsed, command=command)
    return 0


def _bench(parsed: tuple, command: str) -> int:
    from .bench import run_bench
    from .report import bench_markdown

    (args,) = parsed
    print(bench_markdown(run_bench(args, command=command)))
    if args.output_dir:
        print(f"\nResults: {args.output_dir}/bench.md, bench.json")
    return 0


def _predict(parsed: tuple, command: str) -> int:
    (args,) = parsed
    if args.ray:
        from .ray.batch_predict import run_ray_predict as run_predict
    else:
        from .predict import run_predict
    result = run_predict(args)
    where = f"; wrote {args.output}" if args.output else ""
    print(f"pabee predict: {result['summary']}{where}", file=sys.stderr)
    if result.get("exit_setting"):
        print(f"pabee predict: exit setting: {result['exit_setting']}", file=sys.stderr)
    return 0


def _serve(parsed: tuple, command: str) -> int:
    require_extra("serve", ("fastapi", "uvicorn", "prometheus_client"))
    (args,) = parsed
    if args.ray:
        from .ray.serving import run_ray_server as run_server
    else:
        from .serve import run_server
    run_server(args)
    return 0


def _calibrate(parsed: tuple, command: str) -> int:
    from .calibrate import run_calibrate, summary_line

    (args,) = parsed
    print(f"pabee calibrate: {summary_line(run_calibrate(args, command), args.model)}")
    return 0


def _add_exits(parsed: tuple, command: str) -> int:
    from .add_exits import run_add_exits

    (args,) = parsed
    record = run_add_exits(args, command)
    seconds = record["seconds"]
    print(
        f"pabee add-exits: wrote {args.output_dir} ({record['data']['examples']} texts: states "
        f"{seconds['states']:.0f} s, exits trained in {seconds['training']:.0f} s); at full depth it answers as "
        f"{args.model} does"
    )
    if "calibration" in record:
        print(f"pabee add-exits: {record['calibration']}")
    else:
        print(
            "pabee add-exits: it answers at full depth until a setting is chosen: "
            f"pabee calibrate --model {args.output_dir} --input_file TEXTS"
        )
    return 0


def _export(parsed: tuple, command: str) -> int:
    from .onnx_export import export_onnx

    (args,) = parsed
    output = export_onnx(args.model, args.output, args.quantize, args.opset, args.overwrite, args.optimize)
    print(
        f"pabee export: wrote {output} ({args.quantize or 'fp32'}); run it with --backend onnxruntime", file=sys.stderr
    )
    return 0


def _arguments(*names: str) -> Callable[[], tuple[type, ...]]:
    """The argument dataclasses of a command, imported only when it runs (`pabee --help` stays quick)."""

    def load() -> tuple[type, ...]:
        from transformers import TrainingArguments

        from . import arguments

        return tuple(TrainingArguments if name == "TrainingArguments" else getattr(arguments, name) for name in names)

    return load


@dataclass(frozen=True)
class Command:
    """A sub-command: its flags (dataclasses), what it does with them, and how `--help` describes it."""

    summary: str
    description: str
    arguments: Callable[[], tuple[type, ...]]
    run: Callable[[tuple, str], int]
    required: tuple[str, ...] = ()  # flags the dataclasses leave optional but the command needs
    translate: Callable[[Sequence[str]], list[str]] | None = None  # old spellings rewritten before parsing


COMMANDS: dict[str, Command] = {
    "run-glue": Command(
        "fine-tune and evaluate PABEE on a GLUE task across patiences",
        "Fine-tune and evaluate a PABEE model on a GLUE task (or your own data) across patiences.",
        _arguments("RunGlueArguments", "TrainingArguments"),
        _run_glue,
        required=("--output_dir",),
        translate=translate_seed_flags,
    ),
    "bench": Command(
        "measure wall-clock speed-up, batched throughput and training cost",
        "Wall-clock inference benchmark: full model vs batched early exit vs batch size 1.",
        _arguments("BenchArguments"),
        _bench,
    ),
    "predict": Command(
        "classify a file of texts (txt, tsv, csv, jsonl) into JSON lines",
        "Classify a file of texts with batched early exit; one JSON line per example.",
        _arguments("PredictArguments"),
        _predict,
    ),
    "calibrate": Command(
        "choose the fastest exit setting certified within --max_drop points of the full model, on data",
        "Choose the fastest exit setting certified to keep the full model's accuracy within --max_drop points (or "
        "its answers within --max_disagreement percent), on one half of the data, report it on the other, and "
        "write it into the model's config. Where the examples are too few to certify, the fastest setting within "
        "--max_drop on the choosing half is taken and the output says it is not certified.",
        _arguments("CalibrateArguments"),
        _calibrate,
        required=("--model",),
    ),
    "add-exits": Command(
        "add trained early exits to a fine-tuned Hugging Face classifier, its full-depth answers unchanged",
        "Add an exit after every layer of a fine-tuned Hugging Face sequence classifier, trained to agree with its "
        "answers (backbone and head frozen, so at full depth it answers exactly as before), and with "
        "--max_disagreement choose the fastest setting certified to change at most that share of its answers.",
        _arguments("AddExitsArguments"),
        _add_exits,
        required=("--model", "--output_dir"),
    ),
    "export": Command(
        "export a model to ONNX for early exit on ONNX Runtime (fp32 or int8)",
        "Export a PABEE model to ONNX for ONNX Runtime: one optimized graph that names each layer's output and exit "
        "logits, cut into segments at run time.",
        _arguments("ExportArguments"),
        _export,
    ),
    "serve": Command(
        "HTTP server with dynamic micro-batching and early exit",
        "HTTP server with dynamic micro-batching and batched early exit: POST /predict, GET /health, GET /metrics.",
        _arguments("ServeArguments"),
        _serve,
    ),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The flag parser of the sub-command `name` (an `HfArgumentParser` over its dataclasses)."""
    from transformers import HfArgumentParser

    spec = COMMANDS[name]
    parser_class = type("CommandParser", (_OneLineErrors, HfArgumentParser), {})
    return parser_class(spec.arguments(), prog=f"pabee {name}", description=spec.description)


def run_command(name: str, argv: Sequence[str]) -> int:
    """Parse `argv` into the command's dataclasses and run it. An unknown or malformed flag is one line on stderr
    and exit code 2 (`SystemExit`); a bad value raises `PabeeError`."""
    spec = COMMANDS[name]
    command_line = shlex.join(["pabee", name, *argv])
    argv = spec.translate(argv) if spec.translate else list(argv)
    parser = command_parser(name)
    if not any(a in ("-h", "--help") for a in argv):
        missing = [flag for flag in spec.required if not _has_flag(argv, flag)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    unknown = parser.parse_known_args(argv)[1]  # before the dataclasses check their values
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # TrainingArguments' own checks
        parser.error(str(error))
    return spec.run(tuple(parsed), command_line)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _TopParser(prog="pabee", description="Patience-based early exit for transformer classifiers.")
    top.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {c.summary}" for k, c in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else 2
    if argv[0] == "--version":
        from .version import __version__

        print(f"pabee {__version__}")
        return 0
    try:
        command = top.parse_args(argv[:1]).command
    except SystemExit as stop:  # an unknown command: one line already printed
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return run_command(command, argv[1:])
    except SystemExit as stop:  # argparse's usage errors (2) and --help (0)
        return stop.code if isinstance(stop.code, int) else 2
    except PabeeError as error:
        print(f"pabee {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = command in ("run-glue", "add-exits")
        hint = "; run the same command again to resume from the last checkpoint" if resumable else ""
        print(f"pabee {command}: interrupted{hint}.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
