"""Which exit settings a command sweeps: `--exit_criterion`, `--patience` and `--exit_threshold` → settings.

`run-glue` reads every setting off one full pass (the sweep) and `bench` times each one, so a single run
compares criteria on the same fine-tuned model. The flags:

    --exit_criterion patience,confidence,static     # default: patience
    --patience 1,2,3                                # patience and patience+confidence
    --exit_threshold confidence=0.8,0.9 static=2,4  # per criterion; a bare list serves the only one that needs it

A criterion given no thresholds sweeps `DEFAULT_THRESHOLDS` (static: every layer).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import PabeeError
from .exits import CRITERIA, DEFAULT_THRESHOLDS

# What a criterion sweeps when --exit_threshold says nothing about it.
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    "entropy": (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    "confidence": (0.6, 0.7, 0.8, 0.9, 0.95, 0.99),
    "patience+confidence": (DEFAULT_THRESHOLDS["patience+confidence"],),
}


@dataclass
class ExitArguments:
    """The exit flags `run-glue` and `bench` share (their `--patience` list is their own)."""

    exit_criterion: str = field(
        default="patience",
        metadata={
            "help": "Comma-separated exit criteria to compare on the same model: patience, entropy, confidence, "
            "patience+confidence, static. Each gets its own table (run-glue) or timed variants (bench)."
        },
    )
    exit_threshold: list[str] | None = field(
        default=None,
        metadata={
            "help": "Thresholds per criterion, e.g. confidence=0.8,0.9 entropy=0.1,0.3 static=2,4 (static: the "
            "layer k). A bare list serves the only selected criterion that takes one. Default: a built-in sweep."
        },
    )
    max_exit_layer: int | None = field(
        default=None, metadata={"help": "Cap on the layers any example may use, for every criterion."}
    )


@dataclass(frozen=True)
class ExitSetting:
    """One point of a sweep: a criterion with its patience and/or threshold."""

    criterion: str
    patience: int | None = None
    threshold: float | None = None

    @property
    def label(self) -> str:
        """Short name for tables and plots: `3`, `0.9`, `p2, 0.9`, `k=4`."""
        if self.criterion == "patience":
            return f"{self.patience} (full)" if self.patience == 0 else str(self.patience)
        if self.criterion == "static":
            return f"k={_number(self.threshold)}"
        if self.criterion == "patience+confidence":
            return f"p{self.patience}, {_number(self.threshold)}"
        return _number(self.threshold)

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

    def options(self, max_exit_layer: int | None = None) -> dict[str, Any]:
        """Keyword arguments for the model's `forward` / `get_exit_criterion`."""
        options: dict[str, Any] = {"exit_criterion": self.criterion, "max_exit_layer": max_exit_layer}
        if self.patience is not None:
            options["patience"] = self.patience
        if self.threshold is not None:
            options["exit_threshold"] = self.threshold  # static's layer k arrives as 4.0; the criterion takes it
        return options

    def describe(self) -> dict[str, Any]:
        """The setting's fields for a results row."""
        return {
            "criterion": self.criterion,
            "setting": self.label,
            "patience": self.patience,
            "threshold": self.threshold,
        }


def _number(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def parse_criteria(value: str) -> list[str]:
    """`"patience,confidence"` → `["patience", "confidence"]`, each a known criterion, no repeats."""
    names: list[str] = []
    for part in str(value).split(","):
        name = part.strip()
        if name not in CRITERIA:
            raise PabeeError(f"--exit_criterion {value!r}: {name!r} is unknown; choose from {', '.join(CRITERIA)}.")
        if name not in names:
            names.append(name)
    return names


def parse_thresholds(values: Sequence[str] | str | None, criteria: Sequence[str]) -> dict[str, list[float]]:
    """`["confidence=0.8,0.9", "static=2"]` → `{"confidence": [0.8, 0.9], "static": [2.0]}`.

    A bare list (`["0.8,0.9"]`) is allowed when exactly one selected criterion takes thresholds.
    """
    if values is None:
        return {}
    if isinstance(values, str):
        values = values.split()
    takers = [c for c in criteria if c != "patience"]
    out: dict[str, list[float]] = {}
    for item in values:
        name, eq, numbers = item.rpartition("=")
        if not eq:
            if len(takers) != 1:
                raise PabeeError(
                    f"--exit_threshold {item!r} does not say which criterion it is for; "
                    f"write e.g. confidence={item} (selected: {', '.join(criteria)})."
                )
            name = takers[0]
        if name not in takers:
            raise PabeeError(
                f"--exit_threshold {item!r}: {name!r} is not a selected criterion that takes thresholds "
                f"({', '.join(takers) or 'none selected; add it to --exit_criterion'})."
            )
        parsed = []
        for part in numbers.split(","):
            if not re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", part):
                raise PabeeError(f"--exit_threshold {item!r}: {part.strip()!r} is not a number.")
            parsed.append(float(part))
        out[name] = parsed
    return out


def exit_settings(
    criteria: Sequence[str], patiences: Sequence[int], thresholds: dict[str, list[float]], num_layers: int
) -> dict[str, list[ExitSetting]]:
    """Every setting to evaluate, per criterion, in sweep order."""
    settings: dict[str, list[ExitSetting]] = {}
    for name in criteria:
        values = thresholds.get(name)
        if name == "patience":
            settings[name] = [ExitSetting(name, patience=p) for p in patiences]
        elif name == "static":
            layers = values if values is not None else [float(k) for k in range(1, num_layers + 1)]
            settings[name] = [ExitSetting(name, threshold=k) for k in layers]
        elif name == "patience+confidence":
            values = values if values is not None else list(DEFAULT_SWEEPS[name])
            settings[name] = [ExitSetting(name, patience=p, threshold=t) for p in patiences if p > 0 for t in values]
        else:
            values = values if values is not None else list(DEFAULT_SWEEPS[name])
            settings[name] = [ExitSetting(name, threshold=t) for t in values]
    return settings


def check_settings(model, settings: dict[str, list[ExitSetting]], max_exit_layer: int | None) -> None:
    """Build every setting's criterion once, so a bad value stops the command before any work is done."""
    for name, items in settings.items():
        if not items:
            raise PabeeError(f"--exit_criterion {name}: nothing to evaluate (give it a non-zero --patience).")
        for setting in items:
            try:
                model.get_exit_criterion(**setting.options(max_exit_layer))
            except ValueError as error:
                raise PabeeError(f"--exit_criterion {name}: {error}") from None
