"""Exit settings chosen by load: a ladder of settings and the controller that walks it.

One early-exit model can answer at any depth, decided at run time; a fixed smaller model cannot. A server that
meets more load than its setting can carry would otherwise refuse (503) what a cheaper setting of the same model
would have answered. The *ladder* orders the settings an operator allows, from the top (the model's own, or the
full model) down to the cheapest, each with what it was measured to cost in quality: the share of answers that
differ from the full model's on calibration data (`pabee calibrate` writes it, `exit_ladder.json`). A *floor*
(`max_disagreement`) drops every rung that changes more answers, so load can never push quality below it.

The `LoadController` picks a rung for each micro-batch from what the batcher sees (texts waiting, the oldest
wait) and what each rung's batches recently cost: it steps down when the wait a new request would see is about
to break the latency target, and back up once the rung above would keep well within it, never switching more
often than `min_dwell` seconds (hysteresis, so it does not flap). It keeps no clock of its own beyond the one it
is given, so tests drive it with a simulated clock and queue.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rules import build_criterion
from .settings import EXIT_KEYWORDS, ExitSpec, exit_spec_from

__all__ = ["LADDER_FILE", "Decision", "ExitChoice", "Ladder", "LoadController", "Rung"]

LADDER_FILE = "exit_ladder.json"  # in a model folder: written by `pabee calibrate`, read by `pabee serve`


@dataclass(frozen=True)
class Rung:
    """One setting of a ladder, with what it was measured to cost: `disagreement`, the share of answers that
    differ from the full model's (None: not measured), and `layers`, the mean exit layer (None: not measured)."""

    spec: ExitSpec
    disagreement: float | None = None
    layers: float | None = None
    certified: bool = False

    def describe(self) -> dict[str, Any]:
        return {"setting": self.spec.title, **self.spec.keywords(), "disagreement": self.disagreement,
                "layers": self.layers, "certified": self.certified}  # fmt: skip


@dataclass(frozen=True)
class Ladder:
    """Settings from the top (used at light load) down to the cheapest; `num_layers` is the model's depth."""

    rungs: tuple[Rung, ...]
    num_layers: int

    def __post_init__(self) -> None:
        if not self.rungs:
            raise ValueError("An exit ladder needs at least one setting.")

    @classmethod
    def from_file(cls, path: str | Path, num_layers: int) -> Ladder:
        """A ladder as `pabee calibrate` writes it (`exit_ladder.json`): `{"rungs": [{"patience": ..., ...,
        "disagreement": ..., "layers": ..., "certified": ...}, ...]}`, top first."""
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        rungs = []
        for row in data["rungs"]:
            keywords = {name: row.get(name) for name in EXIT_KEYWORDS}
            rungs.append(Rung(exit_spec_from(keywords), row.get("disagreement"), row.get("layers"),
                              bool(row.get("certified"))))  # fmt: skip
        return cls(tuple(rungs), num_layers)

    def with_top(self, spec: ExitSpec) -> Ladder:
        """This ladder under `spec` as its top rung (the setting a server runs at light load): the rungs above it
        are dropped; a setting not on the ladder goes on top of every rung but the full model."""
        for index, rung in enumerate(self.rungs):
            if rung.spec == spec:
                return Ladder(self.rungs[index:], self.num_layers)
        below = tuple(r for r in self.rungs if not r.spec.is_full_model)  # the full model is never the cheaper
        return Ladder((Rung(spec), *below), self.num_layers)

    def floored(self, max_disagreement: float | None) -> Ladder:
        """Without the measured rungs that changed more than `max_disagreement` (a share) of the answers; the top
        stays, and so do rungs nobody measured (an operator's own list, taken as chosen)."""
        if max_disagreement is None:
            return self
        kept = [r for r in self.rungs[1:] if r.disagreement is None or r.disagreement <= max_disagreement]
        return Ladder((self.rungs[0], *kept), self.num_layers)

    def layers(self, index: int) -> float:
        """Mean layers rung `index` runs (measured, or the model's depth for a rung nobody measured)."""
        measured = self.rungs[index].layers
        return float(self.num_layers) if measured is None else measured

    def describe(self) -> list[dict[str, Any]]:
        return [rung.describe() for rung in self.rungs]


@dataclass(frozen=True)
class Decision:
    """The rung a micro-batch runs on, and why (the wait a new request would see at the rung in use)."""

    rung: int
    predicted_wait: float
    switched: bool = False


