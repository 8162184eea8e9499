"""Results files: provenance (command, versions, hardware), atomic writes, Markdown tables and the patience plot.

Every number we publish is written with what produced it, and files are replaced atomically so an interrupted
run never leaves half a results file behind.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .metrics import METRIC_LABELS


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """The machine the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for package in ("pabee", "torch", "transformers", "datasets", "accelerate", "tokenizers", "scikit-learn"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def provenance(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """Command line, date, versions and hardware, plus whatever the caller adds (model, data files, ...)."""
    return {
        "command": command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "versions": versions(),
        "hardware": hardware(),
    }


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file through a temporary sibling and `os.replace`, so readers see the old or the new file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def point_label(row: dict, short: bool = True) -> str:
    """How a results row is named: its patience (`p=3` in plots) or its criterion setting (`0.9`, `k=2`)."""
    if row.get("criterion", "patience") == "patience":
        if row["patience"] == 0:
            return "full" if short else "0 (full)"
        return f"p={row['patience']}" if short else str(row["patience"])
    return row["setting"]


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

    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name)
    plt.close(fig)
    os.replace(tmp.name, path)
