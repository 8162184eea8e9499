"""Ray Data vs single-process `pabee predict` on the SST-2 training sentences (67k), on this machine (ray.md).

Each variant is the real command in its own process, timed from start to exit (model load, Ray start, reading
and writing included), interleaved over `--rounds`: `single` (`pabee predict --threads T`) and `ray AxB`
(`--ray --concurrency A --threads B`, A x B = T, on a local Ray the command starts). A run on 16 sentences measures
each variant's start-up, so the steady throughput can be told from it; Ray's predictions are compared with
single-process ones. Target (issue #15): within 15% of single-process throughput. The .md ends with the
hand-written plan for N machines, `--output`_plan.md.

    python benchmarks/ray_predict.py --model runs/sst2 --threads 2 --rounds 2    # ~25 min on 2 cores
"""

import argparse
import json
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import common

APPENDIX = "_plan.md"  # the hand-written plan for N machines, after the rendered part


def variants(threads: int) -> dict[str, list[str]]:
    out = {"single": ["--threads", str(threads)]}
    for actors in sorted({threads, 1}, reverse=True):
        each = str(threads // actors)
        out[f"ray {actors}x{each}"] = ["--ray", "--concurrency", str(actors), "--threads", each]
    return out


def run_variant(name: str, flags: list[str], model: str, data: Path, out: Path) -> dict[str, Any]:
    target = out / "single.jsonl" if name == "single" else out / name.replace(" ", "_")
    command = ["pabee", "predict", "--model", model, "--input", str(data), *flags, "--output", str(target)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    summary = next(line for line in done.stderr.splitlines() if line.startswith("pabee predict:"))
    examples = int(re.search(r"(\d+) examples in", summary).group(1))
    inner = float(re.search(r"examples in ([\d.]+) s", summary).group(1))
    return {"variant": name, "command": shlex.join(command), "wall_s": wall, "examples": examples,
            "in_command_s": inner, "summary": summary, "output": str(target)}  # fmt: skip


def predictions(path: Path) -> list[tuple[str, int, float, str]]:
    files = [path] if path.is_file() else sorted(path.glob("*.predictions.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    return [(r["text"], r["label"], r["exit_layer"], r["score"]) for r in rows]


def compare(single: Path, other: Path) -> dict[str, Any]:
    a, b = predictions(single), predictions(other)
    same_rows = len(a) == len(b) and all(x[0] == y[0] for x, y in zip(a, b, strict=True))
    return {
        "rows": [len(a), len(b)],
        "same_texts_in_order": same_rows,
        "label_or_exit_differences": sum((x[1], x[2]) != (y[1], y[2]) for x, y in zip(a, b, strict=False)),
        "max_score_difference": max((abs(x[3] - y[3]) for x, y in zip(a, b, strict=False)), default=0.0),
    }


def write_inputs(glue_dir: Path, folder: Path, limit: int | None) -> tuple[Path, Path, int]:
    """The training sentences as a TSV (all of them, or the first `limit`) and a 16-sentence one for start-up."""
    source = glue_dir / "SST-2" / "train.tsv"
    lines = source.read_text(encoding="utf-8").splitlines()
    body = lines[1 : 1 + limit] if limit else lines[1:]
    full, small = folder / "train.tsv", folder / "startup" / "train16.tsv"
    small.parent.mkdir()
    full.write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")
    small.write_text("\n".join([lines[0], *body[:16]]) + "\n", encoding="utf-8")
    return full, small, len(body)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs, comparisons = [], []
    with tempfile.TemporaryDirectory(prefix="pabee-ray-bench-") as tmp:
        folder = Path(tmp)
        data, small, count = write_inputs(Path(args.glue_dir), folder, args.max_examples)
        flags = {name: [*f, "--text_column", "sentence"] for name, f in variants(args.threads).items()}
        for round_ in range(args.rounds):
            order = list(flags) if round_ % 2 == 0 else list(flags)[::-1]
            for kind, path in (("startup", small), ("full", data)):
                for name in order:
                    out = folder / f"r{round_}-{kind}"
                    out.mkdir(exist_ok=True)
                    run = run_variant(name, flags[name], args.model, path, out)
                    runs.append({"round": round_, "input": kind, **run})
                    print(f"round {round_} {kind:7} {name:8} {run['wall_s']:7.1f} s  {run['summary']}", flush=True)
            single = folder / f"r{round_}-full" / "single.jsonl"
            for name in flags:
                if name != "single":
                    target = folder / f"r{round_}-full" / name.replace(" ", "_")
                    comparisons.append({"round": round_, "variant": name, **compare(single, target)})
                    print(f"round {round_} {name}: {comparisons[-1]}", flush=True)
            for sub in folder.glob(f"r{round_}-*"):
                shutil.rmtree(sub)
    from importlib.metadata import version

    source = {"model": args.model, "data": str(Path(args.glue_dir) / "SST-2" / "train.tsv"), "ray": version("ray")}
    return common.report(
        runs=runs,
        comparisons=comparisons,
        summary=summarise(runs, count),
        provenance={**source, "examples": count, "threads": args.threads},
    )


def summarise(runs: list[dict], count: int) -> dict[str, Any]:
    names = list(dict.fromkeys(r["variant"] for r in runs))
    out = {}
    for name in names:
        full = [r["wall_s"] for r in runs if r["variant"] == name and r["input"] == "full"]
        startup = [r["wall_s"] for r in runs if r["variant"] == name and r["input"] == "startup"]
        wall, fixed = statistics.median(full), statistics.median(startup)
        out[name] = {
            "wall_s": wall,
            "startup_s": fixed,
            "examples_per_s": count / wall,
            "steady_examples_per_s": count / max(wall - fixed, 1e-9),
        }
    base = out.get("single")
    for row in out.values():
        row["throughput_vs_single"] = row["examples_per_s"] / base["examples_per_s"]
        row["steady_vs_single"] = row["steady_examples_per_s"] / base["steady_examples_per_s"]

    def wall(name: str, round_: int) -> float:
        return next(r["wall_s"] for r in runs if (r["variant"], r["input"], r["round"]) == (name, "full", round_))

    rounds = sorted({r["round"] for r in runs})
    per_round = {name: [wall("single", k) / wall(name, k) for k in rounds] for name in names}
    return {"variants": out, "throughput_vs_single_per_round": per_round}


def render(results: dict[str, Any]) -> str:
    p, s = results["provenance"], results["summary"]
    hw = p.get("hardware", {})
    lines = [
        "# Ray Data vs single-process `pabee predict` (SST-2 train, 67k sentences)",
        "",
        f"Command: `{p['command']}` · {p['date']} · model `{p['model']}` · {p['examples']} sentences of "
        f"`{p['data']}` · {p['threads']} threads in total per variant · Ray {p['ray']} · torch "
        f"{p.get('versions', {}).get('torch', '?')} · CPU: {hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPUs, "
        f"flags {', '.join(hw.get('cpu_flags', [])) or '?'}.",
        "",
        "Every run is the real command in its own process, timed from start to exit (model load, Ray start, reading "
        "and writing included); variants interleaved, median of the rounds. *Start-up* is the same command on 16 "
        "sentences; *steady* is the throughput with it subtracted.",
        "",
        "| Variant | wall (s) | examples/s | × single | start-up (s) | steady examples/s | steady × single |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in s["variants"].items():
        lines.append(
            f"| {name} | {row['wall_s']:.1f} | {row['examples_per_s']:.0f} | {row['throughput_vs_single']:.2f} | "
            f"{row['startup_s']:.1f} | {row['steady_examples_per_s']:.0f} | {row['steady_vs_single']:.2f} |"
        )
    ratios = s["throughput_vs_single_per_round"]
    per_round = [f"{name} {', '.join(f'{x:.2f}' for x in r)}" for name, r in ratios.items() if name != "single"]
    lines += ["", "Per round, single's wall time / the variant's: " + "; ".join(per_round), ""]
    lines += ["Predictions against single-process `pabee predict`:", ""]
    for c in results["comparisons"]:
        lines.append(
            f"- round {c['round']}, {c['variant']}: {c['rows'][1]} rows (single: {c['rows'][0]}), texts in the same "
            f"order: {c['same_texts_in_order']}, label or exit-layer differences: {c['label_or_exit_differences']}, "
            f"largest score difference {c['max_score_difference']:.1e}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = common.parser(__doc__, "ray", model="runs/sst2", rounds=2)
    parser.add_argument("--max_examples", type=int, default=None, help="Use only the first N training sentences.")
    common.write_report(parser.parse_args(), measure, render, APPENDIX)


if __name__ == "__main__":
    main()
