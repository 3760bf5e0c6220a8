import msgspec
import pytest

from protocol.envelope import Envelope, EnvelopeVerifier, ReplayGuard, seal
from protocol.errors import NotFresh, ProtocolError
from protocol.identity import Identity
from protocol.wire import Message, decode, encode

POOL = "aaaabbbbccccddddeeeeffff"
OTHER_POOL = "bbbbccccddddeeeeffffgggg".replace("g", "2")


class Greeting(Message, tag="test-greeting"):
    text: str
    count: int = 0


class Farewell(Message, tag="test-farewell"):
    text: str


class Small(Message, tag="test-small"):
    max_bytes = 64
    blob: bytes


class Clock:
    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def alice():
    return Identity.generate()


def test_round_trip(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi", count=3), now=clock())
    got = EnvelopeVerifier(POOL, clock=clock).open(raw, Greeting)
    assert got.message == Greeting(text="hi", count=3)
    assert got.signer == alice.public_key
    assert got.raw == raw


def _tamper(raw: bytes, **changes) -> bytes:
    env = decode(raw, Envelope, max_bytes=1 << 20)
    return encode(msgspec.structs.replace(env, **changes))


def test_tampered_body_refused(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    forged = _tamper(raw, body=encode(Greeting(text="ho")))
    with pytest.raises(ProtocolError, match="bad signature"):
        EnvelopeVerifier(POOL, clock=clock).open(forged, Greeting)


@pytest.mark.parametrize("field", ["timestamp_ms", "nonce", "signer", "pool"])
def test_every_header_field_is_signed(alice, field):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    env = decode(raw, Envelope, max_bytes=1 << 20)
    new = {
        "timestamp_ms": env.timestamp_ms + 1,
        "nonce": bytes(16),
        "signer": Identity.generate().public_key,
        "pool": POOL.replace("a", "b"),
    }[field]
    verifier = EnvelopeVerifier(new if field == "pool" else POOL, clock=clock)
    with pytest.raises(ProtocolError, match="bad signature"):
        verifier.open(_tamper(raw, **{field: new}), Greeting)


def test_wrong_signer_refused(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    bob = Identity.generate()
    with pytest.raises(ProtocolError, match="expected"):
        EnvelopeVerifier(POOL, clock=clock).open(raw, Greeting, signer=bob.public_key)
    with pytest.raises(ProtocolError, match="not allowed"):
        EnvelopeVerifier(POOL, clock=clock).open(raw, Greeting, allowed_signer=lambda k: False)


def test_wrong_pool_and_wrong_kind_refused(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    with pytest.raises(ProtocolError, match="for pool"):
        EnvelopeVerifier(OTHER_POOL, clock=clock).open(raw, Greeting)
    with pytest.raises(ProtocolError, match="expected a 'test-farewell'"):
        EnvelopeVerifier(POOL, clock=clock).open(raw, Farewell)


def test_replay_refused(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    verifier = EnvelopeVerifier(POOL, clock=clock)
    verifier.open(raw, Greeting)
    clock.t += 5
    with pytest.raises(NotFresh, match="replayed"):
        verifier.open(raw, Greeting)


def test_stale_and_future_timestamps_refused(alice):
    clock = Clock()
    guard = ReplayGuard(window_s=60, max_skew_s=5)
    verifier = EnvelopeVerifier(POOL, guard=guard, clock=clock)
    old = seal(alice, POOL, Greeting(text="old"), now=clock() - 61)
    with pytest.raises(NotFresh, match="replay window"):
        verifier.open(old, Greeting)
    future = seal(alice, POOL, Greeting(text="future"), now=clock() + 6)
    with pytest.raises(NotFresh, match="future"):
        verifier.open(future, Greeting)
    fine = seal(alice, POOL, Greeting(text="fine"), now=clock() - 59)
    assert verifier.open(fine, Greeting).message.text == "fine"


def test_replay_guard_forgets_expired_nonces_and_is_bounded(alice):
    clock = Clock()
    guard = ReplayGuard(window_s=10, max_skew_s=1, max_entries=3)
    for i in range(3):
        guard.check_and_remember(alice.public_key, bytes([i]) * 16, int(clock() * 1000), clock())
    with pytest.raises(NotFresh, match="full"):
        guard.check_and_remember(alice.public_key, b"\x09" * 16, int(clock() * 1000), clock())
    clock.t += 30  # every remembered nonce has expired
    guard.check_and_remember(alice.public_key, b"\x09" * 16, int(clock() * 1000), clock())


def test_size_limits(alice):
    with pytest.raises(ProtocolError, match="exceeds"):
        seal(alice, POOL, Small(blob=b"x" * 100))
    clock = Clock()
    raw = seal(alice, POOL, Small(blob=b"x" * 10), now=clock())
    assert EnvelopeVerifier(POOL, clock=clock).open(raw, Small).message.blob == b"x" * 10
    huge = raw + b"\x00" * 1000
    with pytest.raises(ProtocolError, match="exceeds"):
        EnvelopeVerifier(POOL, clock=clock).open(huge, Small)


def test_wrong_version_refused(alice):
    clock = Clock()
    raw = seal(alice, POOL, Greeting(text="hi"), now=clock())
    with pytest.raises(ProtocolError, match="wire version 2"):
        EnvelopeVerifier(POOL, clock=clock).open(_tamper(raw, version=2), Greeting)


def test_decode_strictness():
    with pytest.raises(ProtocolError, match="invalid"):
        decode(encode(Farewell(text="x")), Greeting)
    with pytest.raises(ProtocolError, match="malformed"):
        decode(b"\xc1", Greeting)
    with pytest.raises(ProtocolError, match="expected bytes"):
        decode("text", Greeting)  # type: ignore[arg-type]
    extra = msgspec.msgpack.encode({"kind": "test-greeting", "text": "x", "evil": 1})
    with pytest.raises(ProtocolError, match="evil"):
        decode(extra, Greeting)
