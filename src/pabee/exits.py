"""Exit criteria: when may an example stop climbing the encoder?

A criterion is a frozen description (e.g. "patience 3", "confidence 0.9, at most 4 layers"); for each forward
pass it hands out a fresh tracker that holds the per-example state as tensors. The same tracker drives real
early-exit inference (where rows that exit are dropped with `keep`) and the one-pass sweep over precomputed
logits (`sweep_exit_layers`), so the two cannot disagree about a rule. No model code lives here.

An `ExitSpec` names a setting in the words users and the config use (criterion, patience, threshold, cap);
`ExitSpec.build` turns it into the criterion for a model's problem type. Criteria, by name:

- `patience`: PABEE (Zhou et al. 2020) — exit once `patience` layers in a row agree with the layer before.
- `entropy`: DeeBERT (Xin et al. 2020) — exit when the prediction entropy (nats) falls below the threshold.
- `confidence`: Schwartz et al. 2020 — exit when the top probability reaches the threshold.
- `patience+confidence`: after PCEE-BERT (Zhang et al. 2022) — the counter grows only for layers that agree
  with the layer before *and* are confident (top probability >= threshold); exit at `patience`.
- `static`: every example exits at layer k (a truncated model, the baseline every rule must beat).

Every criterion also takes `max_exit_layer`, a hard cap on the layers any example may use, which bounds the
worst-case latency whatever the input (published slowdown attacks make early-exit models run every layer).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "CRITERIA",
    "ConfidenceCriterion",
    "DEFAULT_SWEEPS",
    "DEFAULT_THRESHOLDS",
    "EXIT_KEYWORDS",
    "EntropyCriterion",
    "ExitCriterion",
    "ExitSpec",
    "ExitSweep",
    "ExitTracker",
    "MULTI_LABEL",
    "PROBLEM_TYPES",
    "PatienceConfidenceCriterion",
    "PatienceCriterion",
    "REGRESSION",
    "SINGLE_LABEL",
    "StaticCriterion",
    "check_max_exit_layer",
    "check_patience",
    "check_regression_threshold",
    "confidence",
    "entropy",
    "keywords_of",
    "logits_at_exit",
    "make_criterion",
    "predictions",
    "sweep_exit_layers",
]

SINGLE_LABEL = "single_label_classification"
MULTI_LABEL = "multi_label_classification"
REGRESSION = "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)


def check_patience(patience: int) -> int:
    """Raise a `ValueError` unless `patience` is a whole number >= 0."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"patience={patience!r} is invalid: use a whole number >= 0 (0 runs the full model).")
    return patience


