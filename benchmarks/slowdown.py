"""Slowdown attack, measured: a universal trigger that delays PABEE's exits, and what `max_exit_layer` bounds.

Early exit has an attack of its own: inputs on which consecutive layers never agree push every example to the
last layer (WAFFLE, NeurIPS 2023, attacks PABEE; SAME, ACL 2023). `max_exit_layer` caps the worst case. This
script measures both on the fine-tuned SST-2 and MRPC models, in stages:

1. **search** (`slowdown_search.py`) — a universal trigger: `--trigger_length` whole-word tokens chosen greedily
   on a sample of TRAINING sentences to maximise the mean exit layer under the exit rule (patience `--patience`,
   no cap), read off one full-depth pass per candidate with `pabee.exits.sweep_exit_layers`. Candidates: the
   `--frequent` most frequent whole-word tokens (screened as the trigger repeated) and a whole-vocabulary
   surrogate screen, then coordinate rounds where each position tries the HotFlip top-k tokens (gradient of the
   expected agreement of consecutive layers' softmaxes w.r.t. the trigger embeddings) and the best screened
   tokens. Triggers are cached in `--triggers`, keyed by model digest and search settings.
2. **measure** (`slowdown_measure.py`) — the model alone (`pabee.pipeline`, real early exit) on the DEV set, clean
   vs triggered (the trigger prepended; MRPC: to the first sentence): mean exit layer, accuracy (MRPC also F1)
   for patience P, patience P with `max_exit_layer` k, and the model truncated at k (`static` k), real exits
   compared with the one-pass sweep; then `pabee serve` for the same settings, clean and attacked inputs,
   `--clients` closed-loop clients sending one example per request; examples/s, p50/p99 latency, mean exit layer
   from /metrics. Settings are interleaved over `--rounds` rounds; medians and per-round ratios.
3. **report** (`slowdown_report.py`) — `--output`.md from `--output`.json (`--render_only` re-renders it).

Target: with `max_exit_layer` k, attacked inputs' p99 latency <= 1.05x the p99 of the model truncated at k.

    python benchmarks/slowdown.py --stage all --threads 2            # search (cached) + measure, ~20 min
    python benchmarks/slowdown.py --stage measure --overwrite        # re-measure with the cached triggers
"""

import time
from pathlib import Path

import common
from slowdown_measure import stage_measure
from slowdown_report import render
from slowdown_search import stage_search

TASKS = ("SST-2", "MRPC")
DEFAULT_MODELS = {"SST-2": "runs/sst2", "MRPC": "runs/mrpc"}


def parse_args(argv: list[str] | None = None):
    parser = common.parser(__doc__, "slowdown", threads=1, rounds=3)
    parser.add_argument("--stage", choices=["search", "measure", "all"], default="all")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated: SST-2, MRPC.")
    parser.add_argument("--patience", type=int, default=2, help="Exit patience (searched for and served).")
    parser.add_argument("--max_exit_layer", type=int, default=4, help="The cap k (and the truncated model's k).")
    search = parser.add_argument_group("search")
    search.add_argument("--trigger_length", type=int, default=3)
    search.add_argument("--search_examples", type=int, default=64, help="Training examples the trigger is fit on.")
    search.add_argument("--screen_examples", type=int, default=16, help="Of those, the ones screening tokens.")
    search.add_argument("--frequent", type=int, default=100, help="Frequent whole-word tokens screened.")
    search.add_argument("--vocab_screen", type=int, default=40, help="Best vocabulary tokens by surrogate screened.")
    search.add_argument(
        "--screened_per_position", type=int, default=4, help="Best screened tokens tried per position."
    )
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
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if any(t not in TASKS for t in args.tasks):
        parser.error(f"unknown task in {args.tasks}; use {', '.join(TASKS)}")
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
