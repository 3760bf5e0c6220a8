"""The JSON endpoints the dashboard needs beyond trainer/api.py's: chart series, validation
summaries, the weight-distribution tree, one submission's evidence, and 'try the policy'.

They read `PoolView` only. Nothing here does network I/O: what the relays hold comes from the
coordinator's own cached checks (`PoolView.relays`), never from fetching a URL a node named.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import BaseModel, Field

from protocol.ratelimit import client_key
from trainer.dashboard.limits import MAX_NEW_TOKENS, MAX_WAITING, RateLimiter
from trainer.dashboard.rows import (
    MAX_ROW_ID,
    NodeIndex,
    Recent,
    node_json,
    parse_json,
    verdict_json,
)
from trainer.dashboard.series import (
    EVAL_BYTES,
    SampleLog,
    eval_series,
    minute_buckets,
    read_samples,
    step_series,
    verdict_key,
)
from trainer.metrics import EVALS_FILE
from trainer.view import PoolView, RelayStatus

VERDICT_WINDOW = 5000
CACHE_S = 2.0
"""How stale a polled ledger read may be: every open page asks every 3 s."""


class GenerateRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=2000)
    max_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    sample: bool = Field(False, description="the pool's sampler with a fresh seed, not greedy")
    template: bool = Field(True, description="wrap the prompt in the task's prompt template")


def create_router(
    view: PoolView,
    samples: SampleLog,
    nodes: NodeIndex,
    is_operator: Callable[..., bool],
) -> APIRouter:
    """`is_operator` is a FastAPI dependency: True with the operator token, False without any
    (and it refuses a wrong one)."""
    router = APIRouter(prefix="/api", tags=["dashboard"])
    ledger = view.ledger
    steps = Recent(lambda: ledger.steps(0), CACHE_S)
    window = Recent(lambda: ledger.recent_submissions(VERDICT_WINDOW), CACHE_S)
    # The run log writes its evaluations next to the sample log (trainer/metrics.py).
    evals_path = view.samples_path.parent / EVALS_FILE
    evals = Recent(lambda: eval_series(read_samples(evals_path, EVAL_BYTES)), CACHE_S)
    limiter = RateLimiter()
    one_at_a_time = anyio.CapacityLimiter(1)

    @router.get("/timeline")
    def timeline(bucket: float = Query(60.0, ge=5.0, le=3600.0)) -> dict[str, Any]:
        """Chart series: one point per training step (reward, accuracy where the task has
        one, tokens/s, staleness and the other off-policy statistics), per evaluated version
        (held-out accuracy, pass@1, pass@k) and per `bucket` seconds of validation (verdict
        counts, latency)."""
        acc = view.info.has_accuracy
        return {
            "has_accuracy": acc,
            "steps": step_series(steps.get(), samples.records() if acc else [], acc),
            "evals": evals.get(),
            "bucket": bucket,
            "minutes": minute_buckets(window.get(), bucket),
            "time": time.time(),
        }

    @router.get("/validation")
    def validation(
        limit: int = Query(50, ge=1, le=500), bucket: float = Query(60.0, ge=5.0, le=3600.0)
    ) -> dict[str, Any]:
        """Verdict counts by outcome and by outcome:check (recent window), per minute, and the
        most recent rejections with their failing check and its numbers."""
        verdicts = window.get()
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
            "rejections": [verdict_json(v) for v in rejected],
        }

    @router.get("/submissions/{sid}")
    def submission(sid: int = Path(ge=0, le=MAX_ROW_ID)) -> dict[str, Any]:
        """One submission's verdict and the signed bytes kept as evidence (hex, size, hash)."""
        row = ledger.submission(sid)
        if row is None:
            raise HTTPException(404, "no such submission")
        raw: bytes = row.pop("raw")
        row["node"] = row["node"].hex()
        row["details"] = parse_json(row.get("details"))
        return {
            **row,
            "raw_bytes": len(raw),
            "raw_blake2b": hashlib.blake2b(raw, digest_size=16).hexdigest(),
            "raw_hex_head": raw[:256].hex(),
        }

    @router.get("/weights")
    def weights(as_operator: bool = Depends(is_operator)) -> dict[str, Any]:
        """Published versions, what the origin and each relay hold (the coordinator's last
        check of each relay), what each node holds and says it fetched from where, and the
        bytes the origin served (per client address with the operator token only)."""
        url, held = view.origin_listing()
        public = {u.rstrip("/") for u in view.weights_urls()}
        return {
            "versions": ledger.versions(),
            "current": view.progress().version,
            "origin": {"url": url, "versions": held},
            "relays": [relay_json(r, as_operator) for r in view.relays()],
            "nodes": [
                holder(
                    node_json(n), view.weights_sources(n["key"]), None if as_operator else public
                )
                for n in nodes.rows()
            ],
            "served": view.served(clients=as_operator),
        }

    @router.post("/generate")
    async def generate(req: GenerateRequest, request: Request) -> dict[str, Any]:
        """Complete a prompt with the newest published weights (at most 64 new tokens; a few
        requests per client, then one every 2 s; one at a time, a few waiting)."""
        wait = limiter.allow(client_key(request.client.host if request.client else "?"))
        if wait > 0:
            raise HTTPException(
                429, f"too many requests; try again in {wait:.1f}s", {"retry-after": f"{wait:.0f}"}
            )
        if one_at_a_time.statistics().tasks_waiting >= MAX_WAITING:
            raise HTTPException(503, "busy generating for others; try again", {"retry-after": "5"})
        out = await anyio.to_thread.run_sync(
            view.complete,
            req.prompt,
            req.max_tokens,
            req.sample,
            req.template,
            limiter=one_at_a_time,
        )
        if out is None:
            raise HTTPException(503, "no weights published yet")
        return out

    return router


def relay_json(r: RelayStatus, operator: bool) -> dict[str, Any]:
    """A relay as its last check found it. The URL of one a node advertised but that failed
    verification is the node's claim, not a service handed to anyone: operator only."""
    shown = operator or r.verified or r.node is None
    return {
        "url": r.url if shown else None,
        "node": r.node,
        "verified": r.verified,
        "checked_at": r.checked_at,
        "error": r.error,
        "versions": r.versions,
        "served": r.served,
    }


def holder(n: dict[str, Any], fetched: dict[str, int], public: set[str] | None) -> dict[str, Any]:
    """A node on the relay tree: what it holds, and where it says its weights came from
    (`source`: the URL it fetched most bytes from, None before its first report). With
    `public`, URLs outside it (a node's own word: any address at all) count as `other`."""
    if public is not None:
        shown: dict[str, int] = {}
        for url, n_bytes in fetched.items():
            where = url if url.rstrip("/") in public else "other"
            shown[where] = shown.get(where, 0) + n_bytes
        fetched = shown
    out = {k: n[k] for k in ("key", "status", "weight_version", "engine", "last_seen")}
    out["fetched"] = fetched
    out["source"] = max(fetched, key=fetched.__getitem__) if fetched else None
    return out
