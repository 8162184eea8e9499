"""The call plan: which layers one sentence runs per runtime call, from where recent sentences left."""

from __future__ import annotations

import numpy as np
import pytest

from pabee.call_plan import CallPlan, cheapest_calls


def test_nobody_leaving_makes_one_call_and_everybody_leaving_first_one_call_a_layer():
    assert cheapest_calls(np.ones(8), 1, 6, 0.3) == [6]
    leave_at_1 = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert cheapest_calls(leave_at_1, 1, 6, 0.3)[0] == 1


@pytest.mark.parametrize("call_cost", [0.0, 0.3, 1.0, 5.0])
def test_the_chosen_calls_cost_no_more_than_any_other_grouping(call_cost):
    """Against every way to cut 6 layers into calls (the first call reaching the rule's earliest exit, 3)."""
    reach = np.array([1.0, 1.0, 1.0, 1.0, 0.5, 0.4, 0.1, 0.0])

    def cost(ends):
        start, total = 1, 0.0
        for end in ends:
            total += reach[start] * (end - start + 1 + call_cost)
            start = end + 1
        return total

    groupings = []
    for mask in range(1 << 3):  # which of layers 3, 4, 5 end a call (6 always does)
        groupings.append([layer for bit, layer in enumerate((3, 4, 5)) if mask >> bit & 1] + [6])
    chosen = cheapest_calls(reach, 3, 6, call_cost)
    assert chosen[-1] == 6 and chosen[0] >= 3
    assert cost(chosen) <= min(cost(g) for g in groupings) + 1e-12
    if call_cost == 0.0:
        assert chosen == [3, 4, 5, 6]  # free calls: never run a layer a sentence may not need


def test_the_plan_climbs_one_layer_a_call_until_it_has_seen_sentences_then_follows_their_exits():
    plan = CallPlan(6, 0.3, warmup=4, every=4)
    assert plan.ends(2, 6) == [2, 3, 4, 5, 6]
    for _ in range(4):
        plan.record(6)
    assert plan.ends(2, 6) == [6]
    for _ in range(400):  # the recent sentences leave at layer 2: old counts fade
        plan.record(2)
    assert plan.ends(2, 6)[0] == 2