@dataclass
class LoadController:
    """Picks a ladder rung per micro-batch so a request's wait stays within `latency_target` seconds.

    The wait a new request would see is the oldest waiting request's age plus the time the waiting texts take at
    a rung: `queued / rate(rung)`. Rates are learned per rung from finished batches (texts per second, a moving
    average); a rung not measured yet is estimated from a measured one by the ratio of their mean layers (time
    grows with the layers run). Step down when the predicted wait exceeds `step_down` × the target (to the
    highest rung whose prediction fits, so a sudden step is met at once); step up one rung once the rung above
    would have kept the wait under `step_up` × the target for `climb_after` seconds in a row (quick down, slow
    up: near a rung's capacity it does not flap); at most one switch per `min_dwell` seconds.
    """

    ladder: Ladder
    latency_target: float
    step_down: float = 0.8
    step_up: float = 0.4
    min_dwell: float = 0.5
    climb_after: float = 2.0
    clock: Callable[[], float] = time.monotonic
    on_switch: Callable[[int, int, float], None] | None = None
    rung: int = 0
    _rates: dict[int, float] = field(default_factory=dict)
    _last_switch: float = float("-inf")
    _room_since: float | None = None  # since when the rung above would have kept within step_up x the target

    def __post_init__(self) -> None:
        if not self.latency_target > 0:
            raise ValueError(f"latency_target={self.latency_target!r} is invalid: use a number of seconds > 0.")
        if not 0 < self.step_up < self.step_down <= 1:
            raise ValueError("Need 0 < step_up < step_down <= 1 (the gap between them is the hysteresis).")

    @property
    def spec(self) -> ExitSpec:
        return self.ladder.rungs[self.rung].spec

    def rate(self, index: int) -> float | None:
        """Texts per second at rung `index`: learned, else scaled by mean layers from the nearest learned rung."""
        if index in self._rates:
            return self._rates[index]
        if not self._rates:
            return None
        known = min(self._rates, key=lambda k: abs(k - index))
        return self._rates[known] * self.ladder.layers(known) / self.ladder.layers(index)

    def predicted_wait(self, index: int, queued: int, oldest_wait: float) -> float:
        """Seconds a request arriving now would wait at rung `index` (0 while nothing is known)."""
        rate = self.rate(index)
        return oldest_wait + (queued / rate if rate else 0.0)

    def choose(self, queued: int, oldest_wait: float) -> Decision:
        """The rung for the next micro-batch, given the texts waiting (this batch's too) and the oldest's age."""
        now = self.clock()
        current = self.predicted_wait(self.rung, queued, oldest_wait)
        room = self.rung > 0 and self.predicted_wait(self.rung - 1, queued, oldest_wait) < (
            self.step_up * self.latency_target
        )
        self._room_since = (self._room_since if self._room_since is not None else now) if room else None
        target = self.rung
        if now - self._last_switch >= self.min_dwell:
            if current > self.step_down * self.latency_target:
                target = self._lowest_needed(queued, oldest_wait)
            elif room and now - self._room_since >= self.climb_after:
                target = self.rung - 1
        if target == self.rung:
            return Decision(self.rung, current)
        previous, self.rung, self._last_switch, self._room_since = self.rung, target, now, None
        if self.on_switch is not None:
            self.on_switch(previous, target, current)
        return Decision(target, current, switched=True)

    def _lowest_needed(self, queued: int, oldest_wait: float) -> int:
        """The highest rung below the current one whose predicted wait fits (else the bottom rung)."""
        bound = self.step_down * self.latency_target
        for index in range(self.rung + 1, len(self.ladder.rungs)):
            if self.predicted_wait(index, queued, oldest_wait) <= bound:
                return index
        return len(self.ladder.rungs) - 1

    def observe(self, index: int, texts: int, seconds: float) -> None:
        """A batch of `texts` took `seconds` at rung `index`: update that rung's rate."""
        if texts <= 0 or seconds <= 0:
            return
        rate = texts / seconds
        previous = self._rates.get(index)
        self._rates[index] = rate if previous is None else 0.7 * previous + 0.3 * rate


class ExitChoice:
    """Which exit setting each text of a micro-batch runs: a request's own, when the operator allows clients to
    choose (`allow_request_exit`), else the server's: `default` (the top of the ladder), or the rung a
    `LoadController` picks for the batch. A client's setting is honoured as sent: the floor bounds only the
    controller's own choices.

    Args:
        default: the server's setting at light load (the pipeline's).
        model: the model's config (what a request's setting is checked against: `pabee.rules.build_criterion`).
        controller: picks a rung per micro-batch (None: always `default`); each rung is checked against `model`
            here, so a setting the model cannot run stops the server at start, not a batch under load.
    """

    def __init__(
        self,
        default: ExitSpec,
        model: Any,
        controller: LoadController | None = None,
        allow_request_exit: bool = False,
    ) -> None:
        self.default, self.model, self.controller = default, model, controller
        self.allow_request_exit = allow_request_exit
        self._rungs = {} if controller is None else {r.spec: i for i, r in enumerate(controller.ladder.rungs)}
        for spec in self._rungs:  # at start: a rung the model cannot run would fail every batch load sends to it
            try:
                build_criterion(spec, model)
            except ValueError as error:
                message = f"The exit ladder's setting {spec.title!r} does not fit this model: {error}"
                raise ValueError(message) from None

    @property
    def current(self) -> ExitSpec:
        """The server's setting now (what a request without its own gets)."""
        return self.default if self.controller is None else self.controller.spec

    def for_request(self, option: Any) -> ExitSpec | None:
        """A request's `"exit"` (`"full"`, or exit keywords over the server's default) as a setting checked against
        the model; None when the request left it to the server. A `PermissionError` when clients may not choose,
        a `ValueError` naming what is wrong."""
        if option is None:
            return None
        if not self.allow_request_exit:
            raise PermissionError(
                "This server chooses the exit setting itself; its operator can let clients choose "
                "(pabee serve --allow_request_exit)."
            )
        spec = ExitSpec("patience", patience=0) if option == "full" else exit_spec_from(option, self.default)
        if spec.threshold is not None and (
            isinstance(spec.threshold, bool) or not isinstance(spec.threshold, (int, float))
        ):
            raise ValueError(f"the threshold must be a number; got {spec.threshold!r}.")
        build_criterion(spec, self.model)  # patience and max_exit_layer: whole numbers in range
        return spec

    def choose(self, queued: int, oldest_wait: float) -> ExitSpec:
        """The setting of a micro-batch's texts that came without their own."""
        if self.controller is None:
            return self.default
        self.controller.choose(queued, oldest_wait)
        return self.controller.spec

    def observe(self, chosen: ExitSpec | None, texts_at_chosen: int, texts: int, seconds: float) -> None:
        """A batch took `seconds`: teach the controller the rate of its rung when every text ran on it."""
        if self.controller is not None and chosen in self._rungs and texts_at_chosen == texts:
            self.controller.observe(self._rungs[chosen], texts, seconds)
