"""`PabeeConfig`: the encoder's own config plus the early-exit settings."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_patience(self.patience)
        check_regression_threshold(self.regression_threshold)
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
        return self.problem_type == "regression" or (self.problem_type is None and self.num_labels == 1)

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


def check_patience(patience: int) -> int:
    """Raise a `ValueError` unless `patience` is a whole number >= 0."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"patience={patience!r} is invalid: use a whole number >= 0 (0 runs the full model).")
    return patience


def check_regression_threshold(threshold: float) -> float:
    """Raise a `ValueError` unless `threshold` is a finite number >= 0."""
    try:
        valid = float(threshold) >= 0 and float(threshold) != float("inf")
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"regression_threshold={threshold!r} is invalid: use a finite number >= 0.")
    return float(threshold)
