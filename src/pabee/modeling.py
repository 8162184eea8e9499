"""The generic early-exit engine: any encoder with an adapter, one classifier per layer, batched per-example exit.

Whatever runs the layers (this torch model, or ONNX Runtime sessions in `pabee.onnx_model`) is a `Runtime`: it
embeds, builds the layers' attention mask and runs one layer with its exit head. `infer` is the one function that
turns a batch and an exit setting into answers for any runtime (every layer, the plain forward to a fixed layer,
or the early-exit loop `early_exit`); the torch `forward` and the pipeline both call it. Training (a `forward`
with `labels`) runs its own pass over every layer, `every_layer`: the loss needs the pooled states too, and
routes gradients (`pabee.recipes`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, can_return_tuple

from .backbones import EncoderAdapter, adapter_for, profiler_label
from .configuration import POOLINGS, PabeeConfig
from .losses import layer_weighted_loss
from .pretrained import bundled_model_path, load_classifier, sentence_transformers_pooling
from .recipes import HEADS_STAGE, alignment_loss, equilibrium, exit_example_weights, stage_layer_weights
from .rules import Array, ExitCriterion, ExitTracker, build_criterion, logits_at_exit, sweep_exit_layers
from .settings import ExitSpec, check_patience, exit_spec_from

if TYPE_CHECKING:
    from .call_plan import CallPlan

__all__ = [
    "PabeeForSequenceClassification",
    "PabeeOutput",
    "InferOutput",
    "PabeePreTrainedModel",
    "Runtime",
    "early_exit",
    "infer",
]


@dataclass
class PabeeOutput(ModelOutput):
    """Output of [`PabeeForSequenceClassification`].

    Args:
        loss: the layer-weighted training loss, when `labels` are given.
        logits: `[batch, num_labels]`, each example's answer at the layer where it exited.
        all_logits: `[batch, layers, num_labels]`, every layer's logits; only when all layers were computed
            (training, `labels` given, or `output_all_logits=True`).
        exit_layers: `LongTensor [batch]`, the 1-based layer each example answered from.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    all_logits: torch.Tensor | None = None
    exit_layers: torch.Tensor | None = None


@dataclass(slots=True)
class InferOutput:
    """What `infer` returns: `PabeeOutput`'s fields without the loss, as a plain (cheap) dataclass."""

    logits: torch.Tensor
    exit_layers: torch.Tensor
    all_logits: torch.Tensor | None = None


