"""Which exit settings a command sweeps: `--exit_criterion`, `--patience` and `--exit_threshold` → `ExitSpec`s.

`run-glue` reads every setting off one full pass (the sweep) and `bench` times each one, so a single run
compares criteria on the same fine-tuned model. The flags:

    --exit_criterion patience,confidence,static     # default: patience
    --patience 1,2,3                                # patience and patience+confidence
    --exit_threshold confidence=0.8,0.9 static=2,4  # per criterion; a bare list serves the only one that needs it

A criterion given no thresholds sweeps `exits.DEFAULT_SWEEPS` (static: every layer). The parsed flags make an
`exits.ExitSweep`; `checked_specs` builds its settings against a model, so a bad one stops the command first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .configuration import PabeeConfig
from .errors import PabeeError
from .exits import CRITERIA, ExitSpec, ExitSweep

__all__ = ["checked_specs", "parse_criteria", "parse_int_list", "parse_patiences", "parse_thresholds"]


def parse_int_list(value: str, flag: str, minimum: int) -> list[int]:
    """`"1,2,3"` → `[1, 2, 3]` (repeats dropped, order kept), or a `PabeeError` naming the flag."""
    numbers: list[int] = []
    for part in str(value).split(","):
        part = part.strip()
        if not re.fullmatch(r"[-+]?\d+", part) or int(part) < minimum:
            raise PabeeError(
                f"{flag} {value!r} is invalid: {part!r} is not a whole number >= {minimum} "
                "(use comma-separated numbers, e.g. 1,2,3)."
            )
        numbers.append(int(part))
    return list(dict.fromkeys(numbers))


def parse_patiences(value: str) -> list[int]:
    """`--patience "3,4,5"` → `[3, 4, 5]`: whole numbers >= 0 (0 is the full model)."""
    return parse_int_list(value, "--patience", 0)


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


def checked_specs(sweep: ExitSweep, config: PabeeConfig) -> dict[str, list[ExitSpec]]:
    """The sweep's settings for a model, each built into its criterion once, so a bad value stops the command
    before any work is done."""
    specs = sweep.specs(config.num_hidden_layers)
    for name, items in specs.items():
        if not items:
            raise PabeeError(f"--exit_criterion {name}: nothing to evaluate (give it a non-zero --patience).")
        for spec in items:
            try:
                config.build_criterion(spec)
            except ValueError as error:
                raise PabeeError(f"--exit_criterion {name}: {error}") from None
    return specs
