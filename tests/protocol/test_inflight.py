"""The byte budget behind the host's in-flight limits, on its own."""

from __future__ import annotations

import pytest

from protocol.inflight import InflightBudget, OverBudget, Share


def test_inflight_budget_accounting():
    budget = InflightBudget(per_peer=10, total=15)
    budget.reserve("a", 6)
    with pytest.raises(OverBudget) as e:
        budget.reserve("a", 5)
    assert e.value.scope == "peer"
    budget.reserve("b", 9)
    with pytest.raises(OverBudget) as e:
        budget.reserve("c", 1)
    assert e.value.scope == "total"
    budget.release("a", 6)
    budget.reserve("c", 6)
    assert (budget.held, budget.held_by("a"), len(budget)) == (15, 0, 2)
    budget.release("b", 9)
    budget.release("c", 6)
    assert budget.held == 0 and len(budget) == 0
    with pytest.raises(ValueError):
        InflightBudget(per_peer=20, total=10)


def test_a_share_and_the_small_reserve():
    budget = InflightBudget(per_peer=10, total=30, small_reserve=8, small_frame=2)
    crowd = Share("crowd", 12)
    budget.reserve("a", 7, crowd)
    with pytest.raises(OverBudget) as e:
        budget.reserve("b", 6, crowd)  # b's own budget has room; the crowd's does not
    assert e.value.scope == "share"
    budget.reserve("b", 5, crowd)
    budget.reserve("c", 10)  # outside the crowd: 22 held, the large frames' limit
    with pytest.raises(OverBudget) as e:
        budget.reserve("d", 3)
    assert e.value.scope == "total"
    for peer in "defg":
        budget.reserve(peer, 2)  # small frames use the reserve
    with pytest.raises(OverBudget):
        budget.reserve("h", 1)  # 30 held
    budget.release("a", 7, crowd)
    assert budget.held_by_share("crowd") == 5
    budget.release("b", 5, crowd)
    assert budget.held_by_share("crowd") == 0 and budget.held == 18
    with pytest.raises(ValueError):
        InflightBudget(per_peer=5, total=10, small_reserve=10)
