"""The training loss: every layer's classifier learns from the labels, deeper ones counting more, and optionally
from the last layer's own prediction (self-distillation), which makes the early layers agree with it sooner.

Early exit is only as fast as layers 1..k are good: an internal classifier that learns the final classifier's
softened distribution, not just the hard label, gets more signal per example (FastBERT, BERxiT, LeeBERT).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .exits import MULTI_LABEL, REGRESSION

__all__ = ["check_distillation", "distillation_loss", "label_loss", "layer_weighted_loss"]


def check_distillation(weight: float, temperature: float) -> None:
    """`ValueError` unless 0 <= `weight` <= 1 and `temperature` > 0."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation_weight={weight!r} is invalid: use a number from 0 (labels only) to 1.")
    if not temperature > 0.0:
        raise ValueError(f"distillation_temperature={temperature!r} is invalid: use a number > 0.")


def label_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One classifier's loss against the labels: MSE (regression), BCE (multi-label) or cross-entropy."""
    if problem == REGRESSION:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1))
    if problem == MULTI_LABEL:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def distillation_loss(problem: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """How far one classifier is from the teacher's (detached) prediction.

    Classification: KL divergence of the softened distributions (softmax, or per-label sigmoids) at
    `temperature`, times temperature² so its gradients keep their size as the temperature changes (Hinton et al.).
    Regression: the squared difference to the teacher's value.
    """
    teacher = teacher.detach()
    if problem == REGRESSION:
        return F.mse_loss(student.squeeze(-1), teacher.squeeze(-1))
    t = temperature
    if problem == MULTI_LABEL:
        return t * t * F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t))
    return t * t * F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                            reduction="batchmean", log_target=True)  # fmt: skip


def layer_weighted_loss(
    problem: str, all_logits: torch.Tensor, labels: torch.Tensor, weight: float = 0.0, temperature: float = 1.0
) -> torch.Tensor:
    """Σ_i i·loss_i / Σ_i i over layers i = 1..L, as in the paper: deeper classifiers count more.

    With a distillation `weight` α > 0, an internal classifier's loss_i is (1 − α)·its label loss + α·its
    `distillation_loss` to the last layer's prediction; the last layer learns from the labels alone. α = 0 is
    the paper's loss exactly.
    """
    num_layers = all_logits.shape[1]
    teacher = all_logits[:, -1].detach()
    total, weights = 0.0, 0
    for layer in range(num_layers):
        logits = all_logits[:, layer]
        loss = label_loss(problem, logits, labels)
        if weight and layer < num_layers - 1:
            loss = (1 - weight) * loss + weight * distillation_loss(problem, logits, teacher, temperature)
        total = total + (layer + 1) * loss
        weights += layer + 1
    return total / weights
