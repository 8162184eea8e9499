"""The model alone, without HTTP: sentences/s on batches of random SST-2 dev sentences and one at a time.

Run as its own process by `load_test.py` (what batching itself gives, next to the server's numbers) and
`thread_pools.py` (the model loaded in the main thread vs in the thread that runs it). The model always runs in
`pabee.batching.forward_thread`, as in the server; prints one JSON line `{"batched_per_s", "single_per_s"}`.

    python benchmarks/model_alone.py --model runs/sst2_bench_model --batch 16
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(argv: list[str]) -> dict[str, float]:
    """Run this script with `argv` in a fresh process; its result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(Path(__file__).resolve()), *argv]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/sst2_bench_model")
    parser.add_argument("--glue_dir", default=os.environ.get("GLUE_DIR", str(ROOT.parent / "shared" / "glue")))
    parser.add_argument("--batch", type=int, default=16, help="Random sentences per batched call.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Timed seconds per measure.")
    parser.add_argument("--warmup", type=float, default=2.0, help="Untimed seconds per measure first.")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--max_batch_size", type=int, default=32, help="The pipeline's batch size.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--attn_implementation", choices=["sdpa", "eager"])
    parser.add_argument("--load_in", choices=["worker", "main"], default="worker", help="Thread loading the model.")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from pabee.batching import forward_thread
    from pabee.onnx_export import is_onnx_folder
    from pabee.pipeline import pipeline

    worker = forward_thread(args.threads)
    options = {"dtype": args.dtype, "attn_implementation": args.attn_implementation}
    if is_onnx_folder(args.model):  # an export: ONNX Runtime threads as the server's
        options = {"threads": args.threads}

    def load():
        return pipeline(args.model, patience=args.patience, batch_size=args.max_batch_size, **options)

    pipe = load() if args.load_in == "main" else worker.submit(load).result()
    with open(Path(args.glue_dir) / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    rng = random.Random(0)

    def rate(size: int, seconds: float) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            pipe([rng.choice(sentences) for _ in range(size)])
            done += size
        return done / (time.perf_counter() - start)

    def run() -> dict[str, float]:
        rate(args.batch, args.warmup), rate(1, args.warmup)
        return {"batched_per_s": rate(args.batch, args.seconds), "single_per_s": rate(1, args.seconds)}

    print(json.dumps(worker.submit(run).result()))


if __name__ == "__main__":
    main()
