"""Rate refusals per identity: tallied in memory with a bound, written to the ledger in one
transaction every few seconds, read back as part of what each node cost the pool."""

import trio
import trio.testing

from protocol.host import ErrorCode
from protocol.identity import Identity, peer_id_of
from tests.trainer.pools import tiny_coordinator
from trainer.ledger import Ledger
from trainer.refusals import FLUSH_EVERY_S, RefusalTally, record_refusals_forever


def _peer() -> tuple[str, bytes]:
    key = Identity.generate().public_key
    return peer_id_of(key), key


def test_the_tally_counts_per_key_forgets_on_drain_and_stays_bounded():
    tally = RefusalTally(max_peers=2)
    (a, key_a), (b, key_b), (c, _) = _peer(), _peer(), _peer()
    for peer in (a, a, b, c, "not-a-peer-id"):
        tally.add(peer)
    tally.add(b)
    # c came third, past the bound: uncounted; a known peer still counts once full
    assert tally.drain() == {key_a: 2, key_b: 2}
    assert tally.drain() == {}
    tally.add(c)  # room again after a drain
    assert list(tally.drain().values()) == [1]


def test_garbage_peer_ids_are_dropped_not_raised():
    tally = RefusalTally()
    tally.add("not-a-peer-id")
    assert tally.drain() == {}


def test_a_flood_of_refusals_reaches_its_members_ledger_row_and_only_rate_counts(tmp_path):
    coord = tiny_coordinator(tmp_path)
    flooder, calm, stranger = _peer(), _peer(), _peer()
    for peer_id, key in (flooder, calm):
        coord.ledger.join(key, peer_id, {}, "hf", 1.0)

    async def scenario() -> None:
        for _ in range(3):
            coord.on_refusal(flooder[0], ErrorCode.RATE_LIMITED, "too many requests")
        coord.on_refusal(stranger[0], ErrorCode.RATE_LIMITED, "too many requests")
        coord.on_refusal(calm[0], ErrorCode.TIMEOUT, "no request in time")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record_refusals_forever, coord.refusals, coord.ledger)
            await trio.sleep(FLUSH_EVERY_S + 0.5)
            coord.on_refusal(flooder[0], ErrorCode.RATE_LIMITED, "too many requests")
            await trio.sleep(FLUSH_EVERY_S)
            nursery.cancel_scope.cancel()

    try:
        trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
        rows = {r["key"]: r for r in coord.ledger.contributions()}
        assert rows[flooder[1]]["rate_refusals"] == 4  # two flushes add up
        assert rows[calm[1]]["rate_refusals"] == 0  # a timeout is not a rate refusal
        assert stranger[1] not in rows  # never joined: no row made for it
    finally:
        coord.close()


def test_the_count_survives_a_reopened_ledger(tmp_path):
    _, key = _peer()
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.join(key, peer_id_of(key), {}, "hf", 1.0)
    ledger.add_rate_refusals({key: 7})
    ledger.close()
    again = Ledger(tmp_path / "ledger.sqlite")
    try:
        assert again.contributions()[0]["rate_refusals"] == 7
    finally:
        again.close()


def test_a_proving_refusal_of_an_identity_that_cannot_be_a_member_is_dropped(tmp_path):
    """A peer with a secp256k1 key speaks Noise like anyone, and may send past a window or a
    malformed frame; it can never be a member (pool keys are ed25519), so its refusal costs
    nothing and must not raise inside the transport."""
    from libp2p.crypto.secp256k1 import create_new_key_pair
    from libp2p.peer.id import ID

    coord = tiny_coordinator(tmp_path)
    other = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    member_id, key = _peer()
    coord.ledger.join(key, member_id, {}, "hf", 1.0)
    try:
        coord.on_refusal(other, ErrorCode.BAD_REQUEST, "sent past a stream's receive window")
        coord.on_refusal(member_id, ErrorCode.BAD_REQUEST, "sent past a stream's receive window")
        rows = {r["key"]: r for r in coord.ledger.contributions()}
        assert list(rows) == [key]
        assert coord.ledger.node(key)["reputation"] == -0.5  # the member paid one strike
    finally:
        coord.close()
