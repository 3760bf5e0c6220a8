"""Random and mutated bytes into every protocol decoder: only ProtocolError/PoolSpecError."""

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import messages, poolspec
from protocol.envelope import Envelope, EnvelopeVerifier, ReplayGuard, seal
from protocol.errors import PoolSpecError, ProtocolError
from protocol.identity import Identity
from protocol.wire import Message, decode

POOL = "aaaabbbbccccddddeeeeffff"
SIGNER = Identity(bytes(32))


class Sample(Message, tag="fuzz-sample"):
    max_bytes = 4096
    name: str
    values: list[int]
    blob: bytes = b""
    nested: dict[str, float] = msgspec.field(default_factory=dict)


VALID_SAMPLE = seal(SIGNER, POOL, Sample(name="x", values=[1, 2, 3], nested={"a": 1.5}), now=1e9)
SPEC = poolspec.from_dict({"name": "fuzz", "coordinator": {"public_key": "cd" * 32}})
SPEC_BYTES = poolspec.canonical_bytes(SPEC)
SPEC_ID = poolspec.pool_id(SPEC)


@st.composite
def mutated(draw, seed: bytes):
    """A valid input with a few bytes flipped, inserted, deleted, or truncated."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


def _open(data: bytes) -> None:
    verifier = EnvelopeVerifier(POOL, guard=ReplayGuard(window_s=1e12), clock=lambda: 1e9)
    try:
        got = verifier.open(data, Sample)
    except ProtocolError:
        return
    # Anything accepted must be exactly what was signed.
    assert got.signer == SIGNER.public_key
    assert got.message == Sample(name="x", values=[1, 2, 3], nested={"a": 1.5})


@given(st.binary(max_size=5000))
def test_fuzz_envelope_random_bytes(data):
    _open(data)


@given(mutated(VALID_SAMPLE))
def test_fuzz_envelope_mutated(data):
    _open(data)


@given(st.binary(max_size=5000))
def test_fuzz_message_decode_random(data):
    with contextlib.suppress(ProtocolError):
        decode(data, Sample)


@given(mutated(msgspec.msgpack.encode(Sample(name="x", values=[1], blob=b"\x00" * 30))))
def test_fuzz_message_decode_mutated(data):
    with contextlib.suppress(ProtocolError):
        decode(data, Sample)


@given(mutated(msgspec.msgpack.encode(msgspec.msgpack.decode(VALID_SAMPLE))))
def test_fuzz_raw_envelope_struct(data):
    with contextlib.suppress(ProtocolError):
        decode(data, Envelope, max_bytes=8192)


@given(st.one_of(st.binary(max_size=3000), mutated(SPEC_BYTES)))
def test_fuzz_pool_spec_from_peer(data):
    try:
        spec = poolspec.from_canonical(data, SPEC_ID)
    except PoolSpecError:
        return
    assert poolspec.pool_id(spec) == SPEC_ID


@given(st.one_of(st.text(max_size=2000), mutated(poolspec.dumps(SPEC).encode())))
def test_fuzz_pool_spec_toml(text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    with contextlib.suppress(PoolSpecError):
        poolspec.loads(text)


def test_valid_inputs_still_decode():
    """The fuzz seeds themselves are accepted, so the tests above exercise real parsing."""
    _open(VALID_SAMPLE)
    with pytest.raises(ProtocolError):
        _open_strict(VALID_SAMPLE[:-1])
    assert poolspec.from_canonical(SPEC_BYTES, SPEC_ID) == SPEC


def _open_strict(data: bytes) -> None:
    EnvelopeVerifier(POOL, guard=ReplayGuard(window_s=1e12), clock=lambda: 1e9).open(data, Sample)


# The node <-> coordinator messages, each seeded with a valid instance and then mutated.
_SAMPLING = messages.SamplingWire(
    temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=8, eos_token_ids=[2]
)
_COMPLETION = messages.Completion(
    tokens=[5, 6, 2], logprobs=[-0.5, -1.0, -0.1], finish_reason="stop", proofs=[b"\x01" * 258]
)
SEEDS = [
    messages.JoinRequest(
        hardware=messages.Hardware(device="cpu", memory_bytes=1 << 30), engine="hf", software="0.1"
    ),
    messages.LeaseReply(
        lease=messages.Lease(
            lease_id=1,
            node=bytes(32),
            counter=0,
            weight_version=3,
            min_version=1,
            tasks=[messages.LeaseTask(prompt_index=4, prompt_ids=[1, 2, 3], seed=99, group_size=4)],
            sampling=_SAMPLING,
            deadline_ms=10**12,
        )
    ),
    messages.Submission(
        lease_id=1,
        weight_version=3,
        results=[messages.TaskResult(task_index=0, completions=[_COMPLETION] * 2)],
    ),
    messages.Heartbeat(weight_version=2, leases_done=5, tokens_per_s=80.0),
    messages.VersionAnnouncement(version=4, base=3, manifest_blake3="ab" * 32),
]


@pytest.mark.parametrize("seed", SEEDS, ids=lambda m: type(m).__name__)
def test_fuzz_messages(seed):
    data = msgspec.msgpack.encode(seed)
    assert decode(data, type(seed)) == seed

    @given(st.one_of(st.binary(max_size=2000), mutated(data)))
    def check(blob):
        with contextlib.suppress(ProtocolError):
            decode(blob, type(seed))

    check()


@pytest.mark.parametrize("rate", [float("nan"), float("inf"), -1.0])
def test_a_self_reported_rate_must_be_a_finite_non_negative_number(rate: float) -> None:
    """A join's or a heartbeat's `tokens_per_s` is the node's word, stored and shown: NaN,
    infinity or a negative rate is refused at decoding, and never reaches the ledger."""
    join = msgspec.to_builtins(SEEDS[0])
    join["hardware"]["tokens_per_s"] = rate
    beat = {**msgspec.to_builtins(SEEDS[3]), "tokens_per_s": rate}
    for raw, type_ in ((join, messages.JoinRequest), (beat, messages.Heartbeat)):
        with pytest.raises(ProtocolError, match="tokens_per_s"):
            decode(msgspec.msgpack.encode(raw), type_)
