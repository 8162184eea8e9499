"""Exit settings: what a user asks for, as one value.

A setting is an `ExitSpec`: a rule (`criterion`), its patience or threshold, and a cap on the layers any example
may use. Users type settings as four keywords — `patience`, `exit_criterion`, `exit_threshold`, `max_exit_layer`
— in the flags, `config.json`, `model(**batch, patience=2)`, the pipelines and Ray's arguments. Each of those edges
turns them into a spec through one function, `exit_spec_from`, as transformers' `generate` turns its keywords into
a `GenerationConfig` once; everything below the edges takes the spec. `pabee.rules` builds the rule a spec names
for a model. An `ExitSweep` is the settings one run compares.

The rules, by name (`pabee.rules` implements them):

- `patience`: PABEE (Zhou et al. 2020) — exit once `patience` layers in a row agree with the layer before.
- `entropy`: DeeBERT (Xin et al. 2020) — exit when the prediction entropy (nats) falls below the threshold.
- `confidence`: Schwartz et al. 2020 — exit when the top probability reaches the threshold.
- `patience+confidence`: after PCEE-BERT (Zhang et al. 2022) — the counter grows only for layers that agree
  with the layer before *and* are confident (top probability >= threshold); exit at `patience`.
- `static`: every example exits at layer k (a truncated model, the baseline every rule must beat).

Every rule also takes `max_exit_layer`, a hard cap on the layers any example may use, which bounds the worst-case
latency whatever the input (published slowdown attacks make early-exit models run every layer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "CRITERION_NAMES",
    "CERTIFY_SWEEPS",
    "DEFAULT_SWEEPS",
    "EXIT_KEYWORDS",
    "ExitSpec",
    "ExitSweep",
    "check_max_exit_layer",
    "check_patience",
    "check_regression_threshold",
    "exit_spec_from",
]

CRITERION_NAMES = ("patience", "entropy", "confidence", "patience+confidence", "static")
PATIENCE_RULES = ("patience", "patience+confidence")  # the rules a patience belongs to
# What a sweep compares for a rule given no thresholds (static: every layer).
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    "entropy": (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "confidence": (0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "patience+confidence": (0.9,),
}
# What certification walks for a rule given no thresholds. Fixed-sequence testing spends no confidence on a longer
# sequence (each setting is tested at the full level, in an order fixed before the data are seen), so a fine grid
# costs nothing but finds the fastest setting the data allow: MiniLM SST-2 add-exits at <= 2% changed, 1.71x fewer
# layers on the coarse grid, 2.01x on this one (benchmarks/results/add_exits_fine_grid.md).
CERTIFY_SWEEPS: dict[str, tuple[float, ...]] = {
    "entropy": tuple(round(0.01 * i, 2) for i in range(1, 61)),
    "confidence": tuple(round(0.5 + 0.01 * i, 2) for i in range(50)) + (0.995,),
}
# The keywords users type a setting with, and the `ExitSpec` field each sets.
EXIT_KEYWORDS: dict[str, str] = {
    "patience": "patience",
    "exit_criterion": "criterion",
    "exit_threshold": "threshold",
    "max_exit_layer": "max_exit_layer",
}


# --- checks of single values ------------------------------------------------------------------------------------


def check_patience(patience: int) -> int:
    """Raise a `ValueError` unless `patience` is a whole number >= 0."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"patience={patience!r} is invalid: use a whole number >= 0 (0 runs the full model).")
    return patience


