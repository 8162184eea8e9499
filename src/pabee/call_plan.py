"""How many layers one sentence climbs per runtime call, chosen from where recent sentences left.

At batch size 1 a call into ONNX Runtime has a fixed cost beside its layers (the `run`, its thread wake, the
feed): ~50 µs against ~165 µs a MiniLM int8 layer, so one call per layer costs a setting under which nothing
leaves 15-25% over the whole graph. A call may run several layers and return every layer's logits: the exit rule
still reads each layer in turn, so the answer and the exit layer are the same as one call per layer, and only
the layers after the exit inside that call are wasted. Which grouping is cheapest depends on where sentences
leave, so a `CallPlan` counts the exit layers of the sentences it served (recent ones weigh more) and chooses the
calls that minimise the expected time: when nobody leaves early, one call to the last layer; when most leave at
the first layer the rule allows, one call per layer, as before. A call's fixed cost, in layers, is the runtime's
(`OnnxPabeeModel.call_cost`); fitting it online to timed calls was tried and read sentence length as call cost
(the sentences that reach the later layers are longer), so it is a setting, not a measurement.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CallPlan", "cheapest_calls"]


def cheapest_calls(reach: np.ndarray, first: int, limit: int, call_cost: float) -> list[int]:
    """The last layer (1-based) of each call that minimises the expected layers run plus `call_cost` (in layers)
    a call, for sentences reaching layer `s` with probability `reach[s]` (`reach[1] == 1`). The first call runs
    layers 1.. at least `first` (no sentence can leave before); every call ends at or before `limit`."""
    best = np.zeros(limit + 2)  # best[s]: expected cost from layer s on
    step = np.zeros(limit + 2, dtype=np.int64)
    for s in range(limit, 0, -1):
        costs = [reach[s] * (t - s + 1 + call_cost) + best[t + 1] for t in range(max(s, first), limit + 1)]
        choice = int(np.argmin(costs))
        best[s], step[s] = costs[choice], max(s, first) + choice
    ends, s = [], 1
    while s <= limit:
        ends.append(int(step[s]))
        s = ends[-1] + 1
    return ends


class CallPlan:
    """The calls one sentence makes under one exit rule, from the exit layers of the sentences served so far.

    Until `warmup` sentences were seen the plan is one call per layer after the rule's earliest exit (the loop's
    own order); then it is re-chosen every `every` sentences from the decayed counts of exit layers.
    """

    def __init__(self, num_layers: int, call_cost: float, warmup: int = 16, every: int = 16, decay: float = 0.98):
        self.call_cost, self.warmup, self.every, self.decay = call_cost, warmup, every, decay
        self.exits = np.zeros(num_layers + 2)  # decayed count of sentences by exit layer (1-based)
        self.seen = 0
        self._ends: dict[tuple[int, int], list[int]] = {}

    def ends(self, first: int, limit: int) -> list[int]:
        """The last layer of each call, for a rule whose earliest exit is `first` and latest `limit`."""
        if self.seen < self.warmup:
            return list(range(first, limit + 1))
        ends = self._ends.get((first, limit))  # read once: a server's other thread may clear the cache
        if ends is None:
            gone = np.cumsum(self.exits)  # gone[s]: sentences that left at layer s or before
            reach = 1.0 - np.concatenate([[0.0], gone[:-1]]) / gone[-1]  # reach[s]: the share that runs layer s
            ends = self._ends[(first, limit)] = cheapest_calls(reach, first, limit, self.call_cost)
        return ends

    def record(self, exit_layer: int) -> None:
        self.exits *= self.decay
        self.exits[exit_layer] += 1
        self.seen += 1
        if self.seen % self.every == 0:
            self._ends.clear()
