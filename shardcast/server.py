"""The HTTP face of a store, shared by origin and relay (FastAPI, served by hypercorn on trio).

    GET /versions?after=N&wait=S   JSON listing; long-polls up to S seconds for a version > N
    GET /v/{N}/manifest            the signed manifest bytes
    GET /v/{N}/f/{name}            a payload file, streamed; single-range `Range` supported
    GET /stats                     bytes served since start: total, requests, by version
    GET /health                    liveness

Files are streamed in chunks read off the event loop, so no shard is ever held in memory
and a slow client only slows its own stream. On a relay a requested byte range may cover
shards not yet held: the response waits for each one to be verified (cut-through) and
gives up with 503 (before the body) or a cut stream (inside it) after `shard_wait` seconds.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from functools import partial

import trio
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import StreamingResponse
from hypercorn.config import Config
from hypercorn.trio import serve

from shardcast.errors import ManifestError
from shardcast.manifest import shard_range
from shardcast.store import StoredVersion, VersionStore
from shardcast.throttle import UploadThrottle
from shardcast.traffic import CountServed, ServedBytes

log = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024
MAX_LONG_POLL = 60.0
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single `bytes=` range, None for no header.

    Raises HTTPException(416) for a range that cannot be satisfied or is not understood.
    """
    if header is None:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        raise HTTPException(416, "only one range of the form bytes=a-b is supported")
    if m.group(1):
        start = int(m.group(1))
        end = int(m.group(2)) + 1 if m.group(2) else size
    else:  # suffix range: the last n bytes
        start, end = max(0, size - int(m.group(2))), size
    end = min(end, size)
    if start >= end:
        raise HTTPException(416, f"range {header} is outside the {size}-byte file")
    return start, end


def create_app(
    store: VersionStore, bucket: UploadThrottle | None = None, shard_wait: float = 30.0
) -> FastAPI:
    app = FastAPI(title="shardcast", docs_url=None, redoc_url=None, openapi_url=None)
    served = ServedBytes()
    app.add_middleware(CountServed, served=served)
    app.state.served = served

    def version_or_404(version: int) -> StoredVersion:
        sv = store.get(version)
        if sv is None:
            raise HTTPException(404, f"version {version} is not held here")
        return sv

    @app.get("/health")
    async def health() -> dict:
        return {"ok": True, "latest": store.latest()}

    @app.get("/stats")
    async def stats() -> dict:
        """Bytes served since this server started (totals and by version)."""
        return served.snapshot(clients=False)

    @app.get("/versions")
    async def versions(after: int = -1, wait: float = 0.0) -> dict:
        if wait > 0:
            await store.wait_newer(after, min(wait, MAX_LONG_POLL))
        return store.listing()

    @app.get("/v/{version}/manifest")
    async def manifest(version: int) -> Response:
        sv = version_or_404(version)
        return Response(sv.manifest_bytes, media_type="application/octet-stream")

    @app.get("/v/{version}/f/{name:path}")
    async def payload(version: int, name: str, request: Request) -> Response:
        sv = version_or_404(version)
        try:
            p = sv.manifest.payload_file(name)
        except ManifestError:
            raise HTTPException(404, f"version {version} has no payload {name!r}") from None
        rng = parse_range(request.headers.get("range"), p.size)
        start, end = rng if rng is not None else (0, p.size)
        size = sv.manifest.shard_size
        first = start // size
        # Before sending headers, make sure the first shard is there: a relay that is behind
        # answers 503 quickly enough for the client to go elsewhere.
        if not await sv.wait_for(name, first, shard_wait):
            if sv.dropped:
                raise HTTPException(404, f"version {version} was dropped")
            raise HTTPException(503, f"shard {first} of {name!r} is not held yet")
        headers = {"content-length": str(end - start), "accept-ranges": "bytes"}
        status = 200
        if rng is not None:
            status = 206
            headers["content-range"] = f"bytes {start}-{end - 1}/{p.size}"

        async def body() -> AsyncIterator[bytes]:
            fd = await trio.to_thread.run_sync(os.open, sv.payload_path(name), os.O_RDONLY)
            try:
                pos = start
                while pos < end:
                    index = pos // size
                    s_start, s_len = shard_range(sv.manifest, p, index)
                    if not await sv.wait_for(name, index, shard_wait):
                        # Cutting the stream short is the only honest signal left once the
                        # headers are out; the client sees a short body and resumes elsewhere.
                        log.info("v%d %s: shard %d never came; cut", version, name, index)
                        return
                    stop = min(end, s_start + s_len, pos + READ_CHUNK)
                    data = await trio.to_thread.run_sync(os.pread, fd, stop - pos, pos)
                    if not data:
                        return
                    if bucket is not None:
                        await bucket.take(len(data))
                    yield data
                    pos += len(data)
            finally:
                os.close(fd)

        return StreamingResponse(
            body(), status_code=status, headers=headers, media_type="application/octet-stream"
        )

    return app


def hypercorn_config(host: str, port: int) -> Config:
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Long-polls and cut-through waits hold requests open; let them.
    config.keep_alive_timeout = 75
    config.graceful_timeout = 1
    return config


async def serve_app(
    app: FastAPI,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until cancelled; `task_status.started` gets the base URL (real port)."""
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, hypercorn_config(host, port)))
        task_status.started(binds[0])
