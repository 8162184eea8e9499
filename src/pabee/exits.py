"""Exit criteria: when may an example stop climbing the encoder?

A criterion is a frozen description (e.g. "patience 3"); for each forward pass it hands out a fresh tracker that
holds the per-example state as tensors. The same tracker drives real early-exit inference (where rows that exit
are dropped with `keep`) and the one-pass sweep over precomputed logits (`sweep_exit_layers`), so the two cannot
disagree about the rule. No model code lives here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .configuration import check_patience, check_regression_threshold


class ExitTracker(ABC):
    """Per-example exit state for one batch during one forward pass."""

    @abstractmethod
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """Feed one layer's logits `[rows, num_labels]` for the rows still running; return a bool `[rows]` that
        is True where the row may exit at this layer."""

    @abstractmethod
    def keep(self, rows: torch.Tensor) -> None:
        """Forget the rows that left the batch; `rows` is a bool mask over the current rows."""


class ExitCriterion(ABC):
    """A rule deciding, layer by layer, which examples have seen enough."""

    @abstractmethod
    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        """Fresh per-example state for a batch of `batch_size` examples."""

    def can_exit_early(self, num_layers: int) -> bool:
        """False when no example can leave before the last layer, so the model may skip the early heads."""
        return True


@dataclass(frozen=True)
class PatienceCriterion(ExitCriterion):
    """PABEE: exit once `patience` consecutive layers agree with the layer before them.

    Layer *i* agrees with layer *i-1* when their predicted labels are equal (classification) or when their
    outputs differ by less than `regression_threshold` (regression). An example therefore exits at layer
    `patience + 1` at the earliest; `patience == 0` never exits early (the full model).
    """

    patience: int
    regression: bool = False
    regression_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_patience(self.patience)
        check_regression_threshold(self.regression_threshold)

    def can_exit_early(self, num_layers: int) -> bool:
        # The counter reaches `patience` at layer `patience + 1` at the earliest.
        return 0 < self.patience < num_layers - 1

    def tracker(self, batch_size: int, device: torch.device | str) -> _PatienceTracker:
        return _PatienceTracker(self, torch.zeros(batch_size, dtype=torch.long, device=device))


class _PatienceTracker(ExitTracker):
    def __init__(self, criterion: PatienceCriterion, counter: torch.Tensor) -> None:
        self.criterion = criterion
        self.counter = counter
        self.previous: torch.Tensor | None = None

    def update(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.criterion
        prediction = logits.squeeze(-1) if c.regression else logits.argmax(dim=-1)
        if self.previous is None:
            agree = torch.zeros_like(self.counter, dtype=torch.bool)
        elif c.regression:
            agree = (prediction - self.previous).abs() < c.regression_threshold
        else:
            agree = prediction == self.previous
        self.counter = torch.where(agree, self.counter + 1, torch.zeros_like(self.counter))
        self.previous = prediction
        if c.patience == 0:
            return torch.zeros_like(agree)
        return self.counter >= c.patience

    def keep(self, rows: torch.Tensor) -> None:
        self.counter = self.counter[rows]
        if self.previous is not None:
            self.previous = self.previous[rows]


def sweep_exit_layers(criterion: ExitCriterion, all_logits: torch.Tensor) -> torch.Tensor:
    """Apply `criterion` to every layer's logits `[batch, layers, num_labels]` computed in one full pass.

    Returns the 1-based exit layer of each example, exactly the layer real early-exit inference stops at;
    examples the rule never releases exit at the last layer.
    """
    batch_size, num_layers, _ = all_logits.shape
    tracker = criterion.tracker(batch_size, all_logits.device)
    exit_layers = torch.full((batch_size,), num_layers, dtype=torch.long, device=all_logits.device)
    running = torch.ones(batch_size, dtype=torch.bool, device=all_logits.device)
    for layer in range(num_layers - 1):
        leaving = tracker.update(all_logits[:, layer]) & running
        exit_layers[leaving] = layer + 1
        running &= ~leaving
    return exit_layers


def logits_at_exit(all_logits: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """Pick each example's logits `[batch, num_labels]` at its 1-based exit layer."""
    rows = torch.arange(all_logits.shape[0], device=all_logits.device)
    return all_logits[rows, exit_layers - 1]
