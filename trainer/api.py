"""The coordinator's HTTP API: JSON under /api (documented at /docs), Prometheus at /metrics.

It reads the pool through `PoolView` only and changes it only through `Operator`, after the
operator token given at `coordinator run` (`Authorization: Bearer <token>`). Everything a
caller sends is treated as hostile: bodies and query values are bounded, the token is compared
in constant time, and client addresses are shown to the operator only. docs/security.md
says what each endpoint costs the coordinator.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from trainer.dashboard import mount_dashboard
from trainer.dashboard.rows import (
    KEY_PREFIX,
    MAX_ROW_ID,
    NodeIndex,
    Recent,
    contributions_json,
    node_json,
    parse_json,
    verdict_json,
)
from trainer.dashboard.series import SampleLog
from trainer.request_slots import RequestSlots
from trainer.view import Operator, PoolView

MAX_BODY = 64 << 10
"""The largest request body read: the biggest legitimate one is a 2,000-character prompt."""
STATUS_CACHE_S = 2.0
CONTRIBUTIONS_CACHE_S = 5.0
"""The contributions are one aggregate over every lease and submission: at most one per 5 s."""
INTEGRITY_CACHE_S = 60.0
"""The integrity audit reads every accepted submission and its groups: at most once a minute."""

KeyPrefix = Path(pattern=KEY_PREFIX, description="a node's hex key, or 8+ of its first digits")
Outcome = Literal["accept", "soft", "hard"]


def create_api(view: PoolView, operator: Operator, operator_token: str | None) -> FastAPI:
    is_operator = OperatorCheck(operator_token)
    app = FastAPI(
        title="swarmrl coordinator",
        description="The state of one swarmrl pool: nodes, validation, training, weights.",
        # on every route, so a bad or wrong token is refused everywhere, not ignored somewhere
        dependencies=[Depends(is_operator)],
    )
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY)
    app.add_middleware(RequestSlots)  # outermost: a request waits for a slot before its body
    ledger = view.ledger
    samples = SampleLog(view.samples_path)
    nodes = NodeIndex(ledger)
    counts = Recent(ledger.counts, STATUS_CACHE_S)  # table scans; every open page polls them
    contributions = Recent(
        lambda: contributions_json(ledger.contributions()), CONTRIBUTIONS_CACHE_S
    )
    audit = Recent(ledger.integrity, INTEGRITY_CACHE_S)

    def one_node(prefix: str) -> bytes:
        found = nodes.find(prefix)
        if len(found) != 1:
            raise HTTPException(404, "no such node" if not found else "ambiguous key prefix")
        return found[0]

    @app.get("/api/status")
    def status(as_operator: bool = Depends(is_operator)) -> dict[str, Any]:
        """The pool at a glance. `addrs` (the coordinator's listen addresses, every interface)
        needs the operator token; nodes get a bootstrap address from whoever runs the pool."""
        info, progress, ends = view.info, view.progress(), view.endpoints()
        return {
            "pool_id": info.pool_id,
            "name": info.name,
            "model": info.model,
            "dtype": info.dtype,
            "task": info.task,
            "algorithm": info.algorithm,
            "step": progress.step,
            "version": progress.version,
            "resumed_from": progress.resumed_from,
            "max_staleness": info.max_staleness,
            "peer_id": ends.peer_id if ends else None,
            "addrs": (ends.addrs if ends else []) if as_operator else None,
            "weights_urls": view.weights_urls(),
            "counts": counts.get(),
            "time": time.time(),
        }

    @app.get("/api/nodes")
    def all_nodes(limit: int = Query(1000, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """Nodes in the order they joined (the first `limit`): hardware, status, counts,
        reputation."""
        now = time.time()
        return [node_json(n, now) for n in nodes.rows()[:limit]]

    @app.get("/api/nodes/{key}")
    def node(key: str = KeyPrefix, limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
        """One node (hex public key or 8+ of its first digits) with its recent verdicts."""
        row = ledger.node(one_node(key))
        if row is None:
            raise HTTPException(404, "no such node")
        out = {**node_json(row), "verdicts": verdicts_of(row["key"], limit)}
        evidence = row["ban_evidence"]
        sub = ledger.submission(evidence) if evidence is not None else None
        if sub is not None:
            raw = sub.pop("raw")
            out["evidence"] = {
                **sub,
                "node": sub["node"].hex(),
                "details": parse_json(sub["details"] or "{}"),
                "raw_bytes": len(raw),
            }
        return out

    def verdicts_of(
        key: bytes | None, limit: int, outcome: Outcome | None = None
    ) -> list[dict[str, Any]]:
        return [verdict_json(r) for r in ledger.recent_submissions(limit, key, outcome)]

    @app.get("/api/verdicts")
    def verdicts(
        limit: int = Query(100, ge=1, le=1000), outcome: Outcome | None = None
    ) -> list[dict[str, Any]]:
        """The most recent validation verdicts, newest first."""
        return verdicts_of(None, limit, outcome)

    @app.get("/api/steps")
    def steps(
        since: int = Query(0, ge=0, le=MAX_ROW_ID), limit: int = Query(1000, ge=1, le=10_000)
    ) -> list[dict[str, Any]]:
        """Training steps after `since` (the first `limit`), with their metrics."""
        return ledger.steps(since)[:limit]

    @app.get("/api/versions")
    def versions() -> list[dict[str, Any]]:
        """Published weight versions: full or delta, payload bytes, time."""
        return ledger.versions()

    @app.get("/api/samples")
    def sample_log(
        limit: int = Query(100, ge=1, le=1000),
        node: str | None = Query(None, pattern=KEY_PREFIX),
        min_reward: float | None = None,
        max_reward: float | None = None,
        step: int | None = Query(None, ge=0, le=MAX_ROW_ID),
        verdict: Outcome | None = None,
    ) -> list[dict[str, Any]]:
        """The newest lines of the sample log (from its last 4 MiB only), filtered (node: key
        prefix; step: the trainer's step when the sample was accepted)."""
        prefix = node.lower() if node else None
        out = []
        for s in reversed(samples.records()):
            reward = s.get("reward")
            if prefix and not str(s.get("node", "")).startswith(prefix):
                continue
            if min_reward is not None and not (_number(reward) and reward >= min_reward):
                continue
            if max_reward is not None and not (_number(reward) and reward <= max_reward):
                continue
            if step is not None and s.get("trainer_step") != step:
                continue
            if verdict and s.get("verdict") != verdict:
                continue
            out.append(s)
            if len(out) >= limit:
                break
        return out

    @app.get("/api/groups")
    def groups(
        since_id: int = Query(0, ge=0, le=MAX_ROW_ID), limit: int = Query(1000, ge=1, le=5000)
    ) -> list[dict[str, Any]]:
        """Accepted groups after `since_id`, oldest first (page with the last id): the node
        that sent each, rewards, the advantages it was trained on, the step that trained it
        or why it was dropped."""
        return [{**g, "node": g["node"].hex()} for g in ledger.groups_page(since_id, limit)]

    @app.get("/api/ledger/integrity")
    def integrity() -> dict[str, int]:
        """The ledger's promises, audited: no group recorded twice for one task of a lease,
        none missing from an accepted submission (as of at most a minute ago)."""
        return audit.get()

    @app.get("/api/contributions", response_model=None)
    def contributions_ledger(download: bool = False) -> list[dict[str, Any]] | JSONResponse:
        """What each node contributed, most verified tokens first: groups accepted and trained,
        tokens verified, validation seconds spent on it, leases by outcome, faults, rejections,
        ban. `download=1` answers it as a file."""
        rows = contributions.get()
        if not download:
            return rows
        name = f"swarmrl-contributions-{view.info.pool_id[:12]}-{int(time.time())}.json"
        return JSONResponse(rows, headers={"content-disposition": f'attachment; filename="{name}"'})

    @app.post("/api/nodes/{key}/ban")
    def ban(
        key: str = KeyPrefix,
        reason: str = Query("banned by the operator", min_length=1, max_length=500),
        as_operator: bool = Depends(is_operator),
    ) -> dict[str, Any]:
        """Ban a node by hand (operator token required)."""
        if not as_operator:
            raise HTTPException(
                401,
                "an operator token is required (coordinator run --operator-token)",
                {"www-authenticate": "Bearer"},
            )
        found = one_node(key)
        return {"banned": found.hex(), "revoked_leases": operator.ban(found, reason)}

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus metrics."""
        return Response(view.prometheus(), media_type="text/plain; version=0.0.4")

    mount_dashboard(app, view, samples, nodes, is_operator)
    return app


class OperatorCheck:
    """A FastAPI dependency: is the caller the operator? False without an `Authorization`
    header (an anonymous caller); True with `Bearer <operator token>`; 401 for a header that is
    not a bearer token, 403 for a wrong token or when no token was configured."""

    def __init__(self, token: str | None) -> None:
        # Digests compared, not the tokens: equal lengths, so the time says nothing of its length.
        self._digest = hashlib.sha256(token.encode()).digest() if token else None

    def __call__(self, request: Request) -> bool:
        header = request.headers.get("authorization")
        if header is None:
            return False
        given = bearer_token(header)
        if self._digest is None:
            raise HTTPException(403, "operator actions are off: no operator token configured")
        if not hmac.compare_digest(hashlib.sha256(given).digest(), self._digest):
            raise HTTPException(403, "wrong operator token")
        return True


def bearer_token(header: str) -> bytes:
    """The token in `Bearer <token>`, as the bytes sent (the server hands headers over decoded
    as latin-1, so any byte comes back as itself); 401 for anything else."""
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise HTTPException(
            401,
            "expected 'Authorization: Bearer <operator token>'",
            {"www-authenticate": "Bearer"},
        )
    return parts[1].encode("latin-1")


class BodyLimit:
    """ASGI middleware: refuses a request body over `max_bytes` (413), by its declared length
    before reading it, and by counting while it is read (a chunked body declares none)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await JSONResponse({"detail": "request body too large"}, 413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI answers an HTTPException raised while it reads the body as is.
                raise HTTPException(413, "request body too large")
            return message

        await self.app(scope, counted, send)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
