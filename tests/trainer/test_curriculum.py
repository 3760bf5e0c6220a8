"""Difficulty-aware leasing (trainer/curriculum.py): estimates from accepted groups, the
replayable coin, and how a fresh draw passes over settled prompts. Hand-computed numbers."""

import struct

import blake3
import pytest

from trainer.curriculum import POOL_WINDOW, Curriculum, coin
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


def test_group_size_grows_for_prompts_whose_groups_would_be_flat():
    c = Curriculum(pool_seed=0, full_reward=1.0, window=1)
    assert c.group_size(0, base=16, largest=64) == 16  # no estimate yet
    c.add(1, 0, [1.0] + [0.0] * 15)
    # p = (1 + 0.5) / (16 + 1) = 0.0882; 0.9118^G <= 0.1 from G = ln 0.1 / ln 0.9118 = 24.9
    assert c.group_size(0, base=16, largest=64) == 25
    assert c.group_size(0, base=16, largest=20) == 20  # capped
    assert c.group_size(0, base=16, largest=0) == 16  # off
    c.add(2, 0, [1.0] * 15 + [0.0])  # the mirror image: as likely to be flat, all solved
    assert c.group_size(0, base=16, largest=64) == 25
    c.add(3, 0, [1.0] * 8 + [0.0] * 8)  # p = 0.5: G = 3.3 would do, never below the base
    assert c.group_size(0, base=16, largest=64) == 16
    c.add(4, 0, [0.0] * 16)  # never solved: p = 0.5 / 17 = 0.029, G = 77.1, capped
    assert c.group_size(0, base=16, largest=64) == 64
    # Graded rewards (the demo's copy task gives 0, 0.5 or 1): the most common value's share
    # says how likely a flat group is, as the pass rate does for 0/1 rewards.
    c.add(5, 1, [0.5] * 16)  # all alike: q = 16.5 / 17 = 0.9706, G = 77.1, capped
    assert c.group_size(1, base=16, largest=64) == 64
    c.add(6, 2, [0.5] + [0.0] * 15)  # q = 15.5 / 17, as for one success in 16 above
    assert c.group_size(2, base=16, largest=64) == 25
    c.add(7, 3, [0.5] * 12 + [1.0] * 2 + [0.0] * 2)  # q = 12.5 / 17 = 0.735: G = 7.5 will do
    assert c.group_size(3, base=16, largest=64) == 16


def test_a_prompt_not_seen_yet_is_sized_from_the_pools_newest_groups():
    c = Curriculum(pool_seed=0, full_reward=1.0)
    assert c.group_size(7, base=16, largest=64) == 16  # nothing accepted anywhere yet
    c.add(1, 0, [1.0] + [0.0] * 15)
    c.add(2, 1, [0.0] * 16)
    # prompt 7 has no group: the pool's 1 of 32, p = 1.5 / 33 = 0.04545, G = ln 0.1 /
    # ln 0.95455 = 49.5
    assert c.group_size(7, base=16, largest=64) == 50
    assert c.group_size(0, base=16, largest=64) == 25  # a prompt's own record comes first
    for i in range(POOL_WINDOW):  # the pool's window moves on: only its newest groups count
        c.add(3 + i, 2, [1.0] * 8 + [0.0] * 8)
    assert c.group_size(7, base=16, largest=64) == 16
    c.add(100, 3, [0.5] * 16)  # 120 of the window's 256 samples earned 0: q = 0.47
    assert c.group_size(7, base=16, largest=64) == 16


def test_a_lease_holds_at_most_its_samples_and_always_one_prompt():
    book = LeaseBook(pool_seed=3, n_prompts=1000)
    sizes = {p: 16 for p in range(1000)}
    plain = book.plan(NODE, 0, 4)
    assert book.plan(NODE, 0, 4, size=sizes.__getitem__, samples=64) == plain
    sizes[plain[1]] = 40  # the second draw needs 40 of the 48 left: it fits, and ends it
    assert book.plan(NODE, 0, 4, size=sizes.__getitem__, samples=64) == plain[:2]
    sizes[plain[0]] = 64  # the first takes the whole lease, and a lease takes at least one
    assert book.plan(NODE, 0, 4, size=sizes.__getitem__, samples=64) == plain[:1]
    sizes[plain[0]] = 100
    assert book.plan(NODE, 0, 4, size=sizes.__getitem__, samples=64) == plain[:1]


def test_an_orphan_too_large_for_what_is_left_waits_first_in_line():
    book = LeaseBook(pool_seed=3, n_prompts=1000)
    sizes = {p: 16 for p in range(1000)}
    sizes[5] = 64
    book.return_prompts([1, 5, 2])
    first = book.plan(NODE, 0, 4, size=sizes.__getitem__, samples=64)
    assert first[0] == 1 and len(first) == 4 and 5 not in first  # fresh draws fill the rest
    assert book.plan(NODE, 1, 4, size=sizes.__getitem__, samples=64) == [5]
    assert book.plan(NODE, 2, 1) == [2] and book.orphan_count == 0
