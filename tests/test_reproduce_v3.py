"""How reproduction v3's results file states what each number rests on: which tasks trained on a subset, and a
plain baseline whose training collapsed to one answer (so its score is not read as a model's)."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from helpers import benchmark_script

from pabee.glue import get_task


@pytest.fixture(scope="module")
def v3() -> ModuleType:
    return benchmark_script("reproduce_glue_v3")


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


# --- the comparisons, on hand-built analyses -------------------------------------------------------------------


def _row(criterion: str, value: float, report_score: float, report_layer: float, choose_layer: float | None = None,
         layers: int = 6) -> dict:  # fmt: skip
    """One setting as `reproduce_glue_v3.analyse` records it: scores and layers on both halves."""
    choose_layer = report_layer if choose_layer is None else choose_layer
    spec = {"criterion": criterion, "patience": int(value) if criterion == "patience" else None,
            "threshold": None if criterion == "patience" else value, "max_exit_layer": None}  # fmt: skip
    return {
        "criterion": criterion,
        "setting": f"{value:g}",
        "spec": spec,
        "choose": {"score": 90.0, "avg_exit_layer": choose_layer, "speed_up": layers / choose_layer},
        "report": {"score": report_score, "avg_exit_layer": report_layer, "speed_up": layers / report_layer},
    }


def _run(chosen: dict[str, int | None], **rows: list[dict]) -> dict:
    """An analysed run: per criterion its rows and the index chosen on half 1 (None: nothing within)."""
    static = [_row("static", k, 70.0 + 5 * k, k) for k in range(1, 7)]  # k=2: 80, k=3: 85, ...
    criteria = {"static": {"rows": static, "chosen": None}, "patience": {"rows": [], "chosen": None}}
    criteria |= {name: {"rows": found, "chosen": chosen.get(name)} for name, found in rows.items()}
    return {"criteria": criteria, "seconds_per_step": 1.0}


def test_static_truncation_is_read_between_its_neighbouring_layers(v3):
    analysed = _run({})
    assert v3.static_at(analysed, 3.0) == pytest.approx(85.0)
    assert v3.static_at(analysed, 2.4) == pytest.approx(82.0)  # 80 + 0.4 x (85 - 80)


def test_the_best_adaptive_setting_is_chosen_on_the_choosing_half_and_judged_on_the_other(v3):
    # Confidence uses fewer layers on the choosing half (3.0 vs 4.0) though more on the reporting half (4.5 vs 4.0):
    # the choice must follow half 1, the numbers half 2.
    patience = [_row("patience", 2, 91.0, 4.0, choose_layer=4.0)]
    confidence = [_row("confidence", 0.8, 88.5, 4.5, choose_layer=3.0)]
    best = v3.best_within(_run({"patience": 0, "confidence": 0}, patience=patience, confidence=confidence), 90.0)
    assert (best["criterion"], best["setting"]) == ("confidence", "0.8")
    assert best["speed_up"] == pytest.approx(6 / 4.5) and best["score"] == 88.5
    assert not best["within"]  # 88.5 < 90 - 1 on the reporting half
    assert best["static_score"] == pytest.approx(92.5) and best["margin_over_static"] == pytest.approx(-4.0)
    assert v3._kept_speed_up(best) == 1.0  # not within: nothing kept
    assert v3._kept_speed_up({**best, "within": True}) == pytest.approx(6 / 4.5)
    assert v3._kept_speed_up(None) == 1.0
    assert v3.best_within(_run({"patience": None}, patience=patience), 90.0) is None


def _analysis(paper: dict, recipe: dict, noise: float) -> dict:
    return {"baseline": {"report": 90.0}, "noise": noise, "runs": {"pabee": paper, "alignment": recipe}}


def test_a_recipe_gains_only_beyond_the_noise_of_the_half(v3):
    # The same setting (confidence 0.8, 2x) lands 0.3 points apart, just under and just over the bar: the raw
    # difference of kept speed-ups is +1.0x, but the paper's loss scores within the noise at that speed-up.
    paper = _run({"confidence": 0}, confidence=[_row("confidence", 0.8, 88.8, 3.0), _row("confidence", 0.9, 90, 4)])
    recipe = _run({"confidence": 0}, confidence=[_row("confidence", 0.8, 89.1, 3.0)])
    summary = v3.summary(_analysis(paper, recipe, noise=2.0))["alignment"]
    assert summary["raw_gain"] == pytest.approx(1.0) and summary["gain"] == pytest.approx(0.0)
    # With a noise of 0.1 the paper's loss matches 89.1 only with confidence 0.9 (1.5x): the recipe gains 0.5x.
    assert v3.matching_speed_up(paper, 89.1, 0.1) == pytest.approx(1.5)
    assert v3.summary(_analysis(paper, recipe, noise=0.1))["alignment"]["gain"] == pytest.approx(0.5)


def test_a_recipe_that_keeps_less_loses_what_the_paper_loss_keeps_beyond_noise(v3):
    paper = _run({"patience": 0}, patience=[_row("patience", 2, 90.5, 2.0)])  # 3x, within the bar
    recipe = _run({"patience": 0}, patience=[_row("patience", 2, 85.0, 2.0), _row("patience", 4, 90.0, 5.0)])
    summary = v3.summary(_analysis(paper, recipe, noise=1.0))["alignment"]
    # The recipe keeps nothing; at 90.5 - 1 it reaches 6 / 5 = 1.2x, so the paper's loss is 1.8x ahead.
    assert summary["raw_gain"] == pytest.approx(-2.0) and summary["gain"] == pytest.approx(-1.8)
