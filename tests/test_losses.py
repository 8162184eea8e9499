"""The layer-weighted loss and self-distillation: the paper's loss when the weight is 0, the teacher never
learns from its students, and bad settings are refused before training."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_run_glue_refuses, tiny_run_glue_argv
from torch.nn import functional as F

from pabee.cli import main
from pabee.configuration import PabeeConfig
from pabee.losses import distillation_loss, layer_weighted_loss

PROBLEMS = ["single_label_classification", "regression", "multi_label_classification"]


def logits_and_labels(problem: str, batch: int = 5, layers: int = 4, classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    width = 1 if problem == "regression" else classes
    logits = torch.randn(batch, layers, width, requires_grad=True)
    if problem == "regression":
        labels = torch.rand(batch) * 5
    elif problem == "multi_label_classification":
        labels = torch.randint(0, 2, (batch, classes)).float()
    else:
        labels = torch.randint(0, classes, (batch,))
    return logits, labels


def paper_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ_i i·loss_i / Σ_i i written out, as the research code computes it."""
    losses = []
    for i in range(logits.shape[1]):
        layer = logits[:, i]
        if problem == "regression":
            losses.append(F.mse_loss(layer.squeeze(-1), labels))
        elif problem == "multi_label_classification":
            losses.append(F.binary_cross_entropy_with_logits(layer, labels))
        else:
            losses.append(F.cross_entropy(layer, labels))
    return sum((i + 1) * loss for i, loss in enumerate(losses)) / sum(range(1, len(losses) + 1))


@pytest.mark.parametrize("problem", PROBLEMS)
def test_weight_zero_is_the_papers_loss(problem):
    logits, labels = logits_and_labels(problem)
    assert torch.allclose(layer_weighted_loss(problem, logits, labels), paper_loss(problem, logits, labels))


def test_distillation_by_hand_for_classification():
    logits, labels = logits_and_labels("single_label_classification", layers=3)
    alpha, t = 0.4, 2.0
    teacher = F.softmax(logits[:, -1].detach() / t, dim=-1)
    expected = 0.0
    for i in range(3):
        ce = F.cross_entropy(logits[:, i], labels)
        if i < 2:
            student = F.log_softmax(logits[:, i] / t, dim=-1)
            kl = (teacher * (teacher.log() - student)).sum(-1).mean() * t * t
            ce = (1 - alpha) * ce + alpha * kl
        expected = expected + (i + 1) * ce
    got = layer_weighted_loss("single_label_classification", logits, labels, alpha, t)
    assert torch.allclose(got, expected / 6)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_the_teacher_learns_from_labels_only(problem):
    """The last layer's gradient is the same with or without distillation: its prediction is detached."""
    grads = []
    for weight in (0.0, 0.7):
        logits, labels = logits_and_labels(problem)
        layer_weighted_loss(problem, logits, labels, weight, 2.0).backward()
        grads.append(logits.grad)
    assert torch.allclose(grads[0][:, -1], grads[1][:, -1])
    assert not torch.allclose(grads[0][:, 0], grads[1][:, 0])  # the students do learn something else


@pytest.mark.parametrize("problem", PROBLEMS)
def test_a_student_that_copies_the_teacher_has_nothing_left_to_distil(problem):
    logits, _ = logits_and_labels(problem)
    teacher = logits[:, -1].detach()
    gap = distillation_loss(problem, teacher.clone().requires_grad_(), teacher, 2.0)
    other = distillation_loss(problem, logits[:, 0], teacher, 2.0)
    if problem == "multi_label_classification":  # BCE to soft targets bottoms out at their entropy
        assert gap < other
    else:
        assert gap.item() == pytest.approx(0.0, abs=1e-6) and other > 0


def test_the_config_records_and_checks_distillation():
    config = PabeeConfig(num_labels=2, distillation_weight=0.5, distillation_temperature=3.0)
    again = PabeeConfig.from_dict(config.to_dict())
    assert (again.distillation_weight, again.distillation_temperature) == (0.5, 3.0)
    with pytest.raises(ValueError, match="distillation_weight=1.5 is invalid"):
        PabeeConfig(num_labels=2, distillation_weight=1.5)
    with pytest.raises(ValueError, match="distillation_temperature=0 is invalid"):
        PabeeConfig(num_labels=2, distillation_temperature=0)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distillation_weight", "-0.1"], "--distillation_weight=-0.1 is invalid"),
        (["--distillation_temperature", "0"], "--distillation_temperature=0.0 is invalid"),
    ],
)
def test_bad_distillation_flags_are_one_line(flags, message, tmp_path, capsys):
    assert_run_glue_refuses(flags, message, tmp_path / "out", lambda: capsys.readouterr().err)


def test_a_trained_model_says_how_it_was_trained(tmp_path, minilm_tokenizer):
    """run-glue on a tiny random encoder with distillation: the saved config records the weight and temperature."""
    argv, out = tiny_run_glue_argv(tmp_path, minilm_tokenizer, num_rows=24)
    argv += ["--distillation_weight", "0.5", "--distillation_temperature", "2"]
    assert main(argv) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["distillation_weight"], saved["distillation_temperature"]) == (0.5, 2.0)
