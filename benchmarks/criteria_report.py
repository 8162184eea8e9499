"""Summarise benchmarks/results/criteria_*/ (made by compare_criteria.sh) into benchmarks/results/criteria.md.

For each task and criterion: the fastest setting whose main metric is within one point of the full model, its
layer speed-up, and — where `pabee bench` timed that setting — the measured wall-clock speed-up.

    python benchmarks/criteria_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

from pabee.metrics import METRIC_LABELS
from pabee.provenance import write_atomic
from pabee.report import best_tradeoff, point_label

RESULTS = Path(__file__).resolve().parent / "results"

READING = """\
## Reading

- **The probability rules win on both tasks.** Within one point of the full model, entropy and confidence
  skip about half the layers (2.1x on SST-2 and MRPC), patience a quarter (1.37x), the static 4-layer
  truncation a third (1.5x). These internal classifiers are calibrated well enough that a sure early layer is
  usually right, and patience spends layers waiting for agreement it did not need.
- **For two classes entropy and confidence are the same rule:** both are monotone in the top probability,
  so a threshold of one maps to a threshold of the other (entropy 0.6 nats ≈ top probability 0.7). Their
  curves coincide; the rows above differ only by which grid point lands within the one-point band (on MRPC
  confidence 0.7 gives F1 83.5, just outside it). They differ with three or more classes.
- **Patience does not beat the static baseline here:** at equal accuracy, truncating the model to 4 layers is
  faster than patience 3 on both tasks. A 6-layer model leaves patience little room — the earliest exit at
  patience p is layer p+1 — while the paper's comparison is on 12 layers.
- **patience+confidence** is the most conservative rule: at patience 1 it behaves like confidence 0.9, and each
  extra unit of patience costs speed without gaining accuracy.
- **Where patience is still the choice:** it needs no calibrated probabilities, it works for regression
  (STS-B), where entropy and confidence do not apply, and the paper reports it is more robust to adversarial
  inputs than confidence-based exits.
- On MRPC (408 pairs) one point of F1 is a handful of examples; rankings there are within noise.
"""


def main() -> None:
    lines = [
        "# Exit criteria compared on the same fine-tuned MiniLM",
        "",
        "Every criterion read off one full pass over the dev set of the same PABEE model "
        "(`bash benchmarks/compare_criteria.sh`; full tables, Pareto curves and exit histograms in "
        "`criteria_mrpc/` and `criteria_sst2/`). Per criterion: its fastest setting within one point of the full "
        "model's main metric (or its best setting if none is).",
        "",
    ]
    for folder in sorted(RESULTS.glob("criteria_*")):
        report = json.loads((folder / "eval_results.json").read_text())
        metric, task = report["main_metric"], report["task"]
        split, result = next(iter(report["evaluations"][-1]["splits"].items()))
        full = result["patiences"][0]
        measured = {}
        bench_file = folder / "bench" / "bench.json"
        if bench_file.exists():
            bench = json.loads(bench_file.read_text())
            measured = {(r.get("criterion", "patience"), r["setting"]): r for r in bench["rows"]}
        label = METRIC_LABELS.get(metric, metric)
        lines += [
            f"## {task} {split} ({result['num_examples']} examples; full model {label} {100 * full[metric]:.1f})",
            "",
            f"| Criterion | Setting | {label} | Avg. exit layer | Layer speed-up | Exits per layer |",
            "|---|---|---|---|---|---|",
        ]
        for name in report["criteria"]:
            rows = result["patiences"][1:] if name == "patience" else result["criteria"][name]
            row = best_tradeoff(rows, metric, full[metric])
            exits = " / ".join(map(str, row["exit_histogram"]))
            lines.append(
                f"| {name} | {point_label(row, short=False)} | {100 * row[metric]:.1f} | "
                f"{row['avg_exit_layer']:.2f} | {row['speed_up']:.2f}x | {exits} |"
            )
        if measured:
            lines += [
                "",
                f"Wall clock (`pabee bench`, batch {bench['settings']['batch_sizes'][0]}, length-sorted, "
                f"{bench['settings']['attn_implementation']} attention, {bench['settings']['threads']} threads, "
                f"median of {bench['settings']['repeats']}):",
                "",
                "| Criterion | Setting | Avg. exit layer | Layer speed-up | Measured speed-up | Measured / layer |",
                "|---|---|---|---|---|---|",
            ]
            for (name, setting), r in measured.items():
                lines.append(
                    f"| {name} | {setting} | {r['avg_exit_layer']:.2f} | {r['layer_speed_up']:.2f}x | "
                    f"{r['measured_speed_up']:.2f}x | {r['measured_over_layer']:.2f} |"
                )
        lines.append("")
    write_atomic(RESULTS / "criteria.md", "\n".join(lines) + "\n" + READING)
    print((RESULTS / "criteria.md").read_text())


if __name__ == "__main__":
    main()