def finite(value: object) -> float | None:
    """`value` as a finite float, or None when it is not a number (booleans are not)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def check_regression_threshold(threshold: float) -> float:
    """Raise a `ValueError` unless `threshold` is a finite number >= 0."""
    number = finite(threshold)
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


# --- one setting ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitSpec:
    """One exit setting: a rule with its patience, threshold and layer cap.

    `threshold` is the entropy bound, the top probability, or (for `static`) the layer k; `patience` serves
    `patience` and `patience+confidence`; `None` means unset (the rule's default threshold, no cap). Whether the
    values fit a model is checked when `pabee.rules.build_criterion` builds the rule for it.

    Example:
        >>> spec = exit_spec_from({"exit_criterion": "confidence", "exit_threshold": 0.9, "max_exit_layer": 4})
        >>> spec.title
        'confidence 0.9, at most 4 layers'
    """

    criterion: str = "patience"
    patience: int | None = None
    threshold: float | None = None
    max_exit_layer: int | None = None

    def __post_init__(self) -> None:
        if self.criterion not in CRITERION_NAMES:
            raise ValueError(
                f"exit_criterion={self.criterion!r} is unknown; choose one of {', '.join(CRITERION_NAMES)}."
            )
        if self.criterion not in PATIENCE_RULES:  # one setting, one value: a rule without patience holds none
            object.__setattr__(self, "patience", None)

    def keywords(self) -> dict[str, Any]:
        """The setting as the keywords users type (`config.json`'s fields), unset ones as None."""
        return {name: getattr(self, field_name) for name, field_name in EXIT_KEYWORDS.items()}

    @property
    def is_full_model(self) -> bool:
        return self.criterion == "patience" and self.patience == 0

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

    def describe(self, with_cap: bool = False) -> dict[str, Any]:
        """The setting's fields for a results row (`with_cap`: the layer cap too)."""
        fields = {"criterion": self.criterion, "setting": self.label, "patience": self.patience}
        fields["threshold"] = self.threshold
        return {**fields, "max_exit_layer": self.max_exit_layer} if with_cap else fields


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def exit_spec_from(keywords: Mapping[str, Any], base: ExitSpec | None = None) -> ExitSpec:
    """The one way keywords become a setting: `base` (default: the full model) with every keyword that is not
    None applied. What every edge calls — the flags, `config.json`, `forward`, the pipelines, Ray's arguments.

    - An unknown keyword is a `ValueError` naming it.
    - A threshold belongs to its rule: a new `exit_criterion` drops `base`'s threshold (the new rule's default
      applies) unless `exit_threshold` is given too.
    - A `patience` given alone means PABEE's rule: over a rule that takes none (a model calibrated to confidence
      0.8, say) it switches to `patience` instead of being ignored, so `patience=0` is always the full model.

    Example:
        >>> own = ExitSpec("confidence", threshold=0.8)
        >>> exit_spec_from({"patience": 0}, own).is_full_model
        True
    """
    unknown = [name for name in keywords if name not in EXIT_KEYWORDS]
    if unknown:
        raise ValueError(f"Unknown exit option {unknown[0]!r}; use {', '.join(EXIT_KEYWORDS)}.")
    given = {EXIT_KEYWORDS[name]: value for name, value in keywords.items() if value is not None}
    spec = base or ExitSpec("patience", patience=0)
    criterion = given.pop("criterion", None)
    if criterion is None and "patience" in given and spec.criterion not in PATIENCE_RULES:
        criterion = "patience"
    if criterion is not None and criterion != spec.criterion:
        spec = replace(spec, criterion=criterion, threshold=None)
    return replace(spec, **given)


# --- the settings one run compares ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExitSweep:
    """The exit settings one run compares on the same model: each rule over its patiences or thresholds, all
    under one layer cap. `run-glue` reads them all off one full pass, `bench` times them, `calibrate` chooses.

    `thresholds` holds a rule's thresholds (for `static`, the layers k); a rule without an entry sweeps
    `DEFAULT_SWEEPS` (static: every layer). `patiences` serve `patience` and `patience+confidence`.
    """

    criteria: tuple[str, ...] = ("patience",)
    patiences: tuple[int, ...] = (0,)
    thresholds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    cap: int | None = None

    def specs(self, num_layers: int) -> dict[str, list[ExitSpec]]:
        """Every setting, per rule in sweep order, each with the cap."""
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
        return {name: [replace(spec, max_exit_layer=self.cap) for spec in items] for name, items in specs.items()}

    def for_certifying(self) -> ExitSweep:
        """This sweep with `CERTIFY_SWEEPS`' fine thresholds for each rule it names without thresholds of its own."""
        fine = {name: CERTIFY_SWEEPS[name] for name in self.criteria if name in CERTIFY_SWEEPS}
        return replace(self, thresholds={**fine, **self.thresholds})

    def or_cap_of(self, spec: ExitSpec) -> ExitSweep:
        """This sweep, under `spec`'s layer cap when it has none of its own (a model's stored cap, say)."""
        return self if self.cap is not None else replace(self, cap=spec.max_exit_layer)

    def patience_specs(self) -> list[ExitSpec]:
        """Each patience of the sweep as a `patience` setting with the cap (run-glue's main table)."""
        return [ExitSpec("patience", patience=p, max_exit_layer=self.cap) for p in self.patiences]

    def describe(self) -> dict[str, Any]:
        """What was swept, for a results file."""
        return {"patiences": list(self.patiences), "criteria": list(self.criteria), "max_exit_layer": self.cap}
