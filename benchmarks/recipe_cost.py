"""What each exit-aware training recipe costs per training step, against the paper's loss (issue 26 item 3).

One model, one AdamW optimizer and the same batches of real MRPC training pairs for every recipe; a recipe is the
config's settings (and, for two stages, the stage the step is in), switched between passes. A pass is `--steps`
training steps (forward, backward, optimizer step); the recipes run in a fresh shuffled order every round after one
warm-up round (`pabee.bench.time_variants`), so drift on a shared machine hits them alike. Reported: the median
seconds per step over rounds, and per round each recipe's time over the paper loss's (median of those ratios).
Target (issue 26): the best recipe at most 10% more training time per step than the paper's loss.

Two stages are timed per stage: stage 2 runs the backbone without gradients, so its steps are cheaper; a run's
mean cost is the stage-1 share × stage 1 + the rest × stage 2.

    python benchmarks/recipe_cost.py --threads 2 --rounds 5 --steps 5    # MiniLM: 210 steps, ~5-10 min on 2 cores
    python benchmarks/recipe_cost.py --model MPNET_FOLDER --output benchmarks/results/recipe_cost_mpnet  # ~45 min

`--model` here is a plain encoder (fresh PABEE heads, pooling as run-glue's `auto` picks it), default the bundled
MiniLM; MPNET_FOLDER is what `benchmarks/fetch_mpnet.py` prints (~12 s a step on 2 cores).
"""

from __future__ import annotations

import statistics
from typing import Any

import common
import torch

RECIPES: dict[str, dict[str, Any]] = {  # name → PabeeConfig settings (and "stage" for two stages)
    "paper's loss": {},
    "alignment (w 0.1)": {"alignment_weight": 0.1},
    "gradient equilibrium": {"gradient_equilibrium": True},
    "sample weighting (τ 1)": {"sample_weighting_temperature": 1.0},
    "alignment + equilibrium + weighting": {
        "alignment_weight": 0.1,
        "gradient_equilibrium": True,
        "sample_weighting_temperature": 1.0,
    },
    "two stages, stage 1": {"two_stage": 0.5, "stage": 1},
    "two stages, stage 2": {"two_stage": 0.5, "stage": 2},
}
BASELINE = "paper's loss"
TARGET_RATIO = 1.10


def batches(tokenizer: Any, glue_dir: str, count: int, batch_size: int, max_length: int) -> list[dict]:
    """`count` batches of `batch_size` MRPC training pairs in file order, right-padded, with their labels."""
    examples, labels = common.glue_split("MRPC", glue_dir, "train")
    needed = count * batch_size
    if len(examples) < needed:
        raise SystemExit(f"MRPC has {len(examples)} training pairs; {needed} needed.")
    rows = common.features(tokenizer, examples[:needed], max_length)
    out = []
    for start in range(0, needed, batch_size):
        batch = common.pad(rows[start : start + batch_size], tokenizer.pad_token_id or 0)
        batch["labels"] = torch.as_tensor(labels[start : start + batch_size], dtype=torch.long)
        out.append(batch)
    return out


def apply(model: Any, recipe: dict[str, Any]) -> None:
    """Set `recipe` on the model: every recipe field (others back to off) and the two-stage stage."""
    from pabee.configuration import PabeeConfig
    from pabee.recipes import RECIPE_FIELDS

    defaults = PabeeConfig(num_labels=2).recipes
    for name in RECIPE_FIELDS:
        setattr(model.config, name, recipe.get(name, defaults[name]))
    model.training_stage = recipe.get("stage")


def measure(args) -> dict:
    from transformers import AutoTokenizer

    from pabee import PabeeForSequenceClassification, bundled_model_path
    from pabee.bench import time_variants
    from pabee.provenance import portable_path

    torch.set_num_threads(args.threads)
    name = args.model or str(bundled_model_path())
    tokenizer = AutoTokenizer.from_pretrained(name)
    data = batches(tokenizer, args.glue_dir, args.steps, args.batch_size, args.max_seq_length)
    torch.manual_seed(0)
    model = PabeeForSequenceClassification.from_backbone(name, num_labels=2, pooling=None).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

    def training(recipe: dict[str, Any]):
        def run(_: Any) -> None:
            apply(model, recipe)
            for batch in data:
                model(**batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)  # as Trainer does: frozen parameters keep no gradient

        return run

    timings = time_variants({n: training(r) for n, r in RECIPES.items()}, args.rounds, 1, args.seed)
    per_step = {n: [seconds / args.steps for seconds in t.passes] for n, t in timings.items()}
    results = {}
    for recipe, seconds in per_step.items():
        ratios = [s / b for s, b in zip(seconds, per_step[BASELINE], strict=True)]
        results[recipe] = {
            "settings": RECIPES[recipe],
            "seconds_per_step": seconds,
            **_spread(seconds),
            "ratio_per_round": ratios,
            "median_ratio": statistics.median(ratios),
        }
    settings = {
        "model": portable_path(name),
        "layers": model.num_layers,
        "pooling": model.config.pooling,
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "seq_lens": [int(b["input_ids"].shape[1]) for b in data],
        "seed": args.seed,
    }
    return common.report(settings=settings, recipes=results, provenance={"model": portable_path(name)})


def _spread(values: list[float]) -> dict[str, float]:
    """Median and quartiles (the quartiles need two rounds or more)."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0]}
    return common.quartiles(values)


def render(report: dict) -> str:
    s, p = report["settings"], report["provenance"]
    setup = (
        f"{s['model']} ({s['layers']} layers, pooling {s['pooling']}); {s['steps']} steps of {s['batch_size']} real "
        f"MRPC training pairs per recipe and round (max length {s['max_seq_length']}, padded to "
        f"{min(s['seq_lens'])}-{max(s['seq_lens'])} tokens), forward + backward + AdamW; {s['rounds']} rounds "
        f"interleaved after one warm-up round; {s['threads']} threads."
    )
    lines = common.heading("Training cost per step of the exit-aware recipes", p, setup)
    lines += [
        "Seconds per step: median over rounds (quartiles). × paper: per round, the recipe's time over the paper "
        f"loss's, median over rounds. Target (issue 26): at most {TARGET_RATIO:.2f}× for the recipe taken forward.",
        "",
    ]
    head = ["Recipe", "Settings", "s per step", "Quartiles", "× paper", f"≤ {TARGET_RATIO:.2f}×"]
    rows = []
    for name, r in report["recipes"].items():
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "defaults"
        within = "yes" if r["median_ratio"] <= TARGET_RATIO else "no"
        quartiles = f"{r['q1']:.3f}–{r['q3']:.3f}"
        rows.append([name, settings, f"{r['median']:.3f}", quartiles, f"{r['median_ratio']:.3f}", within])
    return "\n".join(lines + common.table(head, rows)) + "\n"


def main() -> None:
    parser = common.parser(__doc__, "recipe_cost", model="", threads=2, rounds=5)
    parser.add_argument("--steps", type=int, default=5, help="Timed training steps per recipe and round.")
    parser.add_argument("--batch_size", type=int, default=32, help="MRPC training pairs per step.")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Tokens per pair.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the interleaving order.")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1.")
    common.write_report(args, measure, render)


if __name__ == "__main__":
    main()
