"""What self-distillation costs per training step: the same MiniLM training step with `distillation_weight` 0
(the paper's loss) and 0.5, interleaved in one process so that noise hits both alike.

Every layer's logits are computed in training anyway, so distillation only adds a KL term per internal layer;
this measures that claim. Target (issue #14): <= 5% more per step.

    python benchmarks/distillation_cost.py --threads 2 --rounds 5 --steps 10    # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pabee import PabeeForSequenceClassification, bundled_model_path  # noqa: E402
from pabee.provenance import provenance  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per setting and round.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "distillation_cost"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    with open(Path(args.glue_dir) / "SST-2" / "train.tsv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[: args.batch_size * args.steps]
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    batches = []
    for start in range(0, len(rows), args.batch_size):
        part = rows[start : start + args.batch_size]
        batch = tokenizer([r["sentence"] for r in part], padding=True, truncation=True, return_tensors="pt")
        batch["labels"] = torch.tensor([int(r["label"]) for r in part])
        batches.append(batch)
    torch.manual_seed(0)
    model = PabeeForSequenceClassification.from_backbone(num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    settings = {"labels only (weight 0)": (0.0, 1.0), "distillation (weight 0.5, T 2)": (0.5, 2.0)}

    def step_seconds(weight: float, temperature: float) -> float:
        model.config.distillation_weight, model.config.distillation_temperature = weight, temperature
        start = time.perf_counter()
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return (time.perf_counter() - start) / len(batches)

    step_seconds(0.0, 1.0)  # warm-up
    per_round = {name: [] for name in settings}
    for round_ in range(args.rounds):
        order = list(settings) if round_ % 2 == 0 else list(settings)[::-1]
        for name in order:
            per_round[name].append(step_seconds(*settings[name]))
        print({name: f"{values[-1] * 1000:.0f} ms" for name, values in per_round.items()}, flush=True)
    base, distil = (per_round[name] for name in settings)
    ratios = [d / b for b, d in zip(base, distil, strict=True)]
    report = {
        "provenance": provenance(batch_size=args.batch_size, steps=args.steps, threads=args.threads),
        "ms_per_step": {name: [1000 * v for v in values] for name, values in per_round.items()},
        "median_ms_per_step": {name: 1000 * statistics.median(values) for name, values in per_round.items()},
        "ratio_per_round": ratios,
        "median_ratio": statistics.median(ratios),
    }
    output = Path(args.output)
    output.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    p = report["provenance"]
    lines = [
        "# Cost of self-distillation per training step (MiniLM, SST-2 batches)",
        "",
        f"Command: `{p['command']}` · {p['date']} · batch {args.batch_size} real SST-2 training sentences, "
        f"{args.steps} timed steps (forward, backward, AdamW) per setting and round, {args.rounds} rounds "
        f"interleaved · {args.threads} threads · torch {p['versions']['torch']} · CPU {p['hardware']['cpu']}, "
        f"flags {', '.join(p['hardware']['cpu_flags'])}.",
        "",
        "| Loss | ms per step (median) |",
        "|---|---|",
        *[f"| {name} | {ms:.1f} |" for name, ms in report["median_ms_per_step"].items()],
        "",
        f"Distillation / labels only: median **{report['median_ratio']:.3f}×**; per round "
        + ", ".join(f"{r:.3f}" for r in ratios)
        + ". Target ≤ 1.05×.",
        "",
    ]
    output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
