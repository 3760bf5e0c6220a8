"""Difficulty-aware leasing (trainer/curriculum.py): estimates from accepted groups, the
replayable coin, and how a fresh draw passes over settled prompts. Hand-computed numbers."""

import struct

import blake3
import pytest

from trainer.curriculum import Curriculum, coin
from trainer.leases import MAX_SKIPS, LeaseBook, draw
from trainer.ledger import Decision, Ledger, NewGroup

NODE = b"n" * 32


def test_estimates_read_the_recent_window_and_settle_on_equal_rewards():
    c = Curriculum(pool_seed=7, full_reward=1.0, window=2)
    assert c.estimate(3) is None and not c.settled(3)
    c.add(1, 3, [0.0, 0.0])
    assert not c.settled(3)  # one group is not enough evidence
    c.add(2, 3, [0.0, 0.0])
    e = c.estimate(3)
    assert (e.samples, e.solved, e.groups, e.flat) == (4, 0, 2, True) and c.settled(3)
    c.add(3, 3, [1.0, 0.0])  # the window is now [0, 0], [1, 0]: a signal again
    assert not c.settled(3) and c.estimate(3).pass_rate == 0.25
    c.add(4, 3, [1.0, 1.0])
    assert not c.settled(3) and c.estimate(3).pass_rate == 0.75
    c.add(5, 3, [1.0, 1.0])
    assert c.settled(3) and c.estimate(3).pass_rate == 1.0
    c.add(6, 4, [0.5, 0.5])
    c.add(7, 4, [0.5, 0.5])  # equal partial credit: no signal either
    assert c.settled(4) and c.estimate(4).pass_rate == 0.0
    assert c.counts() == {"estimated": 2, "settled_solved": 1, "settled_unsolved": 1}
    assert c.last_group == 7


def test_weighted_full_reward_counts_solved_samples():
    c = Curriculum(pool_seed=0, full_reward=1.5, window=1)
    c.add(1, 0, [1.5, 1.0, 0.5, 1.5])
    assert c.estimate(0).pass_rate == 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="window"):
        Curriculum(0, window=0)
    with pytest.raises(ValueError, match="keep"):
        Curriculum(0, keep=0.0)


def test_the_coin_is_the_documented_hash():
    digest = blake3.blake3(b"curriculum" + struct.pack(">qQQQ", -5, 3, 2, 99)).digest(8)
    assert coin(-5, 3, 2, 99) == int.from_bytes(digest, "big") / 2**64
    coins = [coin(1, 0, 0, s) for s in range(10_000)]
    assert all(0.0 <= x < 1.0 for x in coins)
    assert 0.19 < sum(x < 0.2 for x in coins) / len(coins) < 0.21


def test_keep_always_leases_unsettled_prompts_and_flips_the_coin_for_settled_ones():
    c = Curriculum(pool_seed=1, window=1, keep=0.2)
    c.add(1, 0, [1.0, 0.0])  # a signal
    c.add(2, 1, [1.0, 1.0])  # settled
    assert all(c.keep(0, 0, s) for s in range(200))
    for draws, s in [(0, 0), (1, 0), (0, 5), (4, 17)]:
        assert c.keep(1, draws, s) == (coin(1, 1, draws, s) < 0.2)
    c.add(3, 2, [0.0, 0.0])  # settled, never solved: stays in rotation
    assert c.settled(2) and all(c.keep(2, d, s) for d in range(20) for s in range(20))
    # the draw counter changes the coin: a prompt skipped once is not skipped for good
    assert len({coin(1, 1, d, 0) < 0.2 for d in range(50)}) == 2


def _book_start(book: LeaseBook, counter: int) -> int:
    return draw(book.pool_seed, NODE, counter, 0, b"prompt")


def test_a_draw_passes_over_prompts_keep_turns_down():
    book = LeaseBook(pool_seed=3, n_prompts=5)
    p0 = _book_start(book, 0) % 5
    assert book.plan(NODE, 0, 1) == [p0]
    assert book.plan(NODE, 0, 1, keep=lambda p, s: p != p0) == [(p0 + 1) % 5]
    # a barred prompt is passed over before keep is asked
    book.return_prompts([(p0 + 1) % 5])
    barred = frozenset({(p0 + 1) % 5})
    assert book.plan(b"o" * 32, 0, 1) == [(p0 + 1) % 5]  # the orphan goes elsewhere
    assert book.plan(NODE, 0, 1, keep=lambda p, s: p != p0, barred=barred) == [(p0 + 2) % 5]
    # when keep turns every prompt down, the draw leases the first free one
    assert book.plan(NODE, 0, 1, keep=lambda p, s: False) == [p0]


def test_a_draw_walks_at_most_max_skips_prompts():
    book = LeaseBook(pool_seed=3, n_prompts=1000)
    asked = []

    def never(p: int, s: int) -> bool:
        asked.append(p)
        return False

    assert book.plan(NODE, 0, 1, keep=never) == [_book_start(book, 0) % 1000]
    assert len(asked) == MAX_SKIPS


def test_settled_prompts_are_leased_about_as_often_as_the_hand_computed_share():
    # Prompts 0-4 settled, 5-9 not; keep 0.2. A draw starting on prompt i < 5 walks forward
    # and stops on a settled prompt with chance 1 - 0.8^(5 - i): 0.672, 0.590, 0.488, 0.360,
    # 0.200; a draw starting on 5-9 stops at once. Share of settled: 2.310 / 10 = 0.231
    # (0.5 without the curriculum).
    c = Curriculum(pool_seed=11, window=1, keep=0.2)
    for p in range(10):
        c.add(p + 1, p, [1.0, 1.0] if p < 5 else [0.0, 1.0])
    book = LeaseBook(pool_seed=11, n_prompts=10)
    picks = [book.plan(NODE, n, 1, keep=lambda p, s: c.keep(p, 0, s))[0] for n in range(4000)]
    share = sum(p < 5 for p in picks) / len(picks)
    assert 0.21 < share < 0.25


class _Rules:
    ban_window = 20
    probation_accepts = 2

    @staticmethod
    def ban_reason(standing, decision):
        return None


def _answer(ledger: Ledger, prompts: list[int], outcome: str, rewards: list[list[float]]) -> None:
    lease_id, _, _, _ = ledger.issue_lease(
        NODE, 0.0, 1e9, 0, lambda counter: prompts, lambda i, c, d: ([{}], b"")
    )
    sid = ledger.record_submission(lease_id, NODE, b"raw", 1.0)
    groups = [
        NewGroup(i, p, 0, r, [0.0] * len(r), b"", 1)
        for i, (p, r) in enumerate(zip(prompts, rewards, strict=True))
    ]
    ledger.decide(sid, Decision(outcome, "", groups=groups), _Rules(), 2.0)


def test_the_ledger_feeds_accepted_groups_only_and_counts_draws(tmp_path):
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.join(NODE, "peer", {}, "hf", 0.0)
    _answer(ledger, [4, 5], "accept", [[1.0, 1.0], [0.0, 1.0]])
    _answer(ledger, [4], "soft", [[0.0, 1.0]])  # rejected work is no evidence
    _answer(ledger, [4], "accept", [[1.0, 1.0]])
    c = Curriculum(pool_seed=0, window=2)
    assert c.refresh(ledger.accepted_rewards_since) == 3
    assert c.settled(4) and not c.settled(5) and c.last_group == 4
    assert c.refresh(ledger.accepted_rewards_since) == 0  # nothing new
    assert ledger.prompt_draws(4) == 3 and ledger.prompt_draws(5) == 1
    assert ledger.prompt_draws(6) == 0
    ledger.close()
