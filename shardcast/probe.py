"""Checking that a relay really serves a version, before anyone is sent to it.

Relay URLs are advertised by nodes: a claim. The coordinator calls `verify_source` before it
hands a relay out: the relay must serve the signed manifest of the current version (opened
with the pool's key, so a relay cannot serve someone else's) and, when it fits in the byte
budget, the version's smallest shard with the right BLAKE3. One probe costs the coordinator
at most `max_bytes` of download and `timeout_s` of one task; it never raises for a bad peer:
it answers with a reason code.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import blake3
import httpx
import trio

from shardcast.errors import ManifestError
from shardcast.fetcher import ResponseTooLarge, get_capped
from shardcast.manifest import Manifest, open_manifest, shard_range


class ProbeStatus(enum.Enum):
    OK = "ok"
    UNREACHABLE = "unreachable"
    """No HTTP answer: refused, reset, not HTTP."""
    TIMEOUT = "timeout"
    """The whole probe did not finish within `timeout_s`."""
    NOT_HELD = "not_held"
    """404 for the manifest: the relay does not hold the version (yet, or at all)."""
    NOT_READY = "not_ready"
    """The manifest is fine but the shard was not held yet (503: still mirroring)."""
    HTTP_ERROR = "http_error"
    """Another unexpected status."""
    TOO_LARGE = "too_large"
    """A body longer than it may be."""
    BAD_MANIFEST = "bad_manifest"
    """Not the pool's signed manifest of that version."""
    BAD_SHARD = "bad_shard"
    """Shard bytes that do not hash to the manifest's value."""


@dataclass(frozen=True)
class ProbeResult:
    status: ProbeStatus
    detail: str = ""
    shard_checked: bool = False
    """True when a shard was fetched and verified, not only the manifest."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is ProbeStatus.OK


class _Verdict(Exception):
    """Ends a probe early with its result."""

    def __init__(self, status: ProbeStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status


async def verify_source(
    url: str,
    public_key: bytes,
    pool_id: str,
    version: int,
    *,
    timeout_s: float = 10.0,
    max_bytes: int = 1024 * 1024,
    http: httpx.AsyncClient | None = None,
) -> ProbeResult:
    """Whether `url` serves the signed manifest of `version` (and a shard of it, when the
    smallest fits in what is left of `max_bytes`). Bounded by `timeout_s` overall."""
    start = trio.current_time()
    own = http is None
    client = http or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
    base = url.rstrip("/")
    checked = False
    try:
        with trio.fail_after(timeout_s):
            body = await _get(client, f"{base}/v/{version}/manifest", max_bytes)
            m = _open(body, public_key, pool_id, version)
            checked = await _check_smallest_shard(client, base, m, max_bytes - len(body))
        status, detail = ProbeStatus.OK, ""
    except _Verdict as v:
        status, detail = v.status, str(v)
    except trio.TooSlowError:
        status, detail = ProbeStatus.TIMEOUT, f"not done in {timeout_s}s"
    finally:
        if own:
            await client.aclose()
    return ProbeResult(status, detail, checked, trio.current_time() - start)


async def _get(http: httpx.AsyncClient, url: str, cap: int, headers: dict | None = None) -> bytes:
    try:
        status, body = await get_capped(http, url, cap, headers=headers)
    except ResponseTooLarge as e:
        raise _Verdict(ProbeStatus.TOO_LARGE, str(e)) from None
    except httpx.HTTPError as e:
        raise _Verdict(ProbeStatus.UNREACHABLE, f"{type(e).__name__}: {e}") from None
    if status == 404:
        raise _Verdict(ProbeStatus.NOT_HELD, "404")
    if status == 503:
        raise _Verdict(ProbeStatus.NOT_READY, "503")
    if status not in (200, 206):
        raise _Verdict(ProbeStatus.HTTP_ERROR, f"HTTP {status}")
    return body


def _open(body: bytes, public_key: bytes, pool_id: str, version: int) -> Manifest:
    try:
        return open_manifest(body, public_key=public_key, pool_id=pool_id, version=version)
    except ManifestError as e:
        raise _Verdict(ProbeStatus.BAD_MANIFEST, str(e)) from None


async def _check_smallest_shard(
    http: httpx.AsyncClient, base: str, m: Manifest, budget: int
) -> bool:
    """Fetch and hash the smallest shard of the version if it fits in `budget` bytes; the
    smallest keeps the probe cheap (a config file's shard is a few KB)."""
    shards = [(shard_range(m, p, i)[1], p, i) for p in m.payload for i in range(len(p.shards))]
    if not shards:
        return False
    length, p, i = min(shards, key=lambda t: t[0])
    if length > budget:
        return False
    off, _ = shard_range(m, p, i)
    headers = {"Range": f"bytes={off}-{off + length - 1}"}
    body = await _get(http, f"{base}/v/{m.version}/f/{p.name}", length, headers)
    if len(body) != length or blake3.blake3(body).hexdigest() != p.shards[i]:
        raise _Verdict(ProbeStatus.BAD_SHARD, f"{p.name} shard {i} does not hash right")
    return True
