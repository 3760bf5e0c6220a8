"""The messages between nodes and the coordinator.

Every one travels inside a signed envelope (`protocol.envelope`). The coordinator keeps its own
copy of every lease; a submission names its lease by id and is checked against that copy, so a
node's word on what it was asked is never used.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from protocol.environments import MAX_TURNS
from protocol.wire import Message, PublicKey, ShortStr, UInt

TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Version = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Tokens = Annotated[list[TokenId], msgspec.Meta(max_length=1 << 16)]
Urls = Annotated[list[ShortStr], msgspec.Meta(max_length=32)]
BytesByUrl = Annotated[dict[ShortStr, UInt], msgspec.Meta(max_length=32)]
# A rate a node reports of itself (shown, never relied on): finite and non-negative, so no NaN
# or infinity reaches the ledger, the dashboard or a sum.
Rate = Annotated[float, msgspec.Meta(ge=0.0, le=1e12)]

# Stream protocols the coordinator serves, and the gossip topic name of version announcements
# (see `protocol.host.pool_topic`).
JOIN_PROTOCOL = "/swarmrl/join/1.0.0"
LEASE_PROTOCOL = "/swarmrl/lease/1.0.0"
SUBMIT_PROTOCOL = "/swarmrl/submit/1.0.0"
HEARTBEAT_PROTOCOL = "/swarmrl/heartbeat/1.0.0"
RELEASE_PROTOCOL = "/swarmrl/release/1.0.0"
VERSIONS_TOPIC = "versions"

# What a reply means, as a code the receiver branches on; `reason` is only for people.
JoinCode = Literal["ok", "banned", "busy", "bad_pow"]
"""busy: the pool admits no more new identities right now (retry after `retry_after_s`)."""
LeaseCode = Literal["ok", "fetch_weights", "finished", "busy", "quota", "banned"]
"""fetch_weights: the node's weights are too old; busy: enough work is in flight pool-wide;
quota: this node holds all the leases its record allows."""
ReceiptCode = Literal["queued", "repeat", "released", "late", "refused", "too_large", "busy"]
"""repeat: the same answer was recorded before (its first receipt); late: the lease closed
(no penalty); refused: a lie or a replay (penalised); busy: the validation queue is full."""
HeartbeatCode = Literal["ok", "not_joined", "banned"]
RelayCheck = Literal["none", "ok", "unreachable", "refused", "failed"]
"""The coordinator's checks of the relay URL a node advertised: none yet (or no URL), the
latest passed, every one for a while found nobody answering there, never checked because it
names another address than the node connects from, or the latest failed otherwise (see
`trainer.relays.RelayDirectory.check_of`)."""


class Hardware(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    device: ShortStr
    device_name: ShortStr = ""
    memory_bytes: UInt = 0
    cpu_count: UInt = 0
    tokens_per_s: Rate = 0.0
    """Measured by a short generation self-test at start-up."""


class JoinRequest(Message, tag="join"):
    hardware: Hardware
    engine: Literal["hf", "vllm"]
    software: ShortStr
    relay_url: ShortStr = ""
    """Where this node re-serves weight shards, if it does (`--relay`)."""
    pow_nonce: UInt = 0
    """Proof of work for a new identity: BLAKE3(pool id, key, nonce) must start with the
    spec's `limits.join_pow_bits` zero bits (see `protocol.pow`)."""
    fresh_start: bool = False
    """This node's process has just started and holds no lease: any lease still open under
    its key died with an earlier process, and is released (as if the node had released it)."""


class JoinReply(Message, tag="join-reply"):
    accepted: bool
    code: JoinCode = "ok"
    reason: ShortStr = ""
    retry_after_s: float = 0.0
    current_version: Version = 0
    heartbeat_s: float = 15.0
    weights_urls: Urls = msgspec.field(default_factory=list)
    """SHARDCAST sources (origin, relays, relaying nodes); manifests are signed, so a wrong
    URL costs time, never correctness."""


class SamplingWire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    temperature: float
    top_k: UInt
    top_p: float
    max_new_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    eos_token_ids: Annotated[list[TokenId], msgspec.Meta(max_length=16)]


