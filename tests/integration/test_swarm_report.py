"""Figures of the simulated swarm's report that are computed from the ledger, hand-checked."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from swarm import (
    ASCII_MARKS,
    KINDS,
    MARKS,
    cheater_slots,
    marks_for,
    pace,
    plot_reward,
    reward_curve,
    sparkline,
)


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


def test_a_sparkline_marks_each_value_in_eighths_of_the_range():
    # (v - lo) / (hi - lo) * 8, floored, clamped to the 8 marks: 0 -> 0, 0.124 -> 0,
    # 0.125 -> 1, 0.49 -> 3, 0.5 -> 4, 0.99 -> 7, 1 -> 8 clamped to 7, -0.5 -> clamped to 0
    values = [0.0, 0.124, 0.125, 0.49, 0.5, 0.99, 1.0, -0.5]
    assert sparkline(values, 0.0, 1.0, "01234567") == "00134770"
    # another range: 2 on [0, 4] is half way
    assert sparkline([2.0], 0.0, 4.0, "01234567") == "4"
    assert sparkline([0.0, 1.0], 0.0, 1.0) == MARKS[0] + MARKS[-1]


def test_the_summary_falls_back_to_ascii_marks_where_the_terminal_cannot_print_blocks():
    assert marks_for("utf-8") == MARKS
    assert marks_for("ascii") == ASCII_MARKS
    assert marks_for("latin-1") == ASCII_MARKS
    assert marks_for(None) == ASCII_MARKS
    assert marks_for("no-such-codec") == ASCII_MARKS


def test_the_reward_curve_is_in_version_order_whether_keys_are_ints_or_json_strings():
    assert reward_curve({10: 0.9, 2: 0.1, 3: 0.2}) == ([2, 3, 10], [0.1, 0.2, 0.9])
    assert reward_curve({"10": 0.9, "2": 0.1}) == ([2, 10], [0.1, 0.9])


def test_the_reward_curve_is_drawn_as_a_png(tmp_path):
    report = {
        "model": "tiny-digits",
        "task": {"name": "copy"},
        "steps": 3,
        "seconds": 12.0,
        "reward": {"by_version": {"0": 0.05, "1": 0.4, "2": 0.9}},
        "waste": {"share": 0.1},
    }
    path = tmp_path / "report-reward.png"
    assert plot_reward(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
