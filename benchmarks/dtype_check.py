"""What `--dtype bfloat16` changes: accuracy, agreement with float32, batched vs one-by-one, and speed.

On the whole SST-2 dev set, the same fine-tuned model is loaded in float32 and in bfloat16 through
`pabee.pipeline`; for each patience the script reports both accuracies, how often labels and exit layers agree
between the two, whether batched bfloat16 answers equal one-by-one bfloat16 answers, and sentences/s of each
(batches of 32, length-sorted by the pipeline, 2 threads). Results: `--output`.json and .md.

    python benchmarks/dtype_check.py --model runs/sst2_bench_model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from pabee.pipeline import pipeline  # noqa: E402
from pabee.provenance import provenance, write_atomic, write_json  # noqa: E402


def sst2_dev(glue_dir: Path) -> tuple[list[str], list[int]]:
    with open(glue_dir / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sst2_bench_model")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--patience", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "bf16_sst2"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts, gold = sst2_dev(Path(args.glue_dir))
    examples = [(t, None) for t in texts]
    pipes = {dtype: pipeline(args.model, dtype=dtype, batch_size=32) for dtype in ("float32", "bfloat16")}
    # run-glue keeps GLUE's label order, so class index i is the dev file's label i.
    if pipes["float32"].labels != ["negative", "positive"]:
        raise SystemExit(f"{args.model} is not an SST-2 model (labels {pipes['float32'].labels}).")
    rows = []
    for patience in (int(p) for p in args.patience.split(",")):
        out, speed = {}, {}
        for dtype, pipe in pipes.items():
            pipe.run(examples[:64], patience=patience)  # warm-up
            start = time.perf_counter()
            logits, exits = pipe.run(examples, patience=patience)
            speed[dtype] = len(examples) / (time.perf_counter() - start)
            out[dtype] = (logits.argmax(-1), exits)
        singles = [pipes["bfloat16"].run([e], patience=patience) for e in examples]
        one_labels = torch.cat([s[0].argmax(-1) for s in singles])
        one_exits = torch.cat([s[1] for s in singles])
        (y32, e32), (y16, e16) = out["float32"], out["bfloat16"]
        gold_t = torch.tensor(gold)
        rows.append(
            {
                "patience": patience,
                "accuracy_float32": float((y32 == gold_t).float().mean()),
                "accuracy_bfloat16": float((y16 == gold_t).float().mean()),
                "labels_agree": float((y32 == y16).float().mean()),
                "exit_layers_agree": float((e32 == e16).float().mean()),
                "avg_exit_float32": float(e32.float().mean()),
                "avg_exit_bfloat16": float(e16.float().mean()),
                "bf16_batched_equals_one_by_one": bool((y16 == one_labels).all() and (e16 == one_exits).all()),
                "per_s_float32": speed["float32"],
                "per_s_bfloat16": speed["bfloat16"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    report = {"rows": rows, "provenance": provenance(model=args.model, data=f"{args.glue_dir}/SST-2/dev.tsv")}
    out_path = Path(args.output)
    write_json(out_path.with_suffix(".json"), report)
    p = report["provenance"]
    lines = [
        "# float32 vs bfloat16 weights: SST-2 dev, all 872 sentences",
        "",
        f"Model: `{args.model}`. Command: `{p['command']}`  ",
        f"Date: {p['date']}; torch {p['versions']['torch']}, transformers {p['versions']['transformers']}, "
        f"{p['hardware']['cpu']}, {args.threads} threads. Speed: `pabee.pipeline`, batches of 32 sorted by length.",
        "",
        "| Patience | Acc. float32 | Acc. bfloat16 | Labels agree | Exit layers agree | Avg. exit (f32 / bf16) | "
        "bf16 batched = one-by-one | Sentences/s f32 | Sentences/s bf16 | Speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['patience']} | {100 * r['accuracy_float32']:.2f} | {100 * r['accuracy_bfloat16']:.2f} | "
            f"{100 * r['labels_agree']:.2f}% | {100 * r['exit_layers_agree']:.2f}% | "
            f"{r['avg_exit_float32']:.2f} / {r['avg_exit_bfloat16']:.2f} | "
            f"{'yes' if r['bf16_batched_equals_one_by_one'] else 'NO'} | {r['per_s_float32']:.0f} | "
            f"{r['per_s_bfloat16']:.0f} | {r['per_s_bfloat16'] / r['per_s_float32']:.2f}x |"
        )
    write_atomic(out_path.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