class LeaseTask(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prompt_index: UInt
    prompt_ids: Tokens
    seed: Seed
    """Seeds the Gumbel noise of every sample of this task (sample i uses index i)."""
    group_size: Annotated[int, msgspec.Meta(ge=1, le=1024)]


class LeaseRequest(Message, tag="lease-request"):
    weight_version: Version
    """The newest weights this node holds."""
    wait_s: Annotated[float, msgspec.Meta(ge=0.0, le=60.0)] = 0.0
    """How long the node will wait for an answer when the pool has enough work in flight:
    the coordinator may hold the request (up to its own cap) and lease the moment the trainer
    needs more, instead of answering `busy` at once. A held request that found no work comes
    back `busy` with `retry_after_s` 0: ask again at once."""


class Lease(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    lease_id: UInt
    node: PublicKey
    counter: UInt
    weight_version: Version
    """The version to generate with (the newest the node holds that is still allowed)."""
    min_version: Version
    """Oldest version the coordinator will still accept for this lease."""
    tasks: Annotated[list[LeaseTask], msgspec.Meta(max_length=256)]
    sampling: SamplingWire
    deadline_ms: UInt


class LeaseReply(Message, tag="lease-reply"):
    max_bytes = 4 * 1024 * 1024
    lease: Lease | None = None
    code: LeaseCode = "ok"
    retry_after_s: float = 0.0
    reason: ShortStr = ""


class Completion(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    tokens: Tokens
    """Single-turn: the completion. Multi-turn: the whole transcript after the prompt, model
    turns and environment replies (`protocol.transcript`)."""
    logprobs: Annotated[list[float], msgspec.Meta(max_length=1 << 16)]
    """One per model-generated token."""
    finish_reason: Literal["stop", "length"]
    """How the (last) model turn ended."""
    proofs: Annotated[list[bytes], msgspec.Meta(max_length=4096)]
    """TOPLOC proofs of the model-generated tokens' rows, 32 per proof."""
    segments: Annotated[list[UInt], msgspec.Meta(max_length=2 * MAX_TURNS - 1)] = []
    """Multi-turn only: lengths of the alternating model / environment segments of `tokens`
    (left out on the wire when empty, so single-turn bytes are as before)."""


class TaskResult(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    task_index: UInt
    completions: Annotated[list[Completion], msgspec.Meta(max_length=1024)]


class Submission(Message, tag="submission"):
    # A hard ceiling for decoding; the pool's `limits.max_submission_bytes` is checked first.
    max_bytes = 64 * 1024 * 1024
    lease_id: UInt
    weight_version: Version
    results: Annotated[list[TaskResult], msgspec.Meta(max_length=256)]


class Receipt(Message, tag="receipt"):
    lease_id: UInt
    queued: bool
    code: ReceiptCode = "queued"
    submission_id: UInt = 0
    reason: ShortStr = ""


class ReleaseLease(Message, tag="release"):
    lease_id: UInt


class Heartbeat(Message, tag="heartbeat"):
    weight_version: Version
    leases_done: UInt = 0
    tokens_per_s: Rate = 0.0
    weights_from: BytesByUrl = msgspec.field(default_factory=dict)
    """Verified weight bytes this node fetched from each source URL since it started (the
    node's word: shown on the dashboard's relay tree, never relied on)."""


class HeartbeatReply(Message, tag="heartbeat-reply"):
    current_version: Version
    accepted: UInt = 0
    soft_rejected: UInt = 0
    hard_rejected: UInt = 0
    banned: bool = False
    code: HeartbeatCode = "ok"
    reason: ShortStr = ""
    relay_check: RelayCheck = "none"
    """What the coordinator's checks found at this node's relay URL: a node serving over
    HTTP that nobody can reach moves behind the coordinator's hop (node.seeding)."""


class VersionAnnouncement(Message, tag="version"):
    """Gossiped by the coordinator when it publishes new weights."""

    max_bytes = 4096
    version: Version
    base: Version | None = None
    """Set when a delta against this version is published too; a full checkpoint always is."""
    manifest_blake3: Annotated[str, msgspec.Meta(max_length=64)] = ""
    published_ms: UInt = 0
