"""The issue's acceptance targets for `pabee bench`, checked against the bench.json files it wrote.

The targets are this project's goals on its own hardware, not something the library should judge, so they live
here rather than in `pabee.bench`:

    python benchmarks/bench_targets.py benchmarks/results/bench_sst2/bench.json [more bench.json ...] [--strict]

Prints one Markdown table per file; with `--strict` the exit code is 1 when a measured target is missed.
"""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TARGETS: dict[str, tuple[str, float, str]] = {
    "batched_over_bs1": (">=", 2.5, "batched early exit vs batch-size-1 loop, same patience"),
    "measured_over_layer": (">=", 0.85, "measured speed-up over full vs layer speed-up"),
    "no_exit_overhead_pct": ("<=", 5.0, "engine with nobody exiting vs plain forward, %"),
    "training_ratio": ("<=", 1.05, "PABEE training step vs plain fine-tuning step"),
}


def _measured(report: dict[str, Any]) -> dict[str, float | None]:
    """The worst case of each target's quantity over patiences and batch sizes (None: not measured)."""
    rows = [r for r in report["rows"] if r.get("criterion", "patience") == "patience" and r["patience"] > 0]
    faster = [r for r in rows if r["layer_speed_up"] > 1.0]
    return {
        "batched_over_bs1": min((r["batched_over_bs1"] for r in rows), default=None),
        "measured_over_layer": min((r["measured_over_layer"] for r in faster), default=None),
        "no_exit_overhead_pct": max(report["no_exit_overhead_pct"].values(), default=None),
        "training_ratio": report.get("training_cost", {}).get("ratio"),
    }


def check_targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its goal, what was measured and whether it was met (None when not measured)."""
    seen = _measured(report)
    out = {}
    for name, (op, goal, what) in TARGETS.items():
        value = seen[name]
        met = None if value is None else (value >= goal if op == ">=" else value <= goal)
        out[name] = {"what": what, "goal": f"{op} {goal}", "measured": value, "met": met}
    return out


def targets_markdown(targets: dict[str, dict[str, Any]]) -> str:
    """The `## Targets` table bench.md used to end with."""
    lines = ["## Targets", "", "| Target | Goal | Measured | Met |", "|---|---|---|---|"]
    for t in targets.values():
        measured = "—" if t["measured"] is None else f"{t['measured']:.3f}"
        met = "—" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} | {t['goal']} | {measured} | {met} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="bench.json files written by `pabee bench`.")
    parser.add_argument("--strict", action="store_true", help="Exit with 1 when a measured target is missed.")
    args = parser.parse_args(argv)
    missed = False
    for path in args.reports:
        targets = check_targets(json.loads(path.read_text(encoding="utf-8")))
        missed |= any(t["met"] is False for t in targets.values())
        print(f"# {path}\n\n{targets_markdown(targets)}\n")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
