"""Figures of the simulated swarm's report that are computed from the ledger, hand-checked."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from swarm import KINDS, cheater_slots, pace


def test_pace_is_the_time_from_a_versions_publish_to_its_first_lease():
    # versions published at 10, 20, 30; first leases on them 0.5, 5.3 and 0.7 s later
    rows = [(10.0, 10.5), (20.0, 25.3), (30.0, 30.7)]
    assert pace(rows) == {"versions": 3, "median_s": 0.7, "max_s": 5.3}
    # an even count takes the mean of the middle two
    assert pace([*rows, (40.0, 41.0)])["median_s"] == 0.85


def test_a_run_with_no_lease_on_any_version_has_no_pace():
    assert pace([]) == {"versions": 0, "median_s": None, "max_s": None}


def test_bounded_cheaters_get_slots_of_their_own_so_every_kind_can_start():
    assert cheater_slots(["wrong-model"]) == 3  # the default demo
    assert cheater_slots(["flood", "lying-relay", "garbage"]) == 5
    # all 19: the 5 bounded kinds run to the end and keep theirs, 3 cycle through the banned
    assert cheater_slots(list(KINDS)) == 8
