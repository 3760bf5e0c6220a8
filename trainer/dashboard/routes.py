"""The JSON endpoints the dashboard needs beyond trainer/api.py's: chart series, validation
summaries, the weight-distribution tree, one submission's evidence, and 'try the policy'."""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from fastapi import APIRouter, HTTPException, Query, Request
from pydantic import BaseModel, Field

from shardcast.traffic import ServedBytes
from trainer.dashboard.generate import MAX_NEW_TOKENS, RateLimiter, complete
from trainer.dashboard.series import (
    ACCURACY_FUNCS,
    check_of,
    minute_buckets,
    read_samples,
    step_series,
    verdict_key,
)

if TYPE_CHECKING:
    from trainer.coordinator import Coordinator

RELAY_PROBE_S = 1.5
VERDICT_WINDOW = 5000


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=2000)
    max_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    sample: bool = Field(False, description="the pool's sampler with a fresh seed, not greedy")
    template: bool = Field(True, description="wrap the prompt in the task's prompt template")


def create_router(coord: Coordinator, served: ServedBytes | None) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["dashboard"])
    ledger = coord.ledger
    limiter = RateLimiter()
    one_at_a_time: list[anyio.CapacityLimiter] = []

    def has_accuracy() -> bool:
        rewards = getattr(coord.task, "rewards", [])
        return any(getattr(r, "name", "") in ACCURACY_FUNCS for r in rewards)

    @router.get("/timeline")
    def timeline(bucket: float = Query(60.0, ge=5.0, le=3600.0)) -> dict[str, Any]:
        """Chart series: one point per training step (reward, accuracy where the task has
        one, tokens/s, staleness) and per `bucket` seconds of validation (verdict counts,
        latency)."""
        samples = read_samples(coord.run_log.folder / "samples.jsonl")
        acc = has_accuracy()
        return {
            "has_accuracy": acc,
            "steps": step_series(ledger.steps(0), samples, acc),
            "bucket": bucket,
            "minutes": minute_buckets(ledger.recent_submissions(VERDICT_WINDOW), bucket),
            "time": time.time(),
        }

    @router.get("/validation")
    def validation(
        limit: int = Query(50, le=500), bucket: float = Query(60.0, ge=5.0, le=3600.0)
    ) -> dict[str, Any]:
        """Verdict counts by outcome and by outcome:check (recent window), per minute, and the
        most recent rejections with their failing check and its numbers."""
        verdicts = ledger.recent_submissions(VERDICT_WINDOW)
        totals: dict[str, int] = {}
        by_key: dict[str, int] = {}
        for v in verdicts:
            if v["outcome"] is None:
                totals["pending"] = totals.get("pending", 0) + 1
                continue
            totals[v["outcome"]] = totals.get(v["outcome"], 0) + 1
            k = verdict_key(v)
            by_key[k] = by_key.get(k, 0) + 1
        rejected = [v for v in verdicts if v["outcome"] in ("soft", "hard")][:limit]
        return {
            "window": len(verdicts),
            "totals": totals,
            "by_key": dict(sorted(by_key.items(), key=lambda kv: -kv[1])),
            "bucket": bucket,
            "minutes": minute_buckets(verdicts, bucket),
            "rejections": [{**v, "node": v["node"].hex(), "check": check_of(v)} for v in rejected],
        }

    @router.get("/submissions/{sid}")
    def submission(sid: int) -> dict[str, Any]:
        """One submission's verdict and the signed bytes kept as evidence (hex, size, hash)."""
        row = ledger.submission(sid)
        if row is None:
            raise HTTPException(404, "no such submission")
        raw: bytes = row.pop("raw")
        row["node"] = row["node"].hex()
        row["details"] = _json(row.get("details"))
        return {
            **row,
            "raw_bytes": len(raw),
            "raw_blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest(),
            "raw_hex_head": raw[:256].hex(),
        }

    @router.get("/weights")
    async def weights() -> dict[str, Any]:
        """Published versions, what the origin and each relay hold, what each node holds, the
        bytes the origin served, and the bytes each relay says it served."""
        from trainer.api import node_json

        origin = getattr(coord, "origin", None)
        held = origin.store.listing() if origin is not None else {"versions": []}
        relays = [{"url": u, "node": None} for u in coord.spec.coordinator.relays]
        relays += [{"url": u, "node": k.hex()} for k, u in coord.relaying_nodes().items()]
        await _probe(relays)
        return {
            "versions": ledger.versions(),
            "current": coord.version,
            "origin": {
                "url": origin.url if origin is not None else None,
                "versions": held["versions"],
            },
            "relays": relays,
            "nodes": [
                _holder(node_json(n), coord.weights_sources(n["key"])) for n in ledger.nodes()
            ],
            "served": served.snapshot() if served is not None else None,
        }

    @router.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any]:
        """Complete a prompt with the newest published weights (at most 64 new tokens; a few
        requests per client, then one every 2 s)."""
        client = request.client.host if request.client else "?"
        wait = limiter.allow(client)
        if wait > 0:
            raise HTTPException(
                429, f"too many requests; try again in {wait:.1f}s", {"retry-after": f"{wait:.0f}"}
            )
        if not one_at_a_time:
            one_at_a_time.append(anyio.CapacityLimiter(1))
        out = await anyio.to_thread.run_sync(
            complete,
            coord,
            req.prompt,
            req.max_tokens,
            req.sample,
            req.template,
            limiter=one_at_a_time[0],
        )
        if out is None:
            raise HTTPException(503, "no weights published yet")
        return out.to_json()

    return router


def _holder(n: dict[str, Any], fetched: dict[str, int]) -> dict[str, Any]:
    """A node on the relay tree: what it holds, and where it says its weights came from
    (`source`: the URL it fetched most bytes from, None before its first report)."""
    out = {k: n[k] for k in ("key", "status", "weight_version", "engine", "last_seen")}
    out["fetched"] = fetched
    out["source"] = max(fetched, key=fetched.__getitem__) if fetched else None
    return out


async def _probe(relays: list[dict[str, Any]]) -> None:
    """Ask each relay which versions it holds and how many bytes it served (bounded; a silent
    relay is marked)."""

    async def one(client: httpx.AsyncClient, r: dict[str, Any]) -> None:
        base = r["url"].rstrip("/")
        try:
            resp = await client.get(f"{base}/versions")
            resp.raise_for_status()
            r["versions"] = resp.json().get("versions", [])
            r["error"] = None
        except (httpx.HTTPError, ValueError) as e:
            r["versions"], r["served"] = [], None
            r["error"] = type(e).__name__
            return
        try:  # what it says it served (relays are untrusted: shown, never relied on)
            resp = await client.get(f"{base}/stats")
            resp.raise_for_status()
            total = resp.json().get("total")
            r["served"] = total if isinstance(total, int) and total >= 0 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            r["served"] = None

    if not relays:
        return
    async with httpx.AsyncClient(timeout=RELAY_PROBE_S) as client, anyio.create_task_group() as tg:
        for r in relays:
            tg.start_soon(one, client, r)


def _json(text: Any) -> Any:
    import json

    try:
        return json.loads(text) if isinstance(text, str) else text
    except ValueError:
        return text
