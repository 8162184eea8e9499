"""Exit-aware training: four recipes beside the paper's loss, each off by default and recorded in the config.

The paper trains every classifier on every example with Σ_i i·loss_i / Σ_i i. Methods that train *for* exiting
make the early layers more usable (issue 26); these are the four `pabee run-glue` offers:

- **alignment** (LEAP-style): pull each internal layer's pooled state towards the last layer's (detached), so
  early classifiers read features like the one the last classifier reads: `alignment_loss`.
- **gradient equilibrium** (ElasticBERT, Liu et al. 2022, after Li et al. 2019's IMTA): the gradient a shared
  layer receives is the *mean* of the gradients of the exit losses above it, not their sum, so the many losses
  above a low layer do not drown its own: `equilibrium`.
- **two stages** (DeeBERT, Xin et al. 2020): the backbone and last classifier train alone first, then the
  internal classifiers on the frozen backbone: `stage_layer_weights`, `TwoStageCallback`.
- **sample weighting by exit** (COSEE-style, He et al. 2025): each classifier emphasises the examples that would
  exit near it: `exit_example_weights`.

The model applies them (`PabeeForSequenceClassification`'s loss pass); `check_recipes` validates a combination.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .losses import paper_layer_weights

__all__ = [
    "BACKBONE_STAGE",
    "RECIPE_FIELDS",
    "HEADS_STAGE",
    "TwoStageCallback",
    "alignment_loss",
    "check_recipes",
    "equilibrium",
    "exit_example_weights",
    "recipe_settings",
    "scale_gradient",
    "stage_at",
    "stage_layer_weights",
]

BACKBONE_STAGE, HEADS_STAGE = 1, 2  # two stages: the backbone with the last classifier, then the internal ones
# Their settings, as `PabeeConfig` records them and `run-glue` names its flags (`check_recipes`' keywords).
RECIPE_FIELDS = ("alignment_weight", "gradient_equilibrium", "two_stage", "sample_weighting_temperature")


def recipe_settings(holder: Any) -> dict[str, Any]:
    """The recipe settings an object holds as attributes of `RECIPE_FIELDS`' names (a config, parsed flags)."""
    return {name: getattr(holder, name) for name in RECIPE_FIELDS}


def check_recipes(
    alignment_weight: float, gradient_equilibrium: bool, two_stage: float, sample_weighting_temperature: float
) -> None:
    """`ValueError` naming the value unless each setting is valid (0 / False: off) and they combine.

    Two stages train the last classifier alone, then the internal ones on a frozen backbone: there is no shared
    layer left to align or balance in stage 2, and one exit loss in stage 1, so it combines with none of the
    others (self-distillation from the frozen last layer in stage 2 is fine).
    """
    if not alignment_weight >= 0.0:
        raise ValueError(f"alignment_weight={alignment_weight!r} is invalid: use a number >= 0 (0: off).")
    if not isinstance(gradient_equilibrium, bool):
        raise ValueError(f"gradient_equilibrium={gradient_equilibrium!r} is invalid: use true or false.")
    if not 0.0 <= two_stage < 1.0:
        raise ValueError(
            f"two_stage={two_stage!r} is invalid: use the share of training steps in stage 1, in (0, 1) (0: off)."
        )
    if not sample_weighting_temperature >= 0.0:
        raise ValueError(
            f"sample_weighting_temperature={sample_weighting_temperature!r} is invalid: use a number >= 0 (0: off)."
        )
    others = {
        "alignment_weight": alignment_weight,
        "gradient_equilibrium": gradient_equilibrium,
        "sample_weighting_temperature": sample_weighting_temperature,
    }
    used = [f"{name}={value!r}" for name, value in others.items() if value]
    if two_stage and used:
        raise ValueError(
            f"two_stage={two_stage!r} does not combine with {', '.join(used)}: stage 1 trains the last classifier "
            "alone and stage 2 a frozen backbone; use one or the other."
        )


# --- alignment -------------------------------------------------------------------------------------------------


