"""The coordinator's HTTP API: JSON under /api (documented at /docs), Prometheus at /metrics.

Read-only for everyone; anything that changes the pool needs the operator token given at
`coordinator run` (`Authorization: Bearer <token>`).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Header, HTTPException, Query
from fastapi.responses import Response

from trainer.dashboard.series import check_of

if TYPE_CHECKING:
    from trainer.coordinator import Coordinator


def create_api(coord: Coordinator) -> FastAPI:
    app = FastAPI(
        title="swarmrl coordinator",
        description="The state of one swarmrl pool: nodes, validation, training, weights.",
    )
    ledger = coord.ledger

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        """The pool at a glance."""
        ends = coord.endpoints
        return {
            "pool_id": coord.pool_id,
            "name": coord.spec.name,
            "model": coord.spec.model.name,
            "dtype": coord.spec.model.dtype,
            "task": coord.spec.task.name,
            "algorithm": coord.spec.algorithm.loss_type,
            "step": coord.step,
            "version": coord.version,
            "resumed_from": coord.resumed_from,
            "max_staleness": coord.spec.limits.max_staleness,
            "peer_id": ends.peer_id if ends else None,
            "addrs": ends.addrs if ends else [],
            "weights_urls": coord.weights_urls(),
            "counts": ledger.counts(),
            "time": time.time(),
        }

    @app.get("/api/nodes")
    def nodes() -> list[dict[str, Any]]:
        """Every node that joined: hardware, status, counts, reputation."""
        return [node_json(n) for n in ledger.nodes()]

    @app.get("/api/nodes/{key}")
    def node(key: str, limit: int = Query(50, le=500)) -> dict[str, Any]:
        """One node (hex public key or its prefix) with its recent verdicts."""
        found = [n for n in ledger.nodes() if n["key"].hex().startswith(key.lower())]
        if len(found) != 1:
            raise HTTPException(404, "no such node" if not found else "ambiguous key prefix")
        out = {**node_json(found[0]), "verdicts": _verdicts(coord, found[0]["key"], limit)}
        evidence = found[0]["ban_evidence"]
        row = ledger.submission(evidence) if evidence is not None else None
        if row is not None:
            raw = row.pop("raw")
            out["evidence"] = {
                **row,
                "node": row["node"].hex(),
                "details": json.loads(row["details"] or "{}"),
                "raw_bytes": len(raw),
            }
        return out

    @app.get("/api/verdicts")
    def verdicts(
        limit: int = Query(100, le=1000), outcome: str | None = None
    ) -> list[dict[str, Any]]:
        """The most recent validation verdicts, newest first."""
        return _verdicts(coord, None, limit, outcome)

    @app.get("/api/steps")
    def steps(since: int = 0) -> list[dict[str, Any]]:
        """Training steps after `since`, with their metrics."""
        return ledger.steps(since)

    @app.get("/api/versions")
    def versions() -> list[dict[str, Any]]:
        """Published weight versions: full or delta, payload bytes, time."""
        return ledger.versions()

    @app.get("/api/samples")
    def samples(
        limit: int = Query(100, le=1000),
        node: str | None = None,
        min_reward: float | None = None,
        step: int | None = None,
        max_reward: float | None = None,
        verdict: str | None = None,
    ) -> list[dict[str, Any]]:
        """The newest lines of the sample log, filtered (node: key prefix; step: the trainer's
        step when the sample was accepted; verdict: accept, soft or hard)."""
        path = coord.run_log.folder / "samples.jsonl"
        if not path.exists():
            return []
        out = []
        for line in reversed(path.read_text().splitlines()[-20_000:]):
            try:
                s = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being appended right now
            if node and not str(s.get("node", "")).startswith(node):
                continue
            if min_reward is not None and (s.get("reward") is None or s["reward"] < min_reward):
                continue
            if max_reward is not None and (s.get("reward") is None or s["reward"] > max_reward):
                continue
            if step is not None and s.get("trainer_step") != step:
                continue
            if verdict and s.get("verdict") != verdict:
                continue
            out.append(s)
            if len(out) >= limit:
                break
        return out

    @app.post("/api/nodes/{key}/ban")
    def ban(
        key: str, reason: str = "banned by the operator", authorization: str = Header("")
    ) -> dict[str, Any]:
        """Ban a node by hand (operator token required)."""
        token = coord.options.operator_token
        if not token or not secrets.compare_digest(authorization, f"Bearer {token}"):
            raise HTTPException(
                403, "an operator token is required (coordinator run --operator-token)"
            )
        found = [n for n in ledger.nodes() if n["key"].hex().startswith(key.lower())]
        if len(found) != 1:
            raise HTTPException(404, "no such node")
        revoked = ledger.ban(found[0]["key"], reason, None, time.time())
        return {"banned": found[0]["key"].hex(), "revoked_leases": revoked}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(coord.run_log.prometheus(), media_type="text/plain; version=0.0.4")

    from trainer.dashboard import mount_dashboard  # the pages read the endpoints above

    mount_dashboard(app, coord)
    return app


def node_json(n: dict[str, Any]) -> dict[str, Any]:
    """A ledger node row as JSON, with its status: joined (no heartbeat yet), healthy, stale
    (quiet for 30 s), gone (60 s) or banned."""
    out = {k: v for k, v in n.items() if k != "key"}
    out["key"] = n["key"].hex()
    out["hardware"] = json.loads(n["hardware"])
    if n["banned_at"] is not None:
        out["status"] = "banned"
    elif time.time() - n["last_seen"] > 60:
        out["status"] = "gone"
    elif time.time() - n["last_seen"] > 30:
        out["status"] = "stale"
    elif n["weight_version"] < 0:
        out["status"] = "joined"
    else:
        out["status"] = "healthy"
    return out


def _verdicts(
    coord: Coordinator, node: bytes | None, limit: int, outcome: str | None = None
) -> list[dict[str, Any]]:
    rows = coord.ledger.recent_submissions(limit, node, outcome)
    return [{**r, "node": r["node"].hex(), "check": check_of(r)} for r in rows]
