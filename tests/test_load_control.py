"""The exit ladder and the load controller, on a simulated clock and queue: when it steps down, when it climbs
back, that it does not flap, and that the floor is never crossed."""

from __future__ import annotations

import json

import pytest

from pabee import ExitSpec
from pabee.load_control import ExitChoice, Ladder, LoadController, Rung
from pabee.rules import Traits

FULL = ExitSpec("patience", patience=0)
RUNGS = (
    Rung(FULL, 0.0, 6.0),
    Rung(ExitSpec("confidence", threshold=0.9), 0.005, 4.0),
    Rung(ExitSpec("confidence", threshold=0.8), 0.015, 3.0),
    Rung(ExitSpec("confidence", threshold=0.6), 0.08, 1.5),
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def controller(target: float = 0.1, **kwargs) -> tuple[LoadController, Clock]:
    clock = Clock()
    control = LoadController(Ladder(RUNGS, 6), target, clock=clock, **kwargs)
    control.observe(0, 100, 1.0)  # the full model: 100 texts a second
    return control, clock


def test_at_light_load_the_top_rung_answers():
    control, clock = controller()
    for _ in range(20):
        clock.now += 1.0
        assert control.choose(queued=2, oldest_wait=0.005).rung == 0  # 25 ms predicted, target 100 ms


def test_a_step_in_load_goes_down_at_once_to_the_rung_that_fits():
    control, clock = controller()
    clock.now = 10.0
    # 12 texts waiting, the oldest 10 ms: full 130 ms > 80 ms; confidence 0.9 (4 layers: 150/s) 90 ms; 0.8
    # (3 layers: 200/s) 70 ms fits. The rates of unmeasured rungs scale with their mean layers.
    decision = control.choose(queued=12, oldest_wait=0.01)
    assert decision.switched and decision.rung == 2 and decision.predicted_wait == pytest.approx(0.13)
    assert control.rate(2) == pytest.approx(200.0)


def test_no_flapping_within_the_dwell_time_and_back_up_when_there_is_room():
    switches = []
    control, clock = controller(on_switch=lambda a, b, wait: switches.append((a, b)))
    clock.now = 10.0
    control.choose(queued=12, oldest_wait=0.01)
    clock.now += 0.1  # within min_dwell (0.5 s): no switch, however the load moves
    assert control.choose(queued=0, oldest_wait=0.0).rung == 2
    assert control.choose(queued=40, oldest_wait=0.05).rung == 2
    clock.now += 0.6
    # Light again: up one rung at a time, each once the rung above has kept under 40 ms for 2 s in a row.
    assert control.choose(queued=1, oldest_wait=0.001).rung == 2  # room seen from now on
    clock.now += 1.0
    assert control.choose(queued=1, oldest_wait=0.001).rung == 2
    clock.now += 1.0
    assert control.choose(queued=1, oldest_wait=0.001).rung == 1
    clock.now += 1.0
    assert control.choose(queued=6, oldest_wait=0.005).rung == 1  # no room (65 ms at the top): counts anew
    clock.now += 1.5
    assert control.choose(queued=1, oldest_wait=0.001).rung == 1
    clock.now += 2.0
    assert control.choose(queued=1, oldest_wait=0.001).rung == 0
    assert switches == [(0, 2), (2, 1), (1, 0)]


def test_between_the_thresholds_it_stays_where_it_is():
    control, clock = controller()
    clock.now = 10.0
    control.choose(queued=12, oldest_wait=0.01)  # down to rung 2
    clock.now += 5.0
    # At rung 1 a request would wait 5 ms + 6 / 150 s = 45 ms: above 40 ms (up), below 80 ms (down) at rung 2.
    assert not control.choose(queued=6, oldest_wait=0.005).switched


def test_under_any_load_the_controller_stays_on_the_ladder_above_its_floor():
    ladder = Ladder(RUNGS, 6).floored(0.02)  # confidence 0.6 changed 8% of the answers: never used
    assert [r.spec for r in ladder.rungs] == [r.spec for r in RUNGS[:3]]
    clock = Clock()
    control = LoadController(ladder, 0.1, clock=clock)
    control.observe(0, 100, 1.0)
    for queued in (10, 100, 1000, 10_000):
        clock.now += 1.0
        assert control.choose(queued=queued, oldest_wait=1.0).rung == 2  # the bottom rung above the floor


def test_learned_rates_replace_the_layer_estimate():
    control, _ = controller()
    control.observe(2, 30, 0.1)  # 300 texts a second measured at confidence 0.8
    assert control.rate(2) == pytest.approx(300.0)
    control.observe(2, 10, 0.1)  # a moving average: 0.7 x 300 + 0.3 x 100
    assert control.rate(2) == pytest.approx(240.0)


def test_bad_controller_settings_are_refused():
    with pytest.raises(ValueError, match="latency_target=0"):
        LoadController(Ladder(RUNGS, 6), 0)
    with pytest.raises(ValueError, match="step_up < step_down"):
        LoadController(Ladder(RUNGS, 6), 0.1, step_up=0.9, step_down=0.8)


def test_a_ladder_takes_the_servers_setting_as_its_top(tmp_path):
    ladder = Ladder(RUNGS, 6)
    assert ladder.with_top(RUNGS[1].spec).rungs == RUNGS[1:]
    patience = ExitSpec("patience", patience=3)
    assert ladder.with_top(patience).rungs == (Rung(patience), *RUNGS[1:])  # not on the ladder: on top of it
    path = tmp_path / "exit_ladder.json"
    path.write_text(json.dumps({"rungs": [{**r.spec.keywords(), "disagreement": r.disagreement,
                                           "layers": r.layers} for r in RUNGS]}))  # fmt: skip
    assert Ladder.from_file(path, 6).rungs == RUNGS


def test_a_requests_own_setting_is_checked_against_the_model():
    model = Traits(num_hidden_layers=6)
    closed = ExitChoice(FULL, model)
    assert closed.for_request(None) is None
    with pytest.raises(PermissionError, match="--allow_request_exit"):
        closed.for_request({"patience": 2})
    choice = ExitChoice(ExitSpec("confidence", threshold=0.8), model, allow_request_exit=True)
    assert choice.for_request("full") == FULL
    assert choice.for_request({"exit_threshold": 0.9}) == ExitSpec("confidence", threshold=0.9)
    assert choice.for_request({"patience": 2}) == ExitSpec("patience", patience=2)
    for bad, message in (
        ({"patients": 2}, "Unknown exit option 'patients'"),
        ({"patience": "2"}, "patience='2' is invalid: use a whole number"),
        ({"patience": True}, "patience=True is invalid: use a whole number"),
        ({"max_exit_layer": 2.5}, "max_exit_layer=2.5 is invalid: use a whole number"),
        ({"exit_threshold": "high"}, "the threshold must be a number"),
        ({"exit_threshold": 1.5}, "threshold 1.5 is invalid for 'confidence'"),
        ({"exit_criterion": "static", "exit_threshold": 9}, "static exit at layer 9 is impossible"),
        ({"exit_criterion": "fastest"}, "exit_criterion='fastest' is unknown"),
    ):
        with pytest.raises(ValueError, match=message):
            choice.for_request(bad)