def alignment_loss(pooled: torch.Tensor) -> torch.Tensor:
    """mean over examples b and internal layers i < L of 1 − cos(p_bi, sg(p_bL)), for pooled states `(B, L, H)`
    (what each classifier reads, before dropout); sg = detached, so the last layer is the target and is not
    pulled towards the early ones. Cosine, not MSE: the layers' states differ in scale, and the classifiers
    care about direction. 0 for a one-layer model."""
    if pooled.shape[1] < 2:
        return pooled.sum() * 0.0
    target = pooled[:, -1:].detach()  # (B, 1, H)
    return (1.0 - F.cosine_similarity(pooled[:, :-1], target, dim=-1)).mean()


# --- gradient equilibrium --------------------------------------------------------------------------------------


class _ScaleGradient(torch.autograd.Function):
    """The identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_gradient(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    """`tensor` unchanged, with the gradient flowing back through it multiplied by `scale`."""
    return _ScaleGradient.apply(tensor, scale)


def equilibrium(hidden: torch.Tensor, layer: int, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient equilibrium at the output h_k of layer k = `layer` + 1 (of L): what exit k reads, and what layer
    k + 1 reads. Both equal `hidden`; backward, with n_k = L − k + 1 exits at or above layer k,

        ∂/∂h_k = (1 / n_k) · (g_k + (n_k − 1) · g_above),

    g_k the gradient from exit k's loss term and g_above the gradient coming down from layer k + 1 (itself so
    rescaled). By induction ∂/∂h_k = (1 / n_k) · Σ_{j ≥ k} ∂ℓ_j/∂h_k: the mean of the n_k exit terms above
    h_k, each with the weight the loss gives it, where plain backprop sums them. This is ElasticBERT's code
    (its encoder scales the layer output by 1/(L − i) before the exit and by L − i − 1 after it, i 0-based).
    The exit heads' own parameters, and a pooler all heads share, get their usual gradients.
    """
    exits_above = num_layers - layer  # n_k
    shared = scale_gradient(hidden, 1.0 / exits_above)
    return shared, scale_gradient(shared, float(exits_above - 1))


# --- two stages ------------------------------------------------------------------------------------------------


def stage_layer_weights(stage: int | None, num_layers: int) -> list[float]:
    """Each layer's weight in the loss: stage 1 the last layer alone (1 for L, 0 below), stage 2 the internal
    layers as the paper weighs them (i for i < L, 0 for L); `None` (one joint stage) the paper's i for all."""
    weights = paper_layer_weights(num_layers)
    if stage == BACKBONE_STAGE:
        return [0.0] * (num_layers - 1) + [1.0]
    if stage == HEADS_STAGE:
        return weights[:-1] + [0.0]
    return weights


def stage_at(step: int, max_steps: int, share: float) -> int:
    """The stage of optimizer step `step` (0-based) when stage 1 takes `share` of `max_steps`: the switch is at
    round(share × max_steps), kept within [1, max_steps − 1] so that each stage gets a step when there are two."""
    switch = round(share * max_steps)
    if max_steps >= 2:
        switch = min(max(switch, 1), max_steps - 1)
    return BACKBONE_STAGE if step < switch else HEADS_STAGE


class TwoStageCallback(TrainerCallback):
    """Sets the model's `training_stage` before every optimizer step from the step number alone, so every torchrun
    process switches at the same step and a resumed run is in the stage its checkpoint was; back to `None` (the
    joint loss, e.g. for evaluation) when training ends."""

    def __init__(self, share: float) -> None:
        self.share = share

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        kwargs["model"].training_stage = stage_at(state.global_step, state.max_steps, self.share)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        kwargs["model"].training_stage = None
        return control


# --- sample weighting by exit ----------------------------------------------------------------------------------


def exit_example_weights(exit_layers: torch.Tensor, num_layers: int, temperature: float) -> torch.Tensor:
    """`(B, L)` loss weights w_bi = B · softmax over the batch b of (−|i − e_b| / τ), e_b the (1-based) layer
    example b exits at under the model's exit rule, read off the detached logits; τ = `temperature`.

    Each classifier i emphasises the examples that would exit at or near it; each column averages 1, so layer
    i's loss keeps its scale and the paper's layer weights still apply. τ → ∞ gives every example weight 1 (the
    paper's loss), as does a batch whose examples all exit at the same layer.
    """
    layers = torch.arange(1, num_layers + 1, device=exit_layers.device)
    distance = (layers[None, :] - exit_layers[:, None]).abs().float()  # (B, L)
    return exit_layers.shape[0] * torch.softmax(-distance / temperature, dim=0)
