"""The training loss: every layer's classifier learns from the labels, deeper ones counting more, and optionally
from the last layer's own prediction (self-distillation), which makes the early layers agree with it sooner.

Early exit is only as fast as layers 1..k are good: an internal classifier that learns the final classifier's
softened distribution, not just the hard label, gets more signal per example (FastBERT, BERxiT, LeeBERT).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .rules import MULTI_LABEL, REGRESSION

__all__ = ["check_distillation", "distillation_loss", "label_loss", "layer_weighted_loss", "paper_layer_weights"]


def check_distillation(weight: float, temperature: float) -> None:
    """`ValueError` unless 0 <= `weight` <= 1 and `temperature` > 0."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation_weight={weight!r} is invalid: use a number from 0 (labels only) to 1.")
    if not temperature > 0.0:
        raise ValueError(f"distillation_temperature={temperature!r} is invalid: use a number > 0.")


def label_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """One classifier's loss against the labels: MSE (regression), BCE (multi-label) or cross-entropy; the batch
    mean, or with `per_example` one value per example `(B,)` whose mean is that (for per-example weights)."""
    reduction = "none" if per_example else "mean"
    if problem == REGRESSION:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1), reduction=reduction)
    if problem == MULTI_LABEL:
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction=reduction)
        return loss.mean(-1) if per_example else loss
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction=reduction)


def distillation_loss(
    problem: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, per_example: bool = False
) -> torch.Tensor:
    """How far one classifier is from the teacher's (detached) prediction; the batch mean, or `(B,)` with
    `per_example`.

    Classification: KL divergence of the softened distributions (softmax, or per-label sigmoids) at
    `temperature`, times temperature² so its gradients keep their size as the temperature changes (Hinton et al.).
    Regression: the squared difference to the teacher's value.
    """
    teacher = teacher.detach()
    reduction = "none" if per_example else "mean"
    if problem == REGRESSION:
        return F.mse_loss(student.squeeze(-1), teacher.squeeze(-1), reduction=reduction)
    t = temperature
    if problem == MULTI_LABEL:
        loss = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t), reduction=reduction)
        return t * t * (loss.mean(-1) if per_example else loss)
    student, teacher = F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1)
    if per_example:
        return t * t * F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)
    return t * t * F.kl_div(student, teacher, reduction="batchmean", log_target=True)


def paper_layer_weights(num_layers: int) -> list[float]:
    """The paper's weight of each layer's loss: layer i counts i times (normalised in `layer_weighted_loss`)."""
    return [float(layer) for layer in range(1, num_layers + 1)]


def layer_weighted_loss(
    problem: str,
    all_logits: torch.Tensor,
    labels: torch.Tensor,
    weight: float = 0.0,
    temperature: float = 1.0,
    layer_weights: list[float] | None = None,
    example_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ_i i·loss_i / Σ_i i over layers i = 1..L, as in the paper: deeper classifiers count more.

    With a distillation `weight` α > 0, an internal classifier's loss_i is (1 − α)·its label loss + α·its
    `distillation_loss` to the last layer's prediction; the last layer learns from the labels alone. α = 0 is
    the paper's loss exactly.

    `layer_weights` replace the i (default `paper_layer_weights`); a layer weighted 0 is left out of the graph, so
    its classifier gets no gradient at all (`pabee.recipes`' two stages). `example_weights` `(B, L)` make loss_i
    the mean over examples b of w_bi·loss_bi instead of the plain mean (`pabee.recipes.exit_example_weights`).
    """
    num_layers = all_logits.shape[1]
    layer_weights = paper_layer_weights(num_layers) if layer_weights is None else layer_weights
    per_example = example_weights is not None
    teacher = all_logits[:, -1].detach()
    total, weights = 0.0, 0.0
    for layer, layer_weight in enumerate(layer_weights):
        if not layer_weight:
            continue
        logits = all_logits[:, layer]
        loss = label_loss(problem, logits, labels, per_example)
        if weight and layer < num_layers - 1:
            distance = distillation_loss(problem, logits, teacher, temperature, per_example)
            loss = (1 - weight) * loss + weight * distance
        if per_example:
            loss = (example_weights[:, layer] * loss).mean()
        total = total + layer_weight * loss
        weights += layer_weight
    return total / weights
