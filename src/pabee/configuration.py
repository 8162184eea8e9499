"""`PabeeConfig`: the encoder's own config plus the early-exit settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .losses import check_distillation
from .recipes import check_recipes, recipe_settings
from .rules import MULTI_LABEL, REGRESSION, SINGLE_LABEL, build_criterion
from .settings import EXIT_KEYWORDS, ExitSpec, exit_spec_from

__all__ = ["POOLINGS", "PabeeConfig"]

POOLINGS = ("pooler", "cls", "mean")


class PabeeConfig(PreTrainedConfig):
    """Configuration of a [`PabeeForSequenceClassification`].

    The encoder's config is kept whole as a sub-config (`encoder_config`), so any checkpoint's architecture
    round-trips through `config.json` unchanged, and the early-exit options sit beside it.

    Args:
        encoder_config: config of the wrapped encoder (a `PreTrainedConfig` or its dict; BERT if omitted).
        patience: layers in a row that must agree before an example exits; 0 runs the full model.
        regression_threshold: for regression (`num_labels == 1`), two layers "agree" when their outputs differ
            by less than this.
        exit_criterion: the exit rule: `"patience"` (PABEE), `"entropy"`, `"confidence"`,
            `"patience+confidence"` or `"static"` (see `pabee.settings`).
        exit_threshold: the rule's threshold (entropy in nats, top probability, or the layer k for `"static"`);
            `None` takes the rule's default. Unused by `"patience"`.
        max_exit_layer: no example uses more layers than this (bounds worst-case latency); `None`: no cap.
        pooling: what each internal classifier reads: `"pooler"` (the encoder's own pooler on `[CLS]`),
            `"cls"` (the raw `[CLS]` state) or `"mean"` (masked mean of the token states).
        classifier_dropout: dropout before every internal classifier; `None` takes the encoder's
            `classifier_dropout`, else its `hidden_dropout_prob`.
        distillation_weight: how much each internal classifier learns from the last layer's prediction rather
            than the labels during training (0: labels only, the paper's loss; see `pabee.losses`).
        distillation_temperature: the temperature of that softened prediction.
        alignment_weight: β of the alignment term, β × mean over internal layers of 1 − cos(their pooled state,
            the last layer's); 0: off (see `pabee.recipes`, like the three below).
        gradient_equilibrium: in training, each layer's gradient is the mean of the exit losses' above it, not
            their sum (ElasticBERT).
        two_stage: share of the training steps in stage 1 (backbone and last classifier), the rest training the
            internal classifiers on the frozen backbone (DeeBERT); 0: one joint stage.
        sample_weighting_temperature: τ > 0 weights each example's loss at layer i by how near i is to the layer
            it exits at (COSEE-style); 0: off.
        original_head: the last layer answers with the wrapped classifier's own head (its pooling and layers, as
            its family's `*ForSequenceClassification` has them), not a PABEE classifier: a `pabee add-exits`
            model, whose full depth answers exactly as the classifier it was made from; `pooling` is then what the
            internal exits read.
    """

    model_type = "pabee"
    keys_to_ignore_at_inference = ["logits", "exit_layers"]  # Trainer's predictions: `all_logits` alone
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: PreTrainedConfig | dict | None = None
    patience: int = 6
    regression_threshold: float = 0.1
    pooling: str = "pooler"
    classifier_dropout: float | None = None
    exit_criterion: str = "patience"
    exit_threshold: float | None = None
    max_exit_layer: int | None = None
    distillation_weight: float = 0.0
    distillation_temperature: float = 1.0
    alignment_weight: float = 0.0
    gradient_equilibrium: bool = False
    two_stage: float = 0.0
    sample_weighting_temperature: float = 0.0
    original_head: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_distillation(self.distillation_weight, self.distillation_temperature)
        check_recipes(**self.recipes)
        if self.two_stage and getattr(self.encoder_config, "num_hidden_layers", 2) < 2:
            raise ValueError(f"two_stage={self.two_stage!r} needs 2 layers or more: stage 2 trains the internal ones.")
        build_criterion(self.exit_spec, self)  # validates patience, thresholds, the cap and the fit to the problem
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; choose one of {', '.join(POOLINGS)}.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} is invalid: a classifier needs at least 1 label.")

    @property
    def recipes(self) -> dict[str, Any]:
        """The exit-aware training settings (`pabee.recipes`) by name; all off by default."""
        return recipe_settings(self)

    @property
    def num_hidden_layers(self) -> int:
        """Number of encoder layers, each with its own classifier (None before the encoder config is set)."""
        return getattr(self.encoder_config, "num_hidden_layers", None)

    @property
    def is_regression(self) -> bool:
        return self.problem_type == REGRESSION or (self.problem_type is None and self.num_labels == 1)

    @property
    def problem(self) -> str:
        """The problem type with HF's default resolved: regression for one label, else single-label."""
        if self.is_regression:
            return REGRESSION
        return MULTI_LABEL if self.problem_type == MULTI_LABEL else SINGLE_LABEL

    @property
    def exit_spec(self) -> ExitSpec:
        """The stored exit setting as one value; `config.json` keeps the four keywords as flat fields (the config
        is an edge users type settings at), so old folders load."""
        return exit_spec_from({name: getattr(self, name) for name in EXIT_KEYWORDS}, ExitSpec(patience=None))

    @exit_spec.setter
    def exit_spec(self, spec: ExitSpec) -> None:
        for name, value in spec.keywords().items():  # every field, unset ones too: nothing of the old one stays
            setattr(self, name, value)

    @property
    def dropout_prob(self) -> float:
        """Dropout before the classifiers, resolved as the docstring says."""
        if self.classifier_dropout is not None:
            return self.classifier_dropout
        enc = self.encoder_config
        inherited = getattr(enc, "classifier_dropout", None)
        if inherited is None:
            inherited = getattr(enc, "classifier_dropout_prob", None)
        return inherited if inherited is not None else getattr(enc, "hidden_dropout_prob", 0.1)