def _finite(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def check_regression_threshold(threshold: float) -> float:
    """Raise a `ValueError` unless `threshold` is a finite number >= 0."""
    number = _finite(threshold)
    if number is None or number < 0:
        raise ValueError(f"regression_threshold={threshold!r} is invalid: use a finite number >= 0.")
    return number


def check_max_exit_layer(max_exit_layer: int | None) -> int | None:
    """Raise a `ValueError` unless `max_exit_layer` is None (no cap) or a whole number >= 1."""
    if max_exit_layer is None:
        return None
    if isinstance(max_exit_layer, bool) or not isinstance(max_exit_layer, int) or max_exit_layer < 1:
        raise ValueError(f"max_exit_layer={max_exit_layer!r} is invalid: use a whole number >= 1, or None for no cap.")
    return max_exit_layer


# --- what a layer's logits say, per problem type -------------------------------------------------------------


# These read a layer's logits between two layers of a runtime: small arrays, computed in numpy. torch's reductions
# (softmax, max, argmax) may wake its thread pool even for a (32, 2) tensor, and next to ONNX Runtime's threads,
# still spinning after the layer's call, each then took ~8 ms instead of microseconds (MRPC, batch 32, 2 cores).
# One implementation serves real inference and the one-pass sweep alike, so the two read the same numbers.


def predictions(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The answer a layer gives: the class `[rows]`, the label set `[rows, labels]` (bool) or the value `[rows]`."""
    if problem_type == REGRESSION:
        return logits.squeeze(-1)
    if problem_type == MULTI_LABEL:
        return logits > 0
    return _back(_numpy(logits).argmax(axis=-1), logits)


def confidence(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Top softmax probability; for multi-label, the least sure label's `max(p, 1 - p)` (every label must be sure)."""
    x = _numpy(logits)
    if problem_type == MULTI_LABEL:
        p = 1 / (1 + np.exp(-x))
        return _back(np.maximum(p, 1 - p).min(axis=-1), logits)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return _back((p / p.sum(axis=-1, keepdims=True)).max(axis=-1), logits)


def entropy(logits: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Prediction entropy in nats; for multi-label, the largest per-label (Bernoulli) entropy."""
    x = _numpy(logits)
    if problem_type == MULTI_LABEL:
        p = 1 / (1 + np.exp(-x))
        per_label = p * np.logaddexp(0, -x) + (1 - p) * np.logaddexp(0, x)  # -(p log p + (1 - p) log(1 - p))
        return _back(per_label.max(axis=-1), logits)
    shifted = x - x.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return _back(-(np.exp(log_p) * log_p).sum(axis=-1), logits)


def _numpy(logits: torch.Tensor) -> np.ndarray:
    return logits.detach().to("cpu", torch.float32).numpy()


def _back(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """numpy results as a tensor where the logits are (a view on the CPU)."""
    return torch.from_numpy(np.ascontiguousarray(values)).to(like.device)


# --- trackers ------------------------------------------------------------------------------------------------


class ExitTracker(ABC):
    """Per-example exit state for one batch during one forward pass."""

    @abstractmethod
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """Feed one layer's logits `[rows, num_labels]` for the rows still running; return a bool `[rows]` that
        is True where the row may exit at this layer."""

    @abstractmethod
    def keep(self, rows: torch.Tensor) -> None:
        """Forget the rows that left the batch; `rows` is a bool mask over the current rows."""


class _StatelessTracker(ExitTracker):
    """A rule that looks at the current layer only (entropy, confidence, never)."""

    def __init__(self, decide: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.decide = decide

    def update(self, logits: torch.Tensor) -> torch.Tensor:
        return self.decide(logits)

    def keep(self, rows: torch.Tensor) -> None:
        pass


class _AgreementTracker(ExitTracker):
    """Counts layers in a row that agree with the previous layer (and, optionally, are confident)."""

    def __init__(
        self,
        patience: int,
        problem_type: str,
        regression_threshold: float,
        min_confidence: float | None,
        counter: torch.Tensor,
    ) -> None:
        self.patience = patience
        self.problem_type = problem_type
        self.regression_threshold = regression_threshold
        self.min_confidence = min_confidence
        self.counter = counter
        self.previous: torch.Tensor | None = None

    def update(self, logits: torch.Tensor) -> torch.Tensor:
        # Few tensor operations: at batch size 1 each costs microseconds, comparable with a small layer's share.
        prediction = predictions(logits, self.problem_type)
        previous, self.previous = self.previous, prediction
        if previous is None:  # the first layer agrees with nothing: the counter stays 0
            return torch.zeros_like(self.counter, dtype=torch.bool)
        if self.problem_type == REGRESSION:
            agree = (prediction - previous).abs() < self.regression_threshold
        elif self.problem_type == MULTI_LABEL:
            agree = (prediction == previous).all(dim=-1)
        else:
            agree = prediction == previous
        if self.min_confidence is not None:
            agree &= confidence(logits, self.problem_type) >= self.min_confidence
        self.counter = (self.counter + 1) * agree  # +1 where the layer agrees, back to 0 where it does not
        if self.patience == 0:
            return torch.zeros_like(agree)
        return self.counter >= self.patience

    def keep(self, rows: torch.Tensor) -> None:
        self.counter = self.counter[rows]
        if self.previous is not None:
            self.previous = self.previous[rows]


# --- criteria ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitCriterion(ABC):
    """A rule deciding, layer by layer, which examples have seen enough.

    `problem_type` says how to read logits (HF names: single-label, multi-label, regression); `max_exit_layer`
    caps the layers any example may use (None: all of them). Each rule builds itself from an `ExitSpec`
    (`from_spec`), so the names users write map to a rule in exactly one place per rule.
    """

    name: ClassVar[str] = ""
    supports_regression: ClassVar[bool] = False
    default_threshold: ClassVar[float | None] = None  # used when a spec gives no threshold

    problem_type: str = field(default=SINGLE_LABEL, kw_only=True)
    max_exit_layer: int | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r} is invalid; use one of {', '.join(PROBLEM_TYPES)}.")
        if self.problem_type == REGRESSION and not self.supports_regression:
            raise ValueError(
                f"exit_criterion={self.name!r} needs class probabilities and does not apply to regression; "
                "use 'patience' or 'static'."
            )
        check_max_exit_layer(self.max_exit_layer)

    @classmethod
    def from_spec(cls, spec: ExitSpec, problem_type: str, regression_threshold: float) -> ExitCriterion:
        """The rule `spec` describes; the default reads a threshold (or the rule's default) and nothing else."""
        threshold = cls.default_threshold if spec.threshold is None else spec.threshold
        return cls(threshold, problem_type=problem_type, max_exit_layer=spec.max_exit_layer)

    @abstractmethod
    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        """Fresh per-example state for a batch of `batch_size` examples."""

    def exit_limit(self, num_layers: int) -> int:
        """The layer at which every example still running answers (the cap, or the last layer)."""
        return num_layers if self.max_exit_layer is None else min(self.max_exit_layer, num_layers)

    def can_exit_early(self, num_layers: int) -> bool:
        """False when no example can leave before `exit_limit`, so the model may skip the early heads."""
        return self.exit_limit(num_layers) > 1

    def earliest_exit(self, num_layers: int) -> int:
        """The first layer (1-based) at which any example may leave: the layers before it run for every example,
        so a runtime may run them in one go. The rule still sees their logits (a patience counter needs them)."""
        return 1


def _need(value, criterion: str, what: str):
    if value is None:
        raise ValueError(f"exit_criterion={criterion!r} needs {what}.")
    return value


@dataclass(frozen=True)
class _AgreementCriterion(ExitCriterion):
    """Shared by patience and patience+confidence: a counter of agreeing layers that must reach `patience`."""

    patience: int

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patience(self.patience)

    def can_exit_early(self, num_layers: int) -> bool:
        # The counter reaches `patience` at layer `patience + 1` at the earliest.
        return 0 < self.patience < self.exit_limit(num_layers) - 1

    def earliest_exit(self, num_layers: int) -> int:
        return min(self.patience + 1, self.exit_limit(num_layers))

    def _tracker(self, batch_size, device, regression_threshold: float, min_confidence: float | None) -> ExitTracker:
        counter = torch.zeros(batch_size, dtype=torch.long, device=device)
        return _AgreementTracker(self.patience, self.problem_type, regression_threshold, min_confidence, counter)


@dataclass(frozen=True)
class PatienceCriterion(_AgreementCriterion):
    """PABEE: exit once `patience` consecutive layers agree with the layer before them.

    Layer *i* agrees with layer *i-1* when their predicted labels (label sets, for multi-label) are equal, or, for
    regression, when their outputs differ by less than `regression_threshold`. An example therefore exits at
    layer `patience + 1` at the earliest; `patience == 0` never exits early (the full model).
    """

    name: ClassVar[str] = "patience"
    supports_regression: ClassVar[bool] = True

    regression_threshold: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_regression_threshold(self.regression_threshold)

    @classmethod
    def from_spec(cls, spec: ExitSpec, problem_type: str, regression_threshold: float) -> ExitCriterion:
        if spec.threshold is not None:
            raise ValueError(
                "exit_threshold does not apply to 'patience' (set patience, and regression_threshold for regression)."
            )
        patience = _need(spec.patience, cls.name, "patience")
        return cls(patience, regression_threshold, problem_type=problem_type, max_exit_layer=spec.max_exit_layer)

    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        return self._tracker(batch_size, device, self.regression_threshold, None)


def _check_probability(threshold: float, name: str) -> float:
    number = _finite(threshold)
    if number is None or not 0 < number <= 1:
        raise ValueError(f"exit_threshold={threshold!r} is invalid for {name!r}: use a probability in (0, 1].")
    return number


@dataclass(frozen=True)
class PatienceConfidenceCriterion(_AgreementCriterion):
    """After PCEE-BERT: like patience, but a layer counts only if it agrees with the previous one *and* its top
    probability is at least `threshold`; an unsure layer resets the counter."""

    name: ClassVar[str] = "patience+confidence"
    default_threshold: ClassVar[float | None] = 0.9

    threshold: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_probability(self.threshold, self.name)

    @classmethod
    def from_spec(cls, spec: ExitSpec, problem_type: str, regression_threshold: float) -> ExitCriterion:
        patience = _need(spec.patience, cls.name, "patience")
        threshold = cls.default_threshold if spec.threshold is None else spec.threshold
        return cls(patience, threshold, problem_type=problem_type, max_exit_layer=spec.max_exit_layer)

    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        return self._tracker(batch_size, device, 0.0, self.threshold)


@dataclass(frozen=True)
class EntropyCriterion(ExitCriterion):
    """DeeBERT: exit at the first layer whose prediction entropy (nats) is below `threshold`.

    A threshold of 0 never exits early; for two classes the entropy is at most ln 2 ≈ 0.693.
    """

    name: ClassVar[str] = "entropy"
    default_threshold: ClassVar[float | None] = 0.1

    threshold: float

    def __post_init__(self) -> None:
        super().__post_init__()
        number = _finite(self.threshold)
        if number is None or number < 0:
            raise ValueError(f"exit_threshold={self.threshold!r} is invalid for 'entropy': use a number >= 0 (nats).")

    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        return _StatelessTracker(lambda logits: entropy(logits, self.problem_type) < self.threshold)


@dataclass(frozen=True)
class ConfidenceCriterion(ExitCriterion):
    """Schwartz et al.: exit at the first layer whose top probability reaches `threshold`."""

    name: ClassVar[str] = "confidence"
    default_threshold: ClassVar[float | None] = 0.9

    threshold: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_probability(self.threshold, self.name)

    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        return _StatelessTracker(lambda logits: confidence(logits, self.problem_type) >= self.threshold)


@dataclass(frozen=True)
class StaticCriterion(ExitCriterion):
    """Every example answers at layer `layer`: the encoder truncated to k layers, with classifier k."""

    name: ClassVar[str] = "static"
    supports_regression: ClassVar[bool] = True

    layer: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"exit_threshold={self.layer!r} is invalid for 'static': use a layer number >= 1.")

    @classmethod
    def from_spec(cls, spec: ExitSpec, problem_type: str, regression_threshold: float) -> ExitCriterion:
        layer = _need(spec.threshold, cls.name, "exit_threshold (the layer k)")
        if isinstance(layer, float) and layer.is_integer():
            layer = int(layer)  # a sweep or the command line gives 4.0
        return cls(layer, problem_type=problem_type, max_exit_layer=spec.max_exit_layer)

    def exit_limit(self, num_layers: int) -> int:
        if self.layer > num_layers:
            raise ValueError(f"static exit at layer {self.layer} is impossible: the model has {num_layers} layers.")
        return min(self.layer, super().exit_limit(num_layers))

    def can_exit_early(self, num_layers: int) -> bool:
        return False

    def earliest_exit(self, num_layers: int) -> int:
        return self.exit_limit(num_layers)

    def tracker(self, batch_size: int, device: torch.device | str) -> ExitTracker:
        return _StatelessTracker(lambda logits: torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device))


CRITERIA: dict[str, type[ExitCriterion]] = {
    c.name: c
    for c in (PatienceCriterion, EntropyCriterion, ConfidenceCriterion, PatienceConfidenceCriterion, StaticCriterion)
}
# Used when a criterion that needs a threshold gets none.
DEFAULT_THRESHOLDS: dict[str, float] = {n: c.default_threshold for n, c in CRITERIA.items() if c.default_threshold}
# What a sweep compares for a criterion given no thresholds (static: every layer).
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    "entropy": (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "confidence": (0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "patience+confidence": (DEFAULT_THRESHOLDS["patience+confidence"],),
}
# Where users type a setting as keywords (`forward`, the pipelines, `config.json`, the flags): each keyword and the
# `ExitSpec` field it sets. Above those edges a setting travels as one `ExitSpec`.
EXIT_KEYWORDS: dict[str, str] = {
    "patience": "patience",
    "exit_criterion": "criterion",
    "exit_threshold": "threshold",
    "max_exit_layer": "max_exit_layer",
}


# --- exit settings -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitSpec:
    """One exit setting, as users write it: a criterion with its patience, threshold and layer cap.

    `threshold` is the entropy bound, the top probability, or (for `static`) the layer k; `patience` serves
    `patience` and `patience+confidence`; `None` means unset (the rule's default threshold, no cap). A spec is
    checked when it is built into a criterion for a model (`build`), where the problem type is known.

    Example:
        >>> spec = ExitSpec("confidence", threshold=0.9, max_exit_layer=4)
        >>> spec.merged(threshold=0.8).label
        '0.8'
    """

    criterion: str = "patience"
    patience: int | None = None
    threshold: float | None = None
    max_exit_layer: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"exit_criterion={self.criterion!r} is unknown; choose one of {', '.join(CRITERIA)}.")

    def with_keywords(self, keywords: Mapping[str, Any]) -> ExitSpec:
        """This spec with a setting typed as keywords (`patience=2`, `exit_criterion="confidence"`, ...) applied:
        what the user-facing edges call. `None` values are unset; an unknown keyword is a `ValueError`."""
        unknown = [name for name in keywords if name not in EXIT_KEYWORDS]
        if unknown:
            raise ValueError(f"Unknown exit option {unknown[0]!r}; use {', '.join(EXIT_KEYWORDS)}.")
        return self.merged(**{EXIT_KEYWORDS[name]: value for name, value in keywords.items()})

    def capped(self, layer: int | None) -> ExitSpec:
        """This spec with the layer cap `layer` (`None`: as it is)."""
        return self if layer is None else replace(self, max_exit_layer=layer)

    def merged(
        self,
        criterion: str | None = None,
        patience: int | None = None,
        threshold: float | None = None,
        max_exit_layer: int | None = None,
    ) -> ExitSpec:
        """This spec with every override that is not `None` applied.

        A threshold belongs to its rule: switching `criterion` drops the stored threshold (the new rule's default
        applies) unless `threshold` is given too. A `patience` given alone means PABEE's rule: on a spec whose rule
        takes no patience (a model calibrated to confidence 0.8, say), it switches to `patience` rather than being
        ignored, so `patience=0` is the full model whatever the model's own setting.
        """
        if patience is not None and criterion is None and self.criterion not in ("patience", "patience+confidence"):
            criterion = "patience"
        spec = self
        if criterion is not None and criterion != self.criterion:
            spec = replace(self, criterion=criterion, threshold=None)
        changes = {"patience": patience, "threshold": threshold, "max_exit_layer": max_exit_layer}
        return replace(spec, **{name: value for name, value in changes.items() if value is not None})

    def build(
        self, problem_type: str = SINGLE_LABEL, regression_threshold: float = 0.1, num_layers: int | None = None
    ) -> ExitCriterion:
        """The criterion for a model of `problem_type` (and `num_layers`, to reject a static layer beyond it)."""
        criterion = CRITERIA[self.criterion].from_spec(self, problem_type, regression_threshold)
        if num_layers is not None:
            criterion.exit_limit(num_layers)
        return criterion

    def options(self) -> dict[str, Any]:
        """The keywords that are set, by the names `forward`, the config and the flags use."""
        values = {name: getattr(self, field_name) for name, field_name in EXIT_KEYWORDS.items()}
        return {name: value for name, value in values.items() if value is not None}

    def changes_from(self, base: ExitSpec) -> dict[str, Any]:
        """The keywords by which this spec differs from `base` (e.g. a model's own setting), for messages."""
        before = base.options()
        return {name: value for name, value in self.options().items() if before.get(name) != value}

    @property
    def label(self) -> str:
        """Short name for tables and plots: `3`, `0 (full)`, `0.9`, `p2, 0.9`, `k=4`."""
        if self.criterion == "patience":
            return f"{self.patience} (full)" if self.patience == 0 else str(self.patience)
        if self.criterion == "static":
            return f"k={_number(self.threshold)}"
        if self.criterion == "patience+confidence":
            return f"p{self.patience}, {_number(self.threshold)}"
        return _number(self.threshold)

    @property
    def title(self) -> str:
        """The setting in words, for messages: `full model`, `patience 3`, `confidence 0.8, at most 4 layers`."""
        if self.is_full_model:
            name = "full model"
        elif self.criterion == "static":
            name = f"static k={_number(self.threshold)}"
        elif self.criterion == "patience":
            name = f"patience {self.patience}"
        elif self.criterion == "patience+confidence":
            name = f"patience {self.patience} + confidence {_number(self.threshold)}"
        else:
            name = f"{self.criterion} {_number(self.threshold)}"
        return name + ("" if self.max_exit_layer is None else f", at most {self.max_exit_layer} layers")

    @property
    def key(self) -> str:
        """Identifier without spaces (bench variant names): `p3`, `confidence=0.9`, `p2+confidence=0.9`."""
        if self.criterion == "patience":
            return f"p{self.patience}"
        if self.criterion == "patience+confidence":
            return f"p{self.patience}+confidence={_number(self.threshold)}"
        return f"{self.criterion}={_number(self.threshold)}"

    @property
    def is_full_model(self) -> bool:
        return self.criterion == "patience" and self.patience == 0

    def describe(self, with_cap: bool = False) -> dict[str, Any]:
        """The setting's fields for a results row (`with_cap`: the layer cap too)."""
        fields = {"criterion": self.criterion, "setting": self.label, "patience": self.patience}
        fields["threshold"] = self.threshold
        return {**fields, "max_exit_layer": self.max_exit_layer} if with_cap else fields


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


@dataclass(frozen=True)
class ExitSweep:
    """The exit settings one run compares on the same model: each criterion over its patiences or thresholds, all
    under one layer cap. `run-glue` reads them all off one full pass, `bench` times them, `calibrate` chooses.

    `thresholds` holds a criterion's thresholds (for `static`, the layers k); a criterion without an entry sweeps
    `DEFAULT_SWEEPS` (static: every layer). `patiences` serve `patience` and `patience+confidence`.
    """

    criteria: tuple[str, ...] = ("patience",)
    patiences: tuple[int, ...] = (0,)
    thresholds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    cap: int | None = None

    def specs(self, num_layers: int) -> dict[str, list[ExitSpec]]:
        """Every setting, per criterion in sweep order, each with the cap."""
        specs: dict[str, list[ExitSpec]] = {}
        for name in self.criteria:
            given = self.thresholds.get(name)
            if name == "patience":
                specs[name] = [ExitSpec(name, patience=p) for p in self.patiences]
            elif name == "static":
                layers = given if given is not None else [float(k) for k in range(1, num_layers + 1)]
                specs[name] = [ExitSpec(name, threshold=k) for k in layers]
            else:
                values = given if given is not None else DEFAULT_SWEEPS[name]
                patiences = [p for p in self.patiences if p > 0] if name == "patience+confidence" else [None]
                specs[name] = [ExitSpec(name, patience=p, threshold=t) for p in patiences for t in values]
        return {name: [spec.capped(self.cap) for spec in items] for name, items in specs.items()}

    def or_cap_of(self, spec: ExitSpec) -> ExitSweep:
        """This sweep, under `spec`'s layer cap when it has none of its own (a model's stored cap, say)."""
        return self if self.cap is not None else replace(self, cap=spec.max_exit_layer)

    def patience_specs(self) -> list[ExitSpec]:
        """Each patience of the sweep as a `patience` setting with the cap (run-glue's main table)."""
        return [ExitSpec("patience", patience=p).capped(self.cap) for p in self.patiences]

    def describe(self) -> dict[str, Any]:
        """What was swept, for a results file."""
        return {"patiences": list(self.patiences), "criteria": list(self.criteria), "max_exit_layer": self.cap}


def keywords_of(holder: Any) -> dict[str, Any]:
    """The exit keywords an object holds as attributes of those names (a config, parsed flags), by keyword."""
    return {name: getattr(holder, name) for name in EXIT_KEYWORDS}


def make_criterion(
    name: str = "patience",
    *,
    patience: int | None = None,
    threshold: float | None = None,
    max_exit_layer: int | None = None,
    problem_type: str = SINGLE_LABEL,
    regression_threshold: float = 0.1,
) -> ExitCriterion:
    """Build a criterion from the names the config and the command line use (`ExitSpec(...).build(...)`).

    A threshold `patience` cannot use is an error, not silently ignored.
    """
    return ExitSpec(name, patience, threshold, max_exit_layer).build(problem_type, regression_threshold)


# --- applying a criterion to precomputed logits --------------------------------------------------------------


def sweep_exit_layers(criterion: ExitCriterion, all_logits: torch.Tensor) -> torch.Tensor:
    """Apply `criterion` to every layer's logits `[batch, layers, num_labels]` computed in one full pass.

    Returns the 1-based exit layer of each example, exactly the layer real early-exit inference stops at;
    examples the rule never releases exit at `criterion.exit_limit` (the last layer unless capped).
    """
    batch_size, num_layers, _ = all_logits.shape
    limit = criterion.exit_limit(num_layers)
    exit_layers = torch.full((batch_size,), limit, dtype=torch.long, device=all_logits.device)
    if not criterion.can_exit_early(num_layers):
        return exit_layers
    tracker = criterion.tracker(batch_size, all_logits.device)
    running = torch.ones(batch_size, dtype=torch.bool, device=all_logits.device)
    for layer in range(limit - 1):
        leaving = tracker.update(all_logits[:, layer]) & running
        exit_layers[leaving] = layer + 1
        running &= ~leaving
    return exit_layers


def logits_at_exit(all_logits: torch.Tensor, exit_layers: torch.Tensor) -> torch.Tensor:
    """Pick each example's logits `[batch, num_labels]` at its 1-based exit layer."""
    rows = torch.arange(all_logits.shape[0], device=all_logits.device)
    return all_logits[rows, exit_layers - 1]
