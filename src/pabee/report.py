"""Every Markdown table and plot we publish, rendered from the JSON results (run-glue's and bench's).

Renderers take the results dictionaries the commands write, never live objects, so a table can be rendered again
from a results file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .metrics import METRIC_LABELS
from .provenance import write_atomic
from .settings import ExitSpec

__all__ = [
    "bench_markdown",
    "best_tradeoff",
    "criteria_tables",
    "layer_table",
    "patience_table",
    "plot_exit_histograms",
    "plot_patience_curves",
    "point_label",
    "run_glue_markdown",
    "run_glue_plots",
    "settings_table",
]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def patience_table(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """Markdown table, one row per patience: metrics (×100), average exit layer, speed-up, layers saved."""
    return settings_table(rows, metrics, "Patience")


def settings_table(rows: Sequence[dict], metrics: Sequence[str], first_column: str = "Setting") -> str:
    """Markdown table, one row per exit setting, with the layer each example left at (histogram)."""
    head = [first_column, *(METRIC_LABELS.get(m, m) for m in metrics), "Avg. exit layer", "Speed-up"]
    head += ["Layers saved", "Exits per layer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [
            point_label(row, short=False),
            *(_pct(row[m]) for m in metrics),
            f"{row['avg_exit_layer']:.2f}",
            f"{row['speed_up']:.2f}x",
            f"{row['layers_saved_pct']:.1f}%",
            " / ".join(str(n) for n in row.get("exit_histogram", [])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _spec(row: dict) -> ExitSpec:
    """The exit setting a results row was measured with (rows from before criteria existed: a patience)."""
    return ExitSpec(row.get("criterion", "patience"), row.get("patience"), row.get("threshold"))


def point_label(row: dict, short: bool = True) -> str:
    """How a results row is named: `ExitSpec.label` (`3`, `0 (full)`, `0.9`, `k=2`); plots write patiences
    shorter (`p=3`, `full`)."""
    spec = _spec(row)
    if short and spec.criterion == "patience":
        return "full" if spec.is_full_model else f"p={spec.patience}"
    return spec.label


def best_tradeoff(rows: Sequence[dict], metric: str, reference: float, tolerance: float = 0.01) -> dict:
    """The fastest row whose metric is within `tolerance` of `reference`, else the row with the best metric."""
    close = [r for r in rows if r[metric] >= reference - tolerance]
    return max(close, key=lambda r: r["speed_up"]) if close else max(rows, key=lambda r: r[metric])


def layer_table(rows: Sequence[dict], metrics: Sequence[str]) -> str:
    """Markdown table of each internal classifier's metrics on its own."""
    head = ["Layer", *(METRIC_LABELS.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        lines.append("| " + " | ".join([str(row["layer"]), *(_pct(row[m]) for m in metrics)]) + " |")
    return "\n".join(lines)


def plot_patience_curves(
    curves: dict[str, Sequence[dict]], metric: str, path: str | Path, title: str = "PABEE: metric vs speed-up"
) -> None:
    """One curve per label (a split, or a criterion): x = layer speed-up, y = metric, a point per setting;
    the full model is a star. Curves of several criteria on one model make a Pareto comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    stars: set[tuple[float, float]] = set()  # one star per distinct full model (criteria share theirs)
    for label, rows in curves.items():
        rows = sorted(rows, key=lambda r: r["speed_up"])
        xs = [r["speed_up"] for r in rows]
        ys = [100 * r[metric] for r in rows]
        (line,) = ax.plot(xs, ys, marker="o", label=label)
        for r in rows:
            ax.annotate(
                point_label(r), (r["speed_up"], 100 * r[metric]), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        full = [r for r in rows if r.get("criterion", "patience") == "patience" and r["patience"] == 0]
        if full and (full[0]["speed_up"], full[0][metric]) not in stars:
            stars.add((full[0]["speed_up"], full[0][metric]))
            ax.plot(
                [full[0]["speed_up"]],
                [100 * full[0][metric]],
                marker="*",
                markersize=14,
                color=line.get_color(),
                linestyle="none",
                label="full model" if len(curves) > 1 and _shared_full(curves, metric) else f"{label}: full model",
            )
    ax.set_xlabel("Layer speed-up (layers / average exit layer)")
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (x100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def _shared_full(curves: dict[str, Sequence[dict]], metric: str) -> bool:
    """True when every curve's full-model point is the same (criteria compared on one model and split)."""
    points = {
        (r["speed_up"], r[metric])
        for rows in curves.values()
        for r in rows
        if r.get("criterion", "patience") == "patience" and r["patience"] == 0
    }
    return len(points) == 1


def plot_exit_histograms(rows: dict[str, dict], metric: str, path: str | Path, title: str) -> None:
    """One bar chart per criterion: how many examples left at each layer, for one chosen setting each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(2.6 * len(rows) + 0.6, 3.0), dpi=120, sharey=True, squeeze=False)
    for ax, (name, row) in zip(axes[0], rows.items(), strict=True):
        counts = row["exit_histogram"]
        ax.bar(range(1, len(counts) + 1), counts, color="tab:blue")
        ax.set_title(
            f"{name} {point_label(row)}\n{METRIC_LABELS.get(metric, metric)} {100 * row[metric]:.1f}, "
            f"{row['speed_up']:.2f}x",
            fontsize=8,
        )
        ax.set_xlabel("Exit layer", fontsize=8)
        ax.set_xticks(range(1, len(counts) + 1))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("Examples", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> None:
    """Save through a temporary sibling so a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())  # the mode an existing plot had, not a temporary file's 0600


# --- run-glue -------------------------------------------------------------------------------------------------


def _processes(provenance: dict) -> str:
    """How many torchrun processes trained and evaluated, when more than one: the global batch was theirs."""
    world_size = provenance.get("world_size", 1)
    return f"; {world_size} processes (torchrun)" if world_size > 1 else ""


def run_glue_markdown(report: dict) -> str:
    """`eval_results.md`: the tables of every evaluated model and split, and the training summary."""
    metrics = report["metrics"]
    lines = [
        f"# PABEE on {report['task']}",
        "",
        f"Model: `{report['provenance']['model']}`  ",
        f"Command: `{report['provenance']['command']}`  ",
        f"Date: {report['provenance']['date']}; torch {report['provenance']['versions']['torch']}, "
        f"transformers {report['provenance']['versions']['transformers']}; {report['provenance']['hardware']['cpu']}"
        + _processes(report["provenance"]),
        "",
    ]
    if report.get("max_exit_layer"):
        lines += [
            f"Every row, the full model's included, stops at layer {report['max_exit_layer']} at the latest "
            "(`--max_exit_layer`).",
            "",
        ]
    for evaluation in report["evaluations"]:
        for split, result in evaluation["splits"].items():
            lines += [
                f"## {evaluation['model']} — {split} "
                f"({result['num_examples']} examples, {result['num_layers']} layers)",
                "",
                *criteria_tables(report, result),
                "Each internal classifier on its own:",
                "",
                layer_table(result["per_layer"], metrics),
                "",
            ]
    if report.get("training"):
        t = report["training"]
        lines += [
            "## Training",
            "",
            f"{t.get('train_samples', '?')} examples, {t.get('global_step', '?')} steps, "
            f"{t.get('train_runtime', 0):.1f} s ({t.get('train_samples_per_second', 0):.1f} examples/s).",
            "",
        ]
    return "\n".join(lines)


def criteria_tables(report: dict, result: dict) -> list[str]:
    """The patience table (when patience was selected) and one table per other criterion."""
    metrics, criteria = report["metrics"], report.get("criteria", ["patience"])
    lines = []
    if "patience" in criteria:
        if len(criteria) > 1:
            lines += ["### patience (PABEE)", ""]
        lines += [patience_table(result["patiences"], metrics), ""]
    full = result["patiences"][0]
    for name, rows in result.get("criteria", {}).items():
        lines += [f"### {name}", "", settings_table([full, *rows], metrics, f"{name} setting"), ""]
    return lines


def run_glue_plots(report: dict, output_dir: Path) -> None:
    """`patience_curve.png` (one curve per split, or per criterion when several were compared) and, for a
    comparison, `exit_histograms.png` at each criterion's best trade-off."""
    task, metric = report["task"], report["main_metric"]
    label = METRIC_LABELS.get(metric, metric)
    splits = report["evaluations"][-1]["splits"]
    criteria = report.get("criteria", ["patience"])
    if criteria == ["patience"]:
        curves = {f"{task} {split}": r["patiences"] for split, r in splits.items()}
        title = f"PABEE on {task}: {label} vs layer speed-up"
        plot_patience_curves(curves, metric, output_dir / "patience_curve.png", title=title)
        return
    split, result = next(iter(splits.items()))
    by_criterion = {name: result["patiences"] if name == "patience" else result["criteria"][name] for name in criteria}
    full = result["patiences"][0]
    curves = {name: rows if name == "patience" else [full, *rows] for name, rows in by_criterion.items()}
    title = f"Exit criteria on {task} {split}: {label} vs layer speed-up"
    plot_patience_curves(curves, metric, output_dir / "patience_curve.png", title=title)
    chosen = {
        name: best_tradeoff([r for r in rows if r is not full] or rows, metric, full[metric])
        for name, rows in by_criterion.items()
    }
    title = f"{task} {split}: exit layers at each criterion's fastest setting within 1 point of the full model"
    plot_exit_histograms(chosen, metric, output_dir / "exit_histograms.png", title=title)


# --- bench ----------------------------------------------------------------------------------------------------


def _setting_name(row: dict[str, Any]) -> str:
    """`patience 2`, `confidence 0.9`, ...: the criterion and its setting's label."""
    return f"{_spec(row).criterion} {point_label(row, short=False)}"


def _bench_header(report: dict[str, Any]) -> list[str]:
    """Title, model, data, command and the conditions every number below was measured under."""
    s, prov = report["settings"], report["provenance"]
    return [
        "# pabee bench",
        "",
        f"Model: `{prov['model']}`  ",
        f"Data: `{prov['data']}` ({s['examples']} examples; batch-size-1 loop on {s['bs1_examples']})  ",
        f"Command: `{prov['command']}`  ",
        f"{prov['date']}; {prov['hardware']['cpu']}, {s['threads']} threads, {s.get('attn_implementation')} "
        f"attention; torch {prov['versions']['torch']}, "
        f"transformers {prov['versions']['transformers']}; median of {s['repeats']} interleaved passes after "
        f"{s['warmup']} warm-up; length-sorted batches: {'yes' if s['sort_by_length'] else 'no'}.",
        "",
    ]


def _bench_rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """One line per setting and batch size: layer vs measured speed-up, throughput, batch-size-1 latency."""
    lines = [
        "| Setting | Batch | Avg. exit layer | Layer speed-up | Measured speed-up | Measured / layer | "
        "Early exit ex/s | Full ex/s | BS=1 ex/s | Batched / BS=1 | BS=1 p50 / p90 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {_setting_name(r)} | {r['batch_size']} | {r['avg_exit_layer']:.2f} | {r['layer_speed_up']:.2f}x | "
            f"{r['measured_speed_up']:.2f}x | {r['measured_over_layer']:.2f} | {r['examples_per_s']:.0f} | "
            f"{r['full_examples_per_s']:.0f} | {r['bs1_examples_per_s']:.0f} | {r['batched_over_bs1']:.2f}x | "
            f"{r['bs1_latency_p50_ms']:.1f} / {r['bs1_latency_p90_ms']:.1f} / {r['bs1_latency_p99_ms']:.1f} |"
        )
    return lines


def _bench_variants_table(variants: dict[str, dict[str, float]]) -> list[str]:
    """Every timed variant with its spread, so noise is visible next to the medians."""
    lines = [
        "",
        "| Variant | Examples/s (median) | Seconds (median) | Spread (max−min)/median |",
        "|---|---|---|---|",
    ]
    for name, v in variants.items():
        lines.append(f"| {name} | {v['examples_per_s']:.1f} | {v['seconds_median']:.3f} | {v['spread_pct']:.1f}% |")
    return lines


def _bench_overheads(report: dict[str, Any]) -> list[str]:
    """The engine's cost when nobody exits, what batching can gain at all, and the correctness check."""
    overhead = ", ".join(f"bs {b}: {v:+.1f}%" for b, v in report["no_exit_overhead_pct"].items())
    heads = ", ".join(f"bs {b}: {v:+.1f}%" for b, v in report["heads_no_exit_overhead_pct"].items())
    ceiling = ", ".join(f"bs {b}: {v:.2f}x" for b, v in report["full_batched_over_bs1"].items())
    return [
        "",
        f"No-exit overhead (engine with patience ≥ layers vs plain forward): {overhead}.  ",
        f"Every head and exit test computed while nobody exits, vs plain forward: {heads}.  ",
        f"What batching gains the plain full model over one example at a time (the ceiling for early exit's "
        f"batched / BS=1 ratio): {ceiling}.  ",
        f"Full vs engine logits, max abs difference: {report['check_full_vs_engine_max_abs_diff']:.2e}.",
    ]


def _bench_extras(report: dict[str, Any]) -> list[str]:
    """The optional sections: training-step cost (`--training_cost`) and time per part (`--profile`)."""
    lines = []
    if "training_cost" in report:
        t = report["training_cost"]
        lines += [
            "",
            f"Training step (batch {t['batch_size']}, {t['seq_len']} tokens): "
            f"PABEE {1000 * t['pabee_step_s']:.0f} ms, plain fine-tuning ({t['plain_model']}) "
            f"{1000 * t['plain_step_s']:.0f} ms, ratio {t['ratio']:.3f}.",
        ]
    if "profile" in report:
        lines += ["", "## Where early-exit time goes (seconds per pass)", ""]
        for name, parts in report["profile"].items():
            total = parts["total"]
            shares = ", ".join(f"{k} {v:.3f} ({100 * v / total:.0f}%)" for k, v in parts.items() if k != "total")
            lines.append(f"- {name}: total {total:.3f} — {shares}")
    return lines


def bench_markdown(report: dict[str, Any]) -> str:
    """`bench.md`: the bench tables, rendered from the JSON report."""
    lines = [
        *_bench_header(report),
        *_bench_rows_table(report["rows"]),
        *_bench_variants_table(report["variants"]),
        *_bench_overheads(report),
        *_bench_extras(report),
    ]
    return "\n".join(lines)
