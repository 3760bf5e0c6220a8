"""The HTTP API against a small fake `PoolView`: the contributions ledger, what anonymous
callers see, the operator token's parsing, the bounded sample-log tail, and no network I/O."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from trainer.api import create_api
from trainer.dashboard.series import TAIL_BYTES
from trainer.view import Endpoints, PoolInfo, Progress, RelayStatus

TOKEN = "s3cret-operator-token"
ALICE, BOB, CAROL = bytes(range(32)), bytes([0xAB] * 32), bytes([0xAB] * 31 + [0xAC])
IP = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
CONTRIBUTION_KEYS = {
    "key",
    "status",
    "probation",
    "accepted_groups",
    "trained_groups",
    "verified_tokens",
    "validation_s",
    "leases_issued",
    "leases_open",
    "leases_expired",
    "leases_released",
    "soft_faults",
    "rate_refusals",
    "hard_rejected",
    "soft_rejected",
    "accepted",
    "banned",
    "ban_reason",
}


def node_row(key: bytes, **kw: Any) -> dict[str, Any]:
    now = time.time()
    return {
        "key": key,
        "peer_id": f"12D3Koo{key.hex()[:8]}",
        "hardware": '{"device": "cpu", "cpu_count": 4}',
        "engine": "hf",
        "joined_at": now - 100,
        "last_seen": now,
        "weight_version": 3,
        "reputation": 1.0,
        "banned_at": None,
        "ban_reason": None,
        "ban_evidence": None,
        "accepted": 2,
        "soft_rejected": 0,
        "hard_rejected": 0,
        "lease_counter": 4,
        **kw,
    }


def contribution(key: bytes, tokens: int, **kw: Any) -> dict[str, Any]:
    row = {k: 0 for k in CONTRIBUTION_KEYS - {"key", "status", "probation", "banned"}}
    return {
        **row,
        "key": key,
        "last_seen": time.time() - 40,  # quiet for 40 s: stale
        "weight_version": 1,
        "probation": False,
        "banned": False,
        "ban_reason": None,
        "verified_tokens": tokens,
        "internal_only": "not published",  # a field the ledger may grow: never shown
        **kw,
    }


class FakeLedger:
    def __init__(self) -> None:
        self.rows = {k: node_row(k) for k in (ALICE, BOB, CAROL)}

    def nodes(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows.values()]

    def node(self, key: bytes) -> dict[str, Any] | None:
        row = self.rows.get(key)
        return dict(row) if row else None

    def submission(self, submission_id: int) -> dict[str, Any] | None:
        return None

    def recent_submissions(
        self, limit: int, node: bytes | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]:
        return []

    def steps(self, since: int = 0) -> list[dict[str, Any]]:
        return [{"step": 1, "finished_at": 10.0, "metrics": {"reward_mean": 0.5}}]

    def versions(self) -> list[dict[str, Any]]:
        return [{"version": 0, "kind": "full", "base": None, "bytes": 10, "published_at": 1.0}]

    def counts(self) -> dict[str, int]:
        return {"nodes": 3, "banned": 0, "submissions": 0, "pending": 0}

    def groups_page(self, since_id: int, limit: int) -> list[dict[str, Any]]:
        rows = [{"id": i, "node": ALICE, "rewards": [1.0, 0.0], "dropped": None} for i in (1, 2)]
        return [r for r in rows if r["id"] > since_id][:limit]

    def integrity(self) -> dict[str, int]:
        return {"duplicate_groups": 0, "missing_groups": 0}

    def contributions(self) -> list[dict[str, Any]]:
        return [
            contribution(ALICE, 50),
            contribution(BOB, 900, accepted_groups=9, validation_s=1.5),
            contribution(CAROL, 50, banned=True, ban_reason="toploc"),
        ]


class FakeView:
    """A pool whose private data is full of addresses: the operator may see them, nobody else."""

    def __init__(self, folder: Path) -> None:
        self.info = PoolInfo(
            "ab" * 32, "test", "tiny", "bfloat16", "copy", "grpo", 2, 1.0, 0, 1.0, True
        )
        self.ledger = FakeLedger()
        self.samples_path = folder / "samples.jsonl"
        self.completions: list[tuple[str, int, bool, bool]] = []

    def progress(self) -> Progress:
        return Progress(step=1, version=1, resumed_from={"step": 0, "version": 0})

    def endpoints(self) -> Endpoints:
        return Endpoints(
            "ab" * 32,
            "12D3KooWcoord",
            ["/ip4/192.168.7.7/tcp/4001"],
            "http://coordinator.example:8600",
            "http://coordinator.example:8601",
        )

    def weights_urls(self) -> list[str]:
        return ["http://coordinator.example:8601", "http://relay.example:8700"]

    def relays(self) -> list[RelayStatus]:
        return [
            RelayStatus("http://relay.example:8700/", ALICE.hex(), True, 5.0, None, [0, 1], 99),
            RelayStatus("http://10.9.9.9:8700", BOB.hex(), False, 5.0, "bad_manifest"),
        ]

    def weights_sources(self, node: bytes) -> dict[str, int]:
        # a node's own word: the second URL is an address it made up
        return {"http://relay.example:8700": 700, "http://172.16.0.1:9/": 3}

    def origin_listing(self) -> tuple[str | None, list[int]]:
        return "http://coordinator.example:8601", [0, 1]

    def served(self, clients: bool) -> dict[str, Any] | None:
        out: dict[str, Any] = {"total": 30, "requests": 2, "by_version": {"1": 30}}
        return {**out, "by_client": {"10.1.2.3": 30}} if clients else out

    def prometheus(self) -> str:
        return "swarmrl_step 1\n"

    def complete(
        self, prompt: str, max_tokens: int, sample: bool, template: bool
    ) -> dict[str, Any] | None:
        self.completions.append((prompt, max_tokens, sample, template))
        return {"version": 1, "prompt": prompt, "completion": "42", "tokens": 1}


class FakeOperator:
    def __init__(self) -> None:
        self.bans: list[tuple[bytes, str]] = []

    def ban(self, key: bytes, reason: str) -> list[int]:
        self.bans.append((key, reason))
        return [7]


@pytest.fixture
def view(tmp_path: Path) -> FakeView:
    return FakeView(tmp_path)


@pytest.fixture
def operator() -> FakeOperator:
    return FakeOperator()


@pytest.fixture
def client(view: FakeView, operator: FakeOperator) -> TestClient:
    return TestClient(create_api(view, operator, TOKEN), backend="trio")


AUTH = {"authorization": f"Bearer {TOKEN}"}
PUBLIC_GETS = [
    "/api/status",
    "/api/nodes",
    f"/api/nodes/{BOB.hex()}",
    "/api/verdicts",
    "/api/steps",
    "/api/versions",
    "/api/samples",
    "/api/contributions",
    "/api/timeline",
    "/api/validation",
    "/api/weights",
    "/metrics",
]


def test_contributions_are_sorted_and_carry_only_their_fields(client: TestClient) -> None:
    rows = client.get("/api/contributions").json()
    assert [r["key"] for r in rows] == [BOB.hex(), ALICE.hex(), CAROL.hex()]  # ties by key
    assert all(set(r) == CONTRIBUTION_KEYS for r in rows)
    assert rows[0]["accepted_groups"] == 9 and rows[0]["validation_s"] == 1.5
    assert rows[2]["banned"] is True and rows[2]["ban_reason"] == "toploc"
    got = client.get("/api/contributions?download=1")
    assert got.headers["content-disposition"].startswith("attachment; filename=")
    assert got.json() == rows


def test_anonymous_callers_see_no_addresses(client: TestClient) -> None:
    for path in PUBLIC_GETS:
        r = client.get(path)
        assert r.status_code == 200, (path, r.text)
        assert not IP.findall(r.text), (path, r.text)
    w = client.get("/api/weights").json()
    assert "by_client" not in w["served"] and w["served"]["total"] == 30
    verified, claimed = w["relays"]
    assert verified["url"] == "http://relay.example:8700/" and verified["versions"] == [0, 1]
    assert claimed["url"] is None and claimed["error"] == "bad_manifest"
    assert w["nodes"][0]["fetched"] == {"http://relay.example:8700": 700, "other": 3}
    assert client.get("/api/status").json()["addrs"] is None


def test_the_operator_sees_addresses(client: TestClient) -> None:
    w = client.get("/api/weights", headers=AUTH).json()
    assert w["served"]["by_client"] == {"10.1.2.3": 30}
    assert w["relays"][1]["url"] == "http://10.9.9.9:8700"
    assert "http://172.16.0.1:9/" in w["nodes"][0]["fetched"]
    status = client.get("/api/status", headers=AUTH).json()
    assert status["addrs"] == ["/ip4/192.168.7.7/tcp/4001"]


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"Bearer \xe2\x98\x83\xff", 403),  # not ASCII, not UTF-8
        (b"\xff\xfe", 401),
        (b"Basic " + TOKEN.encode(), 401),
        (TOKEN.encode(), 401),
        (b"Bearer", 401),
        (b"Bearer ", 401),
        (b"", 401),
        (b"Bearer a b", 401),
        (b"Bearer wrong", 403),
        (b"Bearer " + TOKEN.encode() + b"x", 403),
    ],
)
def test_bad_authorization_is_refused_not_a_crash(
    client: TestClient, operator: FakeOperator, header: bytes, code: int
) -> None:
    headers = [(b"authorization", header)]
    assert client.post(f"/api/nodes/{BOB.hex()}/ban", headers=headers).status_code == code
    for path in PUBLIC_GETS:
        assert client.get(path, headers=headers).status_code == code, path
    assert operator.bans == []


def test_ban_takes_the_token_with_loose_spacing(client: TestClient, operator: FakeOperator) -> None:
    assert client.post(f"/api/nodes/{BOB.hex()}/ban").status_code == 401
    headers = [(b"authorization", f"  bearer   {TOKEN} ".encode())]
    r = client.post(f"/api/nodes/{ALICE.hex()[:10]}/ban?reason=spam", headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"banned": ALICE.hex(), "revoked_leases": [7]}
    assert operator.bans == [(ALICE, "spam")]


def test_no_token_configured_refuses_every_operator_call(
    view: FakeView, operator: FakeOperator
) -> None:
    client = TestClient(create_api(view, operator, None), backend="trio")
    r = client.post(f"/api/nodes/{BOB.hex()}/ban", headers={"authorization": "Bearer "})
    assert r.status_code == 401
    r = client.post(f"/api/nodes/{BOB.hex()}/ban", headers={"authorization": "Bearer x"})
    assert r.status_code == 403 and "no operator token" in r.json()["detail"]
    assert operator.bans == []


def test_key_prefixes_need_eight_digits_and_name_one_node(
    client: TestClient, view: FakeView
) -> None:
    assert client.get(f"/api/nodes/{ALICE.hex()[:7]}").status_code == 422
    assert client.get("/api/nodes/zzzzzzzzzz").status_code == 422
    assert client.get(f"/api/nodes/{ALICE.hex()[:8]}").json()["key"] == ALICE.hex()
    r = client.get(f"/api/nodes/{BOB.hex()[:40]}")  # BOB and CAROL share 62 digits
    assert r.status_code == 404 and "ambiguous" in r.text
    assert client.get(f"/api/nodes/{'ef' * 4}").status_code == 404
    # a node that joined after the index was read is still found by its full key
    dave = bytes([0xEE] * 32)
    view.ledger.rows[dave] = node_row(dave)
    assert client.get(f"/api/nodes/{dave.hex()}").json()["key"] == dave.hex()


def test_query_values_are_bounded(client: TestClient) -> None:
    for path in (
        "/api/verdicts?limit=100000",
        "/api/verdicts?outcome=x",
        "/api/samples?limit=0",
        "/api/samples?verdict=maybe",
        "/api/samples?node=ab",
        "/api/steps?limit=1000000",
        "/api/nodes?limit=0",
        "/api/timeline?bucket=1",
        "/api/steps?since=99999999999999999999",  # past what SQLite stores: not an overflow
        "/api/groups?since_id=99999999999999999999",
        "/api/samples?step=99999999999999999999",
        "/api/submissions/99999999999999999999",
        f"/api/nodes/{ALICE.hex()}/ban?reason=",
    ):
        method = client.post if path.endswith("reason=") else client.get
        assert method(path, headers=AUTH).status_code == 422, path


def write_samples(path: Path, mib: int, newest: int) -> None:
    """`mib` MiB of old samples, then `newest` numbered ones and a line being appended."""
    old = json.dumps({"i": -1, "node": "00" * 32, "reward": 0.0, "prompt": "x" * 150})
    block = ((old + "\n") * (2**20 // (len(old) + 1) + 1)).encode()[: 2**20]
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(block)  # cut mid-line at each MiB: only the window's first line may be torn
        f.write(b"\n")
        for i in range(newest):
            rec = {"i": i, "node": ALICE.hex(), "reward": i / newest, "trainer_step": i % 5}
            f.write(json.dumps(rec).encode() + b"\n")
        f.write(b'{"i": "torn')


class CountingFile:
    """A file that counts the bytes read from it."""

    def __init__(self, f: Any, counts: list[int]) -> None:
        self.f, self.counts = f, counts

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()

    def fileno(self) -> int:
        return self.f.fileno()

    def seek(self, offset: int) -> int:
        return self.f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.counts.append(len(data))
        return data


def test_the_sample_log_is_read_from_its_tail_only(
    client: TestClient, view: FakeView, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_samples(view.samples_path, 50, 1000)
    assert view.samples_path.stat().st_size > 50 * 2**20
    reads: list[int] = []
    real_open = Path.open
    monkeypatch.setattr(
        Path, "open", lambda self, *a, **k: CountingFile(real_open(self, *a, **k), reads)
    )
    rows = client.get("/api/samples?limit=5").json()
    assert [r["i"] for r in rows] == [999, 998, 997, 996, 995]
    assert 0 < sum(reads) <= TAIL_BYTES
    filtered = client.get("/api/samples?min_reward=0.5&step=3&limit=1000").json()
    assert filtered and all(r["reward"] >= 0.5 and r["trainer_step"] == 3 for r in filtered)
    assert client.get("/api/timeline").status_code == 200
    assert sum(reads) <= TAIL_BYTES  # unchanged file: the timeline used the cached tail
    with real_open(view.samples_path, "ab") as f:
        f.write(b'ished line"}\n{"i": 1000, "reward": "not a number"}\n')
    assert client.get("/api/samples?limit=1").json()[0]["i"] == 1000
    assert client.get("/api/samples?min_reward=0&limit=1").json()[0]["i"] == 999
    assert sum(reads) <= 2 * TAIL_BYTES


def test_weights_come_from_the_view_without_network_io(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network I/O in a request")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)
    w = client.get("/api/weights").json()
    assert w["origin"] == {"url": "http://coordinator.example:8601", "versions": [0, 1]}
    assert [r["served"] for r in w["relays"]] == [99, None]
    assert w["relays"][0]["verified"] and not w["relays"][1]["verified"]
    assert w["nodes"][0]["source"] == "http://relay.example:8700"


def test_generate_goes_through_the_view_and_is_rate_limited(
    client: TestClient, view: FakeView
) -> None:
    body = {"prompt": "copy 42=", "max_tokens": 8}
    r = client.post("/api/generate", json=body)
    assert r.status_code == 200 and r.json()["completion"] == "42"
    assert view.completions == [("copy 42=", 8, False, True)]
    codes = [client.post("/api/generate", json=body).status_code for _ in range(3)]
    assert codes[-1] == 429
    assert client.post("/api/generate", json={**body, "max_tokens": 65}).status_code == 422


def test_request_bodies_are_bounded(client: TestClient, view: FakeView) -> None:
    big = json.dumps({"prompt": "x" * 100_000}).encode()
    r = client.post("/api/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.post(
        "/api/generate",
        content=iter([big[:40_000], big[40_000:]]),  # chunked: no declared length
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert view.completions == []


def test_groups_are_paged_with_hex_keys_and_the_ledger_audit_is_served(client: TestClient) -> None:
    page = client.get("/api/groups", params={"since_id": 1}).json()
    assert [g["id"] for g in page] == [2] and page[0]["node"] == ALICE.hex()
    assert client.get("/api/groups", params={"limit": 5001}).status_code == 422
    assert client.get("/api/ledger/integrity").json() == {
        "duplicate_groups": 0,
        "missing_groups": 0,
    }
