"""How reproduction v3's results file states what each number rests on: which tasks trained on a subset, and a
plain baseline whose training collapsed to one answer (so its score is not read as a model's)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from pabee.glue import get_task

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def v3() -> ModuleType:
    """`benchmarks/reproduce_glue_v3.py`, which imports its sibling scripts from its own folder."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import reproduce_glue_v3

        return reproduce_glue_v3
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_subsets_are_named_per_task_and_backbone(v3):
    limits = {"minilm": {"SST-2": 8000}, "mpnet": {"SST-2": 8000, "STS-B": 3000}}
    keys = ["minilm MRPC", "minilm SST-2", "minilm STS-B", "mpnet SST-2", "mpnet STS-B"]
    assert v3._limits(limits, keys) == (
        "trained on subsets: SST-2 on its first 8,000 training examples (minilm, mpnet); "
        "STS-B on its first 3,000 training examples (mpnet)"
    )
    # Only the tasks in the report: a limit for a task not yet run is not claimed.
    assert v3._limits(limits, ["minilm SST-2", "minilm STS-B"]) == (
        "trained on subsets: SST-2 on its first 8,000 training examples (minilm)"
    )
    assert v3._limits(limits, ["minilm MRPC"]) == "every task trains on its whole training set"


def test_every_backbone_has_its_limits(v3):
    assert set(v3.TRAIN_LIMITS) == set(v3.HYPER)


def _trained(predictions: list, layers: int = 10) -> dict:
    return {"predictions": predictions, "num_layers": layers, "train_seconds": 60.0, "train_steps": 10}


def test_a_collapsed_baseline_is_flagged(v3):
    task = get_task("RTE")
    labels = np.array([0, 1] * 10)
    halves = {"choose": np.arange(10), "report": np.arange(10, 20)}
    collapsed = v3._plain(task, _trained([1] * 19 + [0]), labels, halves)
    assert collapsed["top_class_share"] == pytest.approx(0.95)
    assert collapsed["report"] == pytest.approx(40.0)  # 1 on indices 10..18, 0 on 19: right on 11, 13, 15, 17
    assert v3._collapsed(collapsed) == "; training collapsed: one class for 95.0% of dev"
    healthy = v3._plain(task, _trained([0, 1] * 9 + [1, 1]), labels, halves)
    assert healthy["top_class_share"] == pytest.approx(0.55)
    assert v3._collapsed(healthy) == ""


def test_regression_baselines_have_no_class_share(v3):
    task = get_task("STS-B")
    labels = np.linspace(0, 5, 20)
    halves = {"choose": np.arange(10), "report": np.arange(10, 20)}
    plain = v3._plain(task, _trained(list(labels + 0.1)), labels, halves)
    assert "top_class_share" not in plain
    assert v3._collapsed(plain) == ""


def test_the_static_target_counts_only_the_issues_tasks(v3):
    def task(margin: float) -> dict:
        best = {"criterion": "entropy", "setting": "0.4", "speed_up": 1.5, "score": 90.0, "within": True}
        return {"summary": {"pabee": {"patience": None, "best": {**best, "margin_over_static": margin}}}}

    # A win on STS-B (beside the target for MPNet) must not make up for the missing MRPC and SST-2.
    tasks = {"mpnet RTE": task(1.2), "mpnet STS-B": task(2.0)}
    row = next(t for t in v3.targets(tasks) if t["target"].startswith("MPNet: adaptive beats static"))
    assert row["status"] == "open"
    assert row["detail"] == (
        "1 of 3 tasks measured; PABEE, paper's loss 1/1; beside the target, mpnet STS-B: PABEE, paper's loss beats"
    )
    tasks |= {"mpnet MRPC": task(0.9), "mpnet SST-2": task(1.0)}
    row = next(t for t in v3.targets(tasks) if t["target"].startswith("MPNet: adaptive beats static"))
    assert row["status"] == "met"  # RTE and SST-2 (a margin of exactly 1 point counts)
    assert row["detail"].startswith("3 of 3 tasks measured; PABEE, paper's loss 2/3;")
