"""Ledger rows as the API's JSON, and the cached reads behind the endpoints every open page
polls: what anonymous callers cost the coordinator stays one query per interval, however many
of them there are."""

from __future__ import annotations

import json
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from trainer.dashboard.series import check_of
from trainer.view import LedgerReader

T = TypeVar("T")

MIN_PREFIX = 8
"""Hex characters a key prefix needs: shorter ones match too much to name a node."""
KEY_HEX = 64
"""A node key (ed25519, 32 bytes) in hex."""
KEY_PREFIX = rf"^[0-9a-fA-F]{{{MIN_PREFIX},{KEY_HEX}}}$"
MAX_ROW_ID = 2**63 - 1
"""The largest id or step SQLite stores: a larger one in a query is 422, not an overflow."""
STALE_S = 30.0
GONE_S = 60.0

# What /api/contributions publishes of a ledger row, and nothing else the ledger may add later.
CONTRIBUTION_FIELDS = (
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
)


class Recent(Generic[T]):
    """`fetch()`'s result, reused for `ttl_s`. Callers that arrive during a fetch wait for it
    instead of starting their own."""

    def __init__(
        self, fetch: Callable[[], T], ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at: float | None = None

    def get(self) -> T:
        with self._lock:
            now = self._clock()
            if self._at is None or now - self._at >= self._ttl_s:
                self._value = self._fetch()
                self._at = now
            return self._value  # type: ignore[return-value]


class NodeIndex:
    """The ledger's nodes, re-read at most every `ttl_s`, with their hex keys sorted so a key
    prefix is found by bisection rather than a scan per request."""

    def __init__(self, ledger: LedgerReader, ttl_s: float = 2.0) -> None:
        self._ledger = ledger
        self._recent = Recent(self._load, ttl_s)

    def _load(self) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
        rows = self._ledger.nodes()
        return rows, sorted((r["key"].hex(), r["key"]) for r in rows)

    def rows(self) -> list[dict[str, Any]]:
        return self._recent.get()[0]

    def find(self, prefix: str) -> list[bytes]:
        """The keys starting with hex `prefix` (two at most: enough to say it is ambiguous).
        A full key is looked up in the ledger itself, so a node that just joined is found."""
        prefix = prefix.lower()
        if len(prefix) == KEY_HEX:
            key = bytes.fromhex(prefix)
            return [key] if self._ledger.node(key) is not None else []
        keys = self._recent.get()[1]
        out = []
        for hexkey, key in keys[bisect_left(keys, (prefix, b"")) :]:
            if not hexkey.startswith(prefix) or len(out) == 2:
                break
            out.append(key)
        return out


def parse_json(text: Any) -> Any:
    """A JSON column, or the text itself where it does not parse."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text


def node_json(n: dict[str, Any], now: float | None = None) -> dict[str, Any]:
    """A ledger node row as JSON, with its status (`status_of`)."""
    out = {k: v for k, v in n.items() if k != "key"}
    out["key"] = n["key"].hex()
    out["hardware"] = parse_json(n["hardware"])
    out["status"] = status_of(n, now)
    return out


def status_of(n: dict[str, Any], now: float | None = None) -> str:
    """joined (no heartbeat yet), healthy, stale (quiet for 30 s), gone (60 s) or banned."""
    now = time.time() if now is None else now
    # node rows carry `banned_at`; contribution rows a `banned` flag
    banned = n["banned"] if "banned" in n else n["banned_at"] is not None
    if banned:
        return "banned"
    if now - n["last_seen"] > GONE_S:
        return "gone"
    if now - n["last_seen"] > STALE_S:
        return "stale"
    return "joined" if n["weight_version"] < 0 else "healthy"


def verdict_json(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "node": row["node"].hex(), "check": check_of(row)}


def contribution_json(row: dict[str, Any]) -> dict[str, Any]:
    row = {**row, "status": status_of(row)}
    return {"key": row["key"].hex(), **{k: row[k] for k in CONTRIBUTION_FIELDS}}


def contributions_json(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Most verified tokens first; ties by key, so the order (and a download) is stable."""
    out = [contribution_json(r) for r in rows]
    out.sort(key=lambda c: (-(c["verified_tokens"] or 0), c["key"]))
    return out
