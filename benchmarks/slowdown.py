"""Slowdown attack, measured (slowdown.md): a universal trigger that delays PABEE's exits, and what
`max_exit_layer` bounds. Inputs on which consecutive layers never agree push every example to the last layer
(WAFFLE, NeurIPS 2023; SAME, ACL 2023); the cap bounds the worst case. On the fine-tuned SST-2 and MRPC models,
by stage:

1. search (`slowdown_search.py`): `--trigger_length` whole-word tokens chosen greedily on TRAINING sentences to
   maximise the mean exit layer under patience `--patience`; cached in `--triggers` by model digest and settings.
2. measure (`slowdown_measure.py`): the model alone (real early exit) on the DEV set, clean vs triggered, for
   patience P, P capped at k (`--max_exit_layer`), the model truncated at k and a simulated perfect attack; then
   `pabee serve` under `--clients` closed-loop clients, the settings interleaved over `--rounds`.
3. report (`slowdown_report.py`): `--output`.md from `--output`.json (`--render_only`).

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