class PabeePreTrainedModel(PreTrainedModel):
    config_class = PabeeConfig
    config: PabeeConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # The loss is a mean over the batch; Trainer must scale it for gradient accumulation itself.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder initialises its own modules (transformers dispatches sub-models to their `_init_weights`);
        # here only the classifiers are ours, drawn with the encoder's scale.
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config.encoder_config, "initializer_range", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class PabeeForSequenceClassification(PabeePreTrainedModel):
    """A pretrained encoder with a classifier after every layer and patience-based early exit.

    In training (or whenever `labels` are passed) every layer runs and the loss is the average of the layer
    losses weighted by layer number, with the config's exit-aware recipes (`pabee.recipes`). In eval mode without
    labels each example climbs the encoder until its exit rule fires; examples that have exited leave the batch,
    so their remaining layers are never computed.

    Example:
        >>> model = PabeeForSequenceClassification.from_backbone(pabee.bundled_model_path(), patience=2)
        >>> model.eval()
        >>> out = model(**tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt"))
        >>> out.logits.shape, out.exit_layers
    """

    def __init__(self, config: PabeeConfig) -> None:
        super().__init__(config)
        enc_config = config.encoder_config
        self.adapter: EncoderAdapter = adapter_for(enc_config.model_type)
        if config.pooling == "pooler" and not self.adapter.pooler_available:
            raise ValueError(
                f"pooling='pooler' needs a pooler and {enc_config.model_type!r} has none; use 'cls' or 'mean'."
            )
        own_head = config.original_head
        with_pooler = config.pooling == "pooler" or (own_head and self.adapter.head_uses_pooler)
        self.encoder = AutoModel.from_config(enc_config, **self.adapter.build_kwargs(with_pooler))
        self.dropout = nn.Dropout(config.dropout_prob)
        self._num_layers = enc_config.num_hidden_layers  # read on the hot path: an attribute, not the config
        # One classifier per layer; with `original_head` the last layer's is the classifier's own `head` instead.
        self.classifiers = nn.ModuleList(
            nn.Linear(enc_config.hidden_size, config.num_labels) for _ in range(self._num_layers - own_head)
        )
        self.head: nn.ModuleDict | None = self.adapter.build_head(_head_config(config)) if own_head else None
        # Two stages (`config.two_stage`): which one this step trains, set by `pabee.recipes.TwoStageCallback`;
        # None is one joint stage (the paper's loss over every layer).
        self.training_stage: int | None = None
        self._mean_weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (mask, weights): see `pool`
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | Path | None = None,
        num_labels: int = 2,
        patience: int = 6,
        regression_threshold: float = 0.1,
        pooling: str | None = None,
        exit_criterion: str = "patience",
        exit_threshold: float | None = None,
        max_exit_layer: int | None = None,
        **config_kwargs: Any,
    ) -> PabeeForSequenceClassification:
        """Pretrained encoder weights with fresh, randomly initialised internal classifiers.

        Args:
            name_or_path: a Hugging Face encoder checkpoint (folder or hub id); `None` is the bundled MiniLM.
            num_labels: number of classes; 1 means regression.
            patience: default patience for inference (0 = full model).
            regression_threshold: agreement threshold for regression.
            pooling: `"pooler"`, `"cls"`, `"mean"`, or `None` to pick: the pooling a sentence-transformers
                checkpoint was trained with if it says so (`"cls"` for regression on such a checkpoint), else the
                encoder's own pooler (or `[CLS]` if it has none).
            exit_criterion: default exit rule: `"patience"`, `"entropy"`, `"confidence"`, `"patience+confidence"`
                or `"static"` (see `pabee.settings`).
            exit_threshold: the rule's threshold (for `"static"`, the layer k); `None` is the rule's default.
            max_exit_layer: cap on the layers any example may use; `None` for no cap.
            config_kwargs: further `PabeeConfig` fields (`id2label`, `label2id`, `classifier_dropout`,
                `problem_type="multi_label_classification"`, ...).
        """
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r} is invalid: a classifier needs at least 1 label.")
        check_patience(patience)
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; choose one of {', '.join(POOLINGS)} or None.")
        name_or_path = bundled_model_path() if name_or_path is None else name_or_path
        encoder = AutoModel.from_pretrained(str(name_or_path))
        keywords = {"patience": patience, "exit_criterion": exit_criterion, "exit_threshold": exit_threshold,
                    "max_exit_layer": max_exit_layer}  # fmt: skip
        config = PabeeConfig(
            encoder_config=encoder.config,
            num_labels=num_labels,
            regression_threshold=regression_threshold,
            pooling=pooling or "cls",  # resolved below once the config knows the problem type
            **exit_spec_from(keywords).keywords(),
            **config_kwargs,
        )
        pooling = pooling or _default_pooling(name_or_path, encoder, config.is_regression)
        config.pooling = pooling
        config.name_or_path = str(name_or_path)
        config.pad_token_id = getattr(encoder.config, "pad_token_id", None)
        model = cls(config)
        weights = encoder.state_dict()
        if pooling != "pooler":  # the pooler is only built when it is used
            weights = {k: v for k, v in weights.items() if not k.startswith("pooler.")}
        missing, unexpected = model.encoder.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.startswith("pooler.")]:
            raise RuntimeError(f"Encoder weights did not fit: missing {missing}, unexpected {unexpected}.")
        return model

    @classmethod
    def from_classifier(cls, name_or_path: str | Path, pooling: str = "mean", **config_kwargs: Any):
        """A fine-tuned Hugging Face sequence classifier with an exit after every layer but the last, which stays
        the classifier's own head: at full depth this model answers exactly as the classifier did.

        The new exits start untrained (`pabee.exit_training` trains them from the classifier's own answers; `pabee
        add-exits` does both) and the model answers with the full depth (patience 0) until a setting is chosen.

        Args:
            name_or_path: folder or hub id of a `*ForSequenceClassification` of a family pabee has an adapter for.
            pooling: what the internal exits read: `"mean"` (masked mean of the token states: on a frozen MiniLM,
                heads on the mean read layers 1-3 far better than on `[CLS]`), `"cls"` or `"pooler"`.
            config_kwargs: further `PabeeConfig` fields (an exit setting, `classifier_dropout`, ...).
        """
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not supported; choose one of {', '.join(POOLINGS)}.")
        original = load_classifier(name_or_path)
        source = original.config
        if pooling == "pooler" and not adapter_for(source.model_type).head_uses_pooler:
            raise ValueError(f"pooling='pooler': a {type(original).__name__} has no pooler; use 'mean' or 'cls'.")
        config = PabeeConfig(
            encoder_config=source,
            num_labels=source.num_labels,
            id2label=source.id2label,
            label2id=source.label2id,
            problem_type=source.problem_type,
            pooling=pooling,
            original_head=True,
            **{"patience": 0, **config_kwargs},
        )
        config.name_or_path = str(name_or_path)
        config.pad_token_id = getattr(source, "pad_token_id", None)
        model = cls(config)
        prefix = original.base_model_prefix + "."
        encoder = original.base_model.state_dict()
        head = {k: v for k, v in original.state_dict().items() if not k.startswith(prefix)}
        try:
            model.encoder.load_state_dict(encoder)
            model.head.load_state_dict(head)
        except RuntimeError as error:
            kind = type(original).__name__
            raise ValueError(
                f"{name_or_path}: the head of this {kind} is not the one its family has ({error})."
            ) from None
        return model.eval()

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        patience: int | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        max_exit_layer: int | None = None,
        exit_spec: ExitSpec | ExitCriterion | None = None,
        output_all_logits: bool | None = None,
    ) -> PabeeOutput:
        """Classify a batch.

        Args:
            exit_spec: the exit setting for this call (default: the config's `exit_spec`), or a ready rule (a
                benchmark's never-exit rule, say), used as it is.
            patience, exit_criterion, exit_threshold, max_exit_layer: the setting's fields as keywords, over
                `exit_spec` for this call (`pabee.settings.exit_spec_from`), as `generate` takes a config's.
            output_all_logits: run every layer and return `all_logits` (implied in training and with `labels`);
                `logits` and `exit_layers` are then read from those with the exit rule, as inference would give.
        """
        keywords = {"patience": patience, "exit_criterion": exit_criterion, "exit_threshold": exit_threshold,
                    "max_exit_layer": max_exit_layer}  # fmt: skip
        if isinstance(exit_spec, ExitCriterion):
            if any(value is not None for value in keywords.values()):
                raise ValueError("Exit keywords apply over an ExitSpec; a ready ExitCriterion is used as it is.")
            criterion = exit_spec
        else:
            criterion = build_criterion(exit_spec_from(keywords, exit_spec or self.config.exit_spec), self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "position_ids": position_ids,
            "inputs_embeds": inputs_embeds,
        }
        if labels is not None:
            return self._with_loss(_with_attention_mask(inputs), labels, criterion)
        out = infer(self, inputs, criterion, all_layers=self.training or bool(output_all_logits))
        return PabeeOutput(logits=out.logits, all_logits=out.all_logits, exit_layers=out.exit_layers)

    # --- the Runtime interface the engine drives -------------------------------------------------------------

    def native_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch as it is: this runtime's arrays are torch tensors."""
        return dict(inputs)

    def exit_in_one_call(self, inputs: Mapping[str, torch.Tensor], criterion: ExitCriterion) -> None:
        """None: torch climbs with the engine's loop (its layers are Python calls anyway)."""
        return None

    def prefix(
        self, inputs: Mapping[str, torch.Tensor | None], layers: int, heads: bool = True
    ) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
        """Embed and run the first `layers` layers (see `Runtime.prefix`); without `heads`, only the last layer's
        classifier runs."""
        attention_mask = inputs["attention_mask"]
        self._mean_weights = None  # a new pass: its mask may be an old tensor refilled
        with profiler_label("pabee.embeddings"):
            hidden = self.embed(inputs)  # (B, T, H)
        with profiler_label("pabee.attention_masks"):
            mask = self.layer_mask(hidden, attention_mask)
        per_layer = []
        for layer in range(layers):
            hidden, logits = self.step(layer, hidden, mask, attention_mask, head=heads or layer == layers - 1)
            if logits is not None:
                per_layer.append(logits)
        return hidden, mask, per_layer

    def climb(
        self, layer: int, count: int, hidden: torch.Tensor, mask: Any, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Layers `layer` .. `layer + count - 1` (0-based) with their classifiers (see `Runtime.climb`)."""
        per_layer = []
        for index in range(layer, layer + count):
            hidden, logits = self.step(index, hidden, mask, attention_mask)
            per_layer.append(logits)
        return hidden, per_layer

    def call_plan(self, criterion: ExitCriterion) -> None:
        """None: a torch layer is a Python call anyway, so grouping layers saves nothing; one layer a call."""
        return None

    def embed(self, inputs: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """Token ids (or `inputs_embeds`) → the hidden states `(B, T, H)` that enter layer 1."""
        return self.adapter.embed(
            self.encoder,
            inputs.get("input_ids"),
            inputs.get("token_type_ids"),
            inputs.get("position_ids"),
            inputs.get("inputs_embeds"),
            inputs["attention_mask"],
        )

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What every classifier reads from hidden states `(B, T, H)`: `(B, H)` by the config's pooling."""
        pooling = self.config.pooling
        if pooling == "pooler":
            return self.adapter.pool(self.encoder, hidden)
        if pooling == "cls":
            return hidden[:, 0]
        if torch.jit.is_tracing():  # an export: every segment of the graph pools from the mask on its own
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.bmm(self._mean_weights_of(attention_mask, hidden.dtype), hidden).squeeze(1)

    def _mean_weights_of(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`(B, 1, T)`: each token's share of its row's mean (0 on padding), so mean pooling is one product.

        Every head of a pass reads the same mask, so its weights are kept with it (one tuple, read whole by any
        thread) until the next pass (`prefix` forgets them): a head then costs two operations instead of seven,
        at batch size 1 most of its time."""
        memo = self._mean_weights
        if memo is not None and memo[0] is attention_mask and memo[1].dtype == dtype:
            return memo[1]
        weights = attention_mask.to(dtype)
        weights = (weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)).unsqueeze(1)
        self._mean_weights = (attention_mask, weights)
        return weights

    def classify(self, layer: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Classifier `layer` (0-based) on hidden states `(B, T, H)` of that layer → logits `(B, C)`."""
        if self.head is not None and layer == self._num_layers - 1:
            return self.adapter.run_head(self.encoder, self.head, hidden)  # the classifier's own head
        return self.classifiers[layer](self.dropout(self.pool(hidden, attention_mask)))  # (B, C)

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        """The attention mask every layer of this batch takes."""
        return self.adapter.layer_mask(self.encoder, hidden, attention_mask)

    def step(
        self, layer: int, hidden: torch.Tensor, mask: Any, attention_mask: torch.Tensor, head: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer `layer` (0-based) and, with `head`, its classifier: `(B, T, H)` in → `(B, T, H)` and logits
        `(B, C)` out (None without `head`: the plain forward skips the heads it does not answer from)."""
        with profiler_label("pabee.layers"):
            hidden = self.adapter.run_layer(self.encoder, layer, hidden, mask)
        if not head:
            return hidden, None
        with profiler_label("pabee.classifiers"):
            return hidden, self.classify(layer, hidden, attention_mask)

    # --- training: every layer, and the loss ---------------------------------------------------------------------

    @property
    def stage(self) -> int | None:
        """The training stage in force: `training_stage` when the config trains in two stages, else None."""
        return self.training_stage if self.config.two_stage else None

    def _with_loss(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, criterion: ExitCriterion
    ) -> PabeeOutput:
        """Every layer, as `infer(all_layers=True)` reads them, plus the loss; `logits` and `exit_layers` read off
        the detached `all_logits` with the exit rule."""
        per_layer, pooled = self.every_layer(inputs)
        all_logits = torch.stack(per_layer, dim=1)  # (B, L, C)
        exit_layers = sweep_exit_layers(criterion, all_logits.detach())
        loss = self._loss(per_layer, pooled, exit_layers, labels)
        logits = logits_at_exit(all_logits, exit_layers)
        return PabeeOutput(loss=loss, logits=logits, all_logits=all_logits, exit_layers=exit_layers)

    def every_layer(self, inputs: Mapping[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The loss pass (and the exits' cache, `pabee.exit_training`): every layer with its classifier, giving each
        layer's logits `(B, C)` and the pooled state `(B, H)` its classifier read (the alignment term's input). The
        same computations in the same order as `prefix`, so dropout draws alike; in training, gradient equilibrium
        routes the gradient between layers, and in two stages' second the backbone runs without gradients (frozen:
        its weights get none, and Adam's momentum cannot move them)."""
        attention_mask, num_layers = inputs["attention_mask"], self.num_layers
        balance = self.training and self.config.gradient_equilibrium
        backbone = torch.no_grad() if self.stage == HEADS_STAGE else nullcontext()
        logits, pooled = [], []
        with backbone:
            hidden = self.embed(inputs)
            mask = self.layer_mask(hidden, attention_mask)
        for layer in range(num_layers):
            with backbone:
                hidden = self.adapter.run_layer(self.encoder, layer, hidden, mask)
                read, onward = equilibrium(hidden, layer, num_layers) if balance else (hidden, hidden)
                state = self.pool(read, attention_mask)
            pooled.append(state)
            if self.head is not None and layer == num_layers - 1:
                logits.append(self.adapter.run_head(self.encoder, self.head, read))
            else:
                logits.append(self.classifiers[layer](self.dropout(state)))
            hidden = onward
        return logits, pooled

    def _loss(
        self,
        per_layer: list[torch.Tensor],
        pooled: list[torch.Tensor],
        exit_layers: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """The paper's layer-weighted loss with self-distillation and the exit-aware recipes the config sets."""
        config, num_layers = self.config, self.num_layers
        layer_weights = stage_layer_weights(self.stage, num_layers)
        # A layer the loss leaves out is detached: through the stack its classifier would get a zero gradient, not
        # none, and Adam (momentum, weight decay) would still move it.
        all_logits = torch.stack([x if w else x.detach() for x, w in zip(per_layer, layer_weights, strict=True)], 1)
        example_weights = None
        if config.sample_weighting_temperature:
            example_weights = exit_example_weights(exit_layers, num_layers, config.sample_weighting_temperature)
        loss = layer_weighted_loss(
            config.problem,
            all_logits,
            labels,
            config.distillation_weight,
            config.distillation_temperature,
            layer_weights=layer_weights,
            example_weights=example_weights,
        )
        if config.alignment_weight:
            loss = loss + config.alignment_weight * alignment_loss(torch.stack(pooled, dim=1))
        return loss


class Runtime(Protocol):
    """What the engine needs from whatever runs the layers: this torch model, or ONNX Runtime sessions
    (`pabee.onnx_model`). Between the layers, hidden states and masks stay in the runtime's own arrays (torch
    tensors here, numpy for ONNX Runtime), so a runtime never converts inside the loop; the engine's own
    bookkeeping is numpy, and `infer` answers in torch tensors."""

    config: PabeeConfig

    @property
    def num_layers(self) -> int: ...

    def native_inputs(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Array]:
        """The batch (`input_ids`, `attention_mask`, ...) as this runtime's arrays, converted once."""

    def prefix(self, inputs: Mapping[str, Array], layers: int, heads: bool = True) -> tuple[Array, Any, list[Array]]:
        """Embed the batch and run the first `layers` layers for every row: the hidden states `(B, T, H)` after
        them, the layer mask the later layers take, and each of those layers' logits `(B, C)` (with
        `heads=False`, the last layer's alone). Every row runs these layers, so a runtime may run them in one
        call."""

    def layer_mask(self, hidden: Array, attention_mask: Array) -> Any:
        """The layer mask for a batch whose rows or columns changed (after compaction); passed to `climb` as is."""

    def climb(
        self, layer: int, count: int, hidden: Array, mask: Any, attention_mask: Array
    ) -> tuple[Array, list[Array]]:
        """Layers `layer` .. `layer + count - 1` (0-based) and their exit heads: the hidden states after them and
        each layer's logits `(B, C)`."""

    def call_plan(self, criterion: ExitCriterion) -> CallPlan | None:
        """For one sentence, how many layers each `climb` runs (`pabee.call_plan`); None: one layer a call."""

    def exit_in_one_call(self, inputs: Mapping[str, Array], criterion: ExitCriterion) -> tuple[Array, Array] | None:
        """The whole climb in one call where the runtime can (logits `(B, C)`, exit layers `(B,)`), or None: the
        engine's loop climbs. ONNX Runtime answers one sentence under a logit rule so (`pabee.onnx_exit_graph`)."""


def infer(
    runtime: Runtime,
    inputs: Mapping[str, torch.Tensor | None],
    setting: ExitSpec | ExitCriterion | None = None,
    *,
    all_layers: bool = False,
) -> InferOutput:
    """Classify a batch on any runtime with an exit setting (default: the runtime config's own).

    The one dispatch: with `all_layers`, every layer runs and `all_logits` `(B, L, C)` comes back, `logits` and
    `exit_layers` read off them with the exit rule (the one-pass sweep; a training forward without labels); a rule
    under which no example can leave early (patience 0, `static`) runs the plain forward to its layer in one
    `prefix`, without the early heads; every other rule climbs with `early_exit`. Right padding no row needs is
    cut first.
    """
    config = runtime.config
    criterion = setting if isinstance(setting, ExitCriterion) else build_criterion(setting or config.exit_spec, config)
    inputs = runtime.native_inputs(_with_attention_mask(inputs))
    num_layers = runtime.num_layers
    if all_layers:
        all_logits = torch.stack([_tensor(x) for x in runtime.prefix(inputs, num_layers)[2]], dim=1)  # (B, L, C)
        exit_layers = sweep_exit_layers(criterion, all_logits.detach())
        return InferOutput(logits_at_exit(all_logits, exit_layers), exit_layers, all_logits)
    right_padded = _is_right_padded(inputs["attention_mask"])
    if right_padded:
        inputs = _trim_inputs(inputs)
    if not criterion.can_exit_early(num_layers):
        limit = criterion.exit_limit(num_layers)
        logits = _tensor(runtime.prefix(inputs, limit, heads=False)[2][-1])
        return InferOutput(logits, torch.full((logits.shape[0],), limit, dtype=torch.long, device=logits.device))
    answered = runtime.exit_in_one_call(inputs, criterion)
    if answered is not None:
        return InferOutput(_tensor(answered[0]), _tensor(answered[1]))
    return InferOutput(*early_exit(runtime, inputs, criterion, right_padded))


def early_exit(
    runtime: Runtime, inputs: Mapping[str, Array], criterion: ExitCriterion, right_padded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Climb the layers; rows that exit are written out and removed from the batch.

    The one exit loop, whatever runs the layers (`inputs` in the runtime's arrays, `Runtime.native_inputs`). The
    layers before the rule's `earliest_exit` run for every row in one `prefix` (their logits still feed the rule);
    then one `climb` per layer, or, for one sentence, the calls of the runtime's `call_plan` (several layers in one
    call where that is expected to be cheaper). The rule reads every layer's logits in order either way, so a
    row's exit layer and answer do not depend on how the layers were grouped. The loop's own state (rows still
    running, exit layers, the rule's counters) is numpy: at batch size 1 a torch operation costs several times a
    numpy one. Its parts carry `torch.profiler.record_function` labels (`pabee.*`), which `pabee bench
    --profile` reads.

    Returns:
        logits `(B, C)` at each row's exit layer and the 1-based exit layers `(B,)`, as torch tensors.
    """
    attention_mask = inputs["attention_mask"]
    batch_size = attention_mask.shape[0]
    limit = criterion.exit_limit(runtime.num_layers)
    first = criterion.earliest_exit(runtime.num_layers)
    plan = runtime.call_plan(criterion) if batch_size == 1 else None
    ends = plan.ends(first, limit) if plan is not None else range(first, limit + 1)
    exit_layers = np.full(batch_size, limit, dtype=np.int64)
    rows = np.arange(batch_size)  # original index of each row still running
    tracker = criterion.tracker(batch_size)
    logits_out, layer = None, 0
    for end in ends:
        if layer == 0:
            hidden, mask, per_layer = runtime.prefix(inputs, end)  # (B, T, H), per layer (B, C)
        else:
            hidden, per_layer = runtime.climb(layer, end - layer, hidden, mask, attention_mask)
        start, layer = layer, end
        with profiler_label("pabee.exit_bookkeeping"):
            leaving = tracker.update_layers(per_layer)  # (layers of this call, rows): one numpy pass
            if start + 1 < first:  # no row leaves before `first`; the rule still counted those layers
                leaving[: first - 1 - start] = False
            if end == limit:  # every row still running answers at the limit
                leaving[-1] = True
            if not leaving.any():
                continue
        with profiler_label("pabee.compaction"):
            logits_out, left = _write_out(leaving, per_layer, start + 1, rows, exit_layers, logits_out)
        if left.all():
            break
        running = _compact(runtime, tracker, ~left, rows, hidden, attention_mask, right_padded)
        rows, hidden, attention_mask, mask = running
    if plan is not None:
        plan.record(int(exit_layers[0]))
    logits_out = _tensor(logits_out)
    return logits_out, torch.from_numpy(exit_layers).to(logits_out.device)


def _write_out(
    leaving: np.ndarray, per_layer: list, first: int, rows: np.ndarray, exit_layers: np.ndarray, out: Array | None
) -> tuple[Array, np.ndarray]:
    """The rows that leave at a layer of one call (`leaving` `(layers, rows)`, the call's layers from `first`,
    1-based) written into the answers `out` `(B, C)`, made on first use, and into `exit_layers`; returns the
    answers and which of the call's rows left."""
    if out is None and leaving.shape[1] == 1:  # one sentence: it leaves at its first such layer
        k = int(leaving.argmax())
        exit_layers[:] = first + k
        return per_layer[k], leaving[k]
    at, left = leaving.argmax(axis=0), leaving.any(axis=0)  # each row's first layer to leave at, if any
    if out is None and left.all() and (at == at[0]).all():  # the whole batch leaves at one layer
        exit_layers[:] = first + at[0]
        return per_layer[at[0]], left
    if out is None:
        out = _empty_rows(per_layer[0], len(exit_layers))
    for k in np.unique(at[left]):
        here = left & (at == k)
        _put_rows(out, rows[here], _take_rows(per_layer[k], here))
        exit_layers[rows[here]] = first + k
    return out, left


def _compact(
    runtime: Runtime,
    tracker: ExitTracker,
    staying: np.ndarray,
    rows: np.ndarray,
    hidden: Array,
    attention_mask: Array,
    right_padded: bool,
) -> tuple[np.ndarray, Array, Array, Any]:
    """The running rows without those that left: their hidden states, attention mask, the rule's counters and the
    layers' mask."""
    with profiler_label("pabee.compaction"):
        rows, hidden, attention_mask = _drop_rows(staying, rows, hidden, attention_mask, right_padded)
    with profiler_label("pabee.exit_bookkeeping"):
        tracker.keep(staying)
    with profiler_label("pabee.attention_masks"):
        mask = runtime.layer_mask(hidden, attention_mask)
    return rows, hidden, attention_mask, mask


def _with_attention_mask(inputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """The model inputs that are set, with an all-ones attention mask where none was given."""
    inputs = {name: value for name, value in inputs.items() if value is not None}
    if "attention_mask" not in inputs:
        reference = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"]
        inputs["attention_mask"] = torch.ones(reference.shape[:2], dtype=torch.long, device=reference.device)
    return inputs


def _trim_inputs(inputs: dict[str, Array]) -> dict[str, Array]:
    """Right-padded inputs cut to the longest row: padding columns nobody needs are never computed."""
    length = _kept_length(inputs["attention_mask"])
    return inputs if length is None else {name: value[:, :length] for name, value in inputs.items()}


def _head_config(config: PabeeConfig) -> Any:
    """The encoder's config with this model's labels: what the family's classification head is built from."""
    head_config = copy.deepcopy(config.encoder_config)
    head_config.num_labels = config.num_labels
    return head_config


def _default_pooling(name_or_path: str | Path, encoder: PreTrainedModel, regression: bool) -> str:
    """`pooling=None`: for classification, what a sentence-transformers checkpoint was trained with; for
    regression on such a checkpoint, the raw `[CLS]` state, because mean pooling loses much of the score
    (reproduction v2 on MiniLM: STS-B Spearman 73.6 mean vs 85.0 cls, while for classification mean exits
    better at patience 2 and 3 on all four tasks tried); any other checkpoint, its own pooler (or `[CLS]`), as in
    the paper."""
    adapter = adapter_for(encoder.config.model_type)  # an encoder without adapter fails here, before building
    declared = sentence_transformers_pooling(name_or_path)
    if declared is not None:
        return "cls" if regression else declared
    return "pooler" if adapter.has_pooler(encoder) else "cls"


def _drop_rows(
    staying: np.ndarray, rows: np.ndarray, hidden: Array, attention_mask: Array, right_padded: bool
) -> tuple[np.ndarray, Array, Array]:
    """Compact the batch to the rows still running (and cut padding nobody needs any more)."""
    rows, attention_mask = rows[staying], _take_rows(attention_mask, staying)
    if right_padded:  # cut the columns before copying the rows
        hidden, attention_mask = _trim_padding(hidden, attention_mask)
    return rows, _take_rows(hidden, staying), attention_mask


def _take_rows(array: Array, keep: np.ndarray) -> Array:
    """`array[keep]` for a bool numpy mask. A CPU tensor is copied by numpy, single-threaded: torch's gather of a
    batch this size is a parallel region, whose threads then spin for a while after it, taking the cores from the
    runtime's next call."""
    if isinstance(array, np.ndarray):
        return array[keep]
    if array.device.type != "cpu" or array.requires_grad or array.dtype == torch.bfloat16:  # numpy has no bf16
        return array[torch.from_numpy(keep).to(array.device)]
    return torch.from_numpy(array.numpy()[keep])


def _empty_rows(like: Array, batch_size: int) -> Array:
    """Room for `batch_size` rows shaped and typed as `like`'s rows, in its kind of array."""
    if isinstance(like, np.ndarray):
        return np.empty((batch_size, *like.shape[1:]), dtype=like.dtype)
    return like.new_empty(batch_size, *like.shape[1:])


def _put_rows(out: Array, rows: np.ndarray, values: Array) -> None:
    """`out[rows] = values` for integer numpy `rows`."""
    if isinstance(out, np.ndarray):
        out[rows] = values
    else:
        out[torch.from_numpy(rows).to(out.device)] = values


def _tensor(array: Array) -> torch.Tensor:
    """A runtime's array as a torch tensor (numpy: shared memory, no copy)."""
    return torch.from_numpy(array) if isinstance(array, np.ndarray) else array


def _is_right_padded(attention_mask: Array) -> bool:
    """True when every row is ones followed by zeros, so trailing columns can be cut safely."""
    if attention_mask.all():  # no padding at all (one example, or equal lengths): one cheap check
        return True
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _trim_padding(hidden: Array, attention_mask: Array) -> tuple[Array, Array]:
    """Drop the padding columns beyond the longest remaining row (right padding only)."""
    length = _kept_length(attention_mask)
    return (hidden, attention_mask) if length is None else (hidden[:, :length], attention_mask[:, :length])


def _kept_length(attention_mask: Array) -> int | None:
    """The longest row of a right-padded mask, when the columns beyond it can be cut; None when some row fills
    the width (one cheap check first)."""
    if attention_mask[:, -1].any():
        return None
    return int(attention_mask.sum(-1).max())
