"""Training the exits of a model made from a user's classifier (`PabeeForSequenceClassification.from_classifier`).

The backbone and the classifier's own head stay frozen, so what every internal exit reads (its layer's pooled state)
and what it learns from (the classifier's final logits, softened: its own answers are the target, so the exits
learn to agree with the model the user trusts) never change during training. One pass without gradients caches
them (`cache_exit_inputs`); the exits, one linear layer each, then train on that cache alone with `Trainer`
(`train_exits`): seconds where the pass over the texts takes minutes, and nothing of the model moves but the exits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from .checkpoints import CheckpointMarker
from .losses import distillation_loss, label_loss
from .modeling import PabeeForSequenceClassification

__all__ = ["ExitCache", "ExitLoss", "cache_exit_inputs", "train_exits"]

Example = tuple[str, str | None]  # a text and its pair


@dataclass
class ExitCache:
    """What the exits train on: each text's pooled state at every internal layer `(N, L-1, H)`, the classifier's
    final logits `(N, C)` and the labels `(N,)` when the texts have them."""

    states: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor | None = None

    def save(self, path: Path) -> None:
        """Written beside a training run, so a resumed run skips the pass over the texts (atomically: a partial
        cache is never read)."""
        tensors = {"states": self.states.contiguous(), "teacher": self.teacher.contiguous()}
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial))
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> ExitCache:
        tensors = load_file(str(path))
        return cls(tensors["states"], tensors["teacher"], tensors.get("labels"))

    def __len__(self) -> int:
        return len(self.teacher)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"states": self.states[index], "teacher": self.teacher[index]}
        if self.labels is not None:
            item["labels"] = self.labels[index]
        return item


@torch.no_grad()
def cache_exit_inputs(
    model: PabeeForSequenceClassification,
    tokenizer,
    examples: Sequence[Example],
    labels: Sequence[int | float] | None = None,
    batch_size: int = 64,
    max_length: int = 128,
    progress: bool = True,
) -> ExitCache:
    """One pass of the frozen model over `examples` (sorted by length, so little padding is computed), keeping each
    internal layer's pooled state and the final logits. The classifier's own head answers the last layer, so the
    targets are exactly what the user's model says."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]) + len(examples[i][1] or ""))
    states = torch.empty(len(examples), model.num_layers - 1, model.config.encoder_config.hidden_size)
    teacher = torch.empty(len(examples), model.config.num_labels)
    for start in tqdm(range(0, len(order), batch_size), desc="states", unit="batch", disable=not progress):
        rows = order[start : start + batch_size]
        texts = [examples[i][0] for i in rows]
        pairs = [examples[i][1] for i in rows]
        batch = tokenizer(
            texts,
            pairs if any(pair is not None for pair in pairs) else None,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        per_layer, pooled = model.every_layer(dict(batch))
        states[rows] = torch.stack(pooled[:-1], dim=1).float()
        teacher[rows] = per_layer[-1].float()
    dtype = torch.float32 if model.config.is_regression else torch.long
    return ExitCache(states, teacher, None if labels is None else torch.as_tensor(list(labels), dtype=dtype))


class ExitLoss(nn.Module):
    """The exits as `Trainer` trains them: every internal exit's distance to the classifier's softened answer
    (`distillation_loss` at `temperature`) plus `label_weight` × its label loss where labels exist, averaged over
    the exits. The exits are the model's own `classifiers` (shared, not copied), so training moves them in place."""

    def __init__(self, model: PabeeForSequenceClassification, temperature: float = 2.0, label_weight: float = 0.5):
        super().__init__()
        self.classifiers = model.classifiers
        self.dropout = model.dropout
        self.problem = model.config.problem
        self.temperature = temperature
        self.label_weight = label_weight

    def forward(
        self, states: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        losses, logits = [], []
        for layer, classifier in enumerate(self.classifiers):
            out = classifier(self.dropout(states[:, layer]))  # (B, C)
            loss = distillation_loss(self.problem, out, teacher, self.temperature)
            if labels is not None and self.label_weight:
                loss = loss + self.label_weight * label_loss(self.problem, out, labels)
            losses.append(loss)
            logits.append(out)
        return {"loss": torch.stack(losses).mean(), "logits": torch.stack(logits, dim=1)}


def train_exits(
    model: PabeeForSequenceClassification,
    cache: ExitCache,
    training_args: TrainingArguments,
    temperature: float = 2.0,
    label_weight: float = 0.5,
    resume_from_checkpoint: str | None = None,
) -> dict[str, float]:
    """Train the internal exits on `cache` with `Trainer` (its progress bar, checkpoints and resume); everything
    else in the model is frozen. Returns Trainer's training metrics."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for parameter in model.classifiers.parameters():
        parameter.requires_grad_(True)
    trainer = Trainer(
        model=ExitLoss(model, temperature, label_weight),
        args=training_args,
        train_dataset=cache,
        callbacks=[CheckpointMarker()],
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    model.eval()
    return result.metrics
