"""The byte budget behind the host's in-flight limits, on its own."""

from __future__ import annotations

import pytest

from protocol.inflight import InflightBudget, OverBudget


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
