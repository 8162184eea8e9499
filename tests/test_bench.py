"""`pabee bench` on a tiny model: well-formed output in seconds (timing targets are not asserted here; the
issue's targets are checked by `benchmarks/bench_targets.py`, whose reading of a report is tested here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import save_tiny_text_model

from pabee import ExitSpec, PabeeForSequenceClassification
from pabee.arguments import BenchArguments
from pabee.bench import NEVER_EXIT, make_batches, profile_early_exit, run_bench, time_variants
from pabee.cli import main
from pabee.errors import PabeeError
from pabee.report import bench_markdown

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tiny_model_dir(tmp_path, minilm_tokenizer):
    """A tiny random BERT PABEE model that shares the MiniLM vocabulary, saved with its tokenizer."""
    return save_tiny_text_model(tmp_path / "tiny", minilm_tokenizer, seed=0)


@pytest.fixture(scope="module")
def bench_targets() -> ModuleType:
    """`benchmarks/bench_targets.py`, the script that holds the issue's acceptance targets."""
    spec = importlib.util.spec_from_file_location("bench_targets", BENCHMARKS / "bench_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _random_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1000, 2000, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long)}


def _attributes(model: torch.nn.Module) -> dict[str, int]:
    """Every instance attribute of `model` and the identity of its value, to prove nothing was rebound (but the
    mean pooling's per-pass weights, which every forward renews)."""
    return {name: id(value) for name, value in vars(model).items() if name != "_mean_weights"}


def test_make_batches_pads_right_and_sorts():
    feats = [
        {"input_ids": torch.arange(1, n + 1), "attention_mask": torch.ones(n, dtype=torch.long)} for n in (5, 2, 4)
    ]
    plain = make_batches(feats, 2, pad_id=0, sort_by_length=False)
    assert [b["input_ids"].shape for b in plain] == [(2, 5), (1, 4)]
    assert plain[0]["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    assert [b["input_ids"].shape for b in make_batches(feats, 2, 0, sort_by_length=True)] == [(2, 4), (1, 5)]


def test_time_variants_interleaves_and_skips_warmup():
    calls = []
    variants = {name: (lambda timing, name=name: calls.append(name)) for name in "abc"}
    timings = time_variants(variants, repeats=3, warmup=2, seed=0)
    assert len(calls) == 15 and all(len(t.passes) == 3 for t in timings.values())
    rounds = [calls[i : i + 3] for i in range(0, 15, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds) and len({tuple(r) for r in rounds}) > 1


def test_bench_report_is_well_formed(tiny_model_dir, tmp_path, capsys, bench_targets):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"sentence {i} " + "word " * (i % 7) for i in range(24)) + "\n", encoding="utf-8")
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--model",
        str(tiny_model_dir),
        "--input_file",
        str(texts),
        "--patience",
        "1,2",
        "--batch_sizes",
        "4,8",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--profile",
        "--training_cost",
        "--output_dir",
        str(out),
        "--bs1_examples",
        "10",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Setting | Batch |" in printed and "| patience 1 | 4 |" in printed
    assert "## Targets" not in printed  # the targets live in benchmarks/bench_targets.py
    report = json.loads((out / "bench.json").read_text())
    assert report["settings"]["examples"] == 24 and report["settings"]["bs1_examples"] == 10
    assert report["settings"]["threads"] == 1
    assert [(r["patience"], r["batch_size"]) for r in report["rows"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for row in report["rows"]:
        assert 2.0 <= row["avg_exit_layer"] <= 4.0
        assert row["layer_speed_up"] == pytest.approx(4 / row["avg_exit_layer"])
        assert row["examples_per_s"] > 0 and row["bs1_latency_p50_ms"] <= row["bs1_latency_p99_ms"]
    expected = {f"{v}/bs{b}" for v in ("full", "no_exit", "heads_no_exit") for b in (4, 8)}
    expected |= {f"early_exit/p{p}/bs{b}" for p in (1, 2) for b in (4, 8)} | {
        "early_exit_bs1/p1",
        "early_exit_bs1/p2",
        "full_bs1",
    }
    assert set(report["variants"]) == expected
    assert set(report["heads_no_exit_overhead_pct"]) == {"4", "8"} == set(report["full_batched_over_bs1"])
    assert all(len(v) for v in report["variants"].values())
    assert report["check_full_vs_engine_max_abs_diff"] < 1e-5
    parts = report["profile"]["p1/bs4"]
    assert {"embeddings", "layers", "classifiers", "exit bookkeeping", "compaction", "total"} <= set(parts)
    assert parts["layers"] > 0 and sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert report["training_cost"]["ratio"] > 0
    assert "targets" not in report
    assert set(bench_targets.check_targets(report)) == {
        "batched_over_bs1",
        "measured_over_layer",
        "no_exit_overhead_pct",
        "training_ratio",
    }
    assert bench_targets.main([str(out / "bench.json")]) == 0
    assert capsys.readouterr().out.count("## Targets") == 1
    assert "versions" in report["provenance"] and (out / "bench.md").read_text().startswith("# pabee bench")
    assert (out / "bench.md").read_text() == bench_markdown(report) + "\n"
    # Existing results are not overwritten silently.
    assert main(argv) == 2
    assert "bench.json exists" in capsys.readouterr().err


def test_bench_times_several_exit_criteria(tiny_model_dir, tmp_path, capsys, bench_targets):
    texts = tmp_path / "texts.jsonl"  # any format of `data.read_text_file`
    lines = [json.dumps({"text": f"sentence {i} " + "word " * (i % 5), "label": i % 2}) for i in range(12)]
    texts.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["bench", "--model", str(tiny_model_dir), "--input_file", str(texts), "--batch_sizes", "4"]
    argv += "--repeats 1 --warmup 0 --threads 1 --patience 1 --max_exit_layer 3".split()
    argv += ["--exit_criterion", "patience,confidence,static", "--exit_threshold", "confidence=0.5,0.99", "static=2"]
    argv += ["--output_dir", str(tmp_path / "out")]
    assert main(argv) == 0
    assert "| confidence 0.99 | 4 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [r["setting"] for r in report["rows"]] == ["1", "0.5", "0.99", "k=2"]
    exits = {r["setting"]: r["avg_exit_layer"] for r in report["rows"]}
    assert exits["0.5"] == 1.0 and exits["0.99"] == 3.0 and exits["k=2"] == 2.0  # 0.99 never fires: the cap
    assert {"early_exit/confidence=0.5/bs4", "early_exit_bs1/static=2", "early_exit/p1/bs4"} <= set(report["variants"])
    assert report["settings"]["examples"] == 12
    targets = bench_targets.check_targets(report)
    assert targets["batched_over_bs1"]["measured"] is not None  # targets read the patience rows
    argv[argv.index("confidence=0.5,0.99")] = "confidence=2"
    assert main(argv + ["--overwrite_output_dir"]) == 2
    assert "threshold 2.0 is invalid for 'confidence'" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_on_glue_dev_with_the_bundled_model(glue_dir, capsys):
    args = BenchArguments(
        data_dir=str(glue_dir),
        task_name="rte",
        max_examples=8,
        bs1_examples=4,
        patience="1",
        batch_sizes="8",
        repeats=1,
        warmup=0,
    )
    report = run_bench(args)
    assert report["settings"]["examples"] == 8 and report["provenance"]["data"].endswith("RTE/dev.tsv")
    assert "fresh, untrained heads" in report["provenance"]["model"]


@pytest.mark.parametrize(("flag", "value"), [("--patience", "1,x"), ("--batch_sizes", "0"), ("--patience", "-1")])
def test_bench_bad_lists_are_exit_code_2(flag, value, capsys):
    assert main(["bench", flag, value]) == 2
    assert f"{flag} '{value}' is invalid" in capsys.readouterr().err


def test_bench_missing_input_file(tmp_path):
    # The texts are read before the model is loaded, so this fails at once.
    with pytest.raises(PabeeError, match="Missing input file"):
        run_bench(BenchArguments(input_file=str(tmp_path / "nope.txt"), repeats=1))


def test_profiler_times_parts_and_leaves_the_model_alone(tiny_model_dir):
    from pabee import modeling

    model = PabeeForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    before, module_before = _attributes(model), dict(vars(modeling))
    parts = profile_early_exit(model, [_random_batch()], ExitSpec("patience", patience=1), passes=2)
    engine_parts = ["embeddings", "attention masks", "layers", "classifiers", "exit bookkeeping", "compaction"]
    assert all(parts[name] > 0 for name in engine_parts) and parts["total"] > 0
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
    assert _attributes(model) == before and dict(vars(modeling)) == module_before


def test_never_exiting_runs_every_head_and_matches_the_full_model(tiny_model_dir):
    model = PabeeForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    batch = _random_batch()
    calls: list[int] = []
    for layer, head in enumerate(model.classifiers):
        head.register_forward_hook(lambda *a, layer=layer: calls.append(layer))
    with torch.no_grad():
        full = model(**batch, patience=0)
        assert calls == [3], "patience 0 skips the early heads"
        calls.clear()
        before = _attributes(model)
        heads = model(**batch, exit_spec=NEVER_EXIT)
    assert calls == [0, 1, 2, 3] and heads.exit_layers.tolist() == [4] * 8
    torch.testing.assert_close(heads.logits, full.logits)
    assert _attributes(model) == before


def test_every_committed_result_renders_from_its_json():
    """Each committed results .md is what its script renders from the .json beside it, byte for byte, so a table
    cannot drift from the numbers it claims to show (`python benchmarks/common.py --check`)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "common.py"), "--check"], capture_output=True, text=True, cwd=BENCHMARKS
    )
    checked = done.stdout.splitlines()
    assert done.returncode == 0, [line for line in checked if not line.startswith("identical")]
    assert len(checked) >= 10 and all(line.startswith("identical") for line in checked)
