"""`PabeeConfig`: the encoder's own config plus the early-exit settings."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .exits import MULTI_LABEL, REGRESSION, SINGLE_LABEL, ExitCriterion, make_criterion

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
            `"patience+confidence"` or `"static"` (see `pabee.exits`).
        exit_threshold: the rule's threshold (entropy in nats, top probability, or the layer k for `"static"`);
            `None` takes the rule's default. Unused by `"patience"`.
        max_exit_layer: no example uses more layers than this (bounds worst-case latency); `None`: no cap.
        pooling: what each internal classifier reads: `"pooler"` (the encoder's own pooler on `[CLS]`),
            `"cls"` (the raw `[CLS]` state) or `"mean"` (masked mean of the token states).
        classifier_dropout: dropout before every internal classifier; `None` takes the encoder's
            `classifier_dropout`, else its `hidden_dropout_prob`.
    """

    model_type = "pabee"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}

    encoder_config: PreTrainedConfig | dict | None = None
    patience: int = 6
    regression_threshold: float = 0.1
    pooling: str = "pooler"
    classifier_dropout: float | None = None
    exit_criterion: str = "patience"
    exit_threshold: float | None = None
    max_exit_layer: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.criterion()  # validates patience, thresholds, the cap and the rule's fit to the problem type
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r} is not supported; choose one of {', '.join(POOLINGS)}.")
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels} is invalid: a classifier needs at least 1 label.")

    @property
    def num_hidden_layers(self) -> int:
        """Number of encoder layers, each with its own classifier."""
        return self.encoder_config.num_hidden_layers

    @property
    def is_regression(self) -> bool:
        return self.problem_type == REGRESSION or (self.problem_type is None and self.num_labels == 1)

    @property
    def problem(self) -> str:
        """The problem type with HF's default resolved: regression for one label, else single-label."""
        if self.is_regression:
            return REGRESSION
        return MULTI_LABEL if self.problem_type == MULTI_LABEL else SINGLE_LABEL

    def criterion(
        self,
        patience: int | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        max_exit_layer: int | None = None,
    ) -> ExitCriterion:
        """The exit rule these settings describe, with any argument given overriding the stored one.

        The stored threshold only carries over to the stored rule: switching `exit_criterion` for one call
        uses that rule's default threshold unless `exit_threshold` is given too.
        """
        name = self.exit_criterion if exit_criterion is None else exit_criterion
        if exit_threshold is None and name == self.exit_criterion:
            exit_threshold = self.exit_threshold
        criterion = make_criterion(
            name,
            patience=self.patience if patience is None else patience,
            threshold=exit_threshold,
            max_exit_layer=self.max_exit_layer if max_exit_layer is None else max_exit_layer,
            problem_type=self.problem,
            regression_threshold=self.regression_threshold,
        )
        if self.encoder_config is not None and hasattr(self.encoder_config, "num_hidden_layers"):
            criterion.exit_limit(self.num_hidden_layers)  # e.g. static layer k beyond the encoder's depth
        return criterion

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
