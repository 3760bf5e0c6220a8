"""Parallel shard downloads from several sources, each shard checked as it streams.

Used by the client (into the folder a version will appear as) and by the relay (into its
store, marking each verified shard servable at once). Each shard is a byte range of one
payload file, written straight into place with `pwrite`; its BLAKE3 is updated on the same
bytes, off the event loop. A transfer that breaks resumes with `Range` from the last byte
received, on another source when there is one. A shard that fails its hash is fetched again
from a source that did not contribute to it, and every contributor is scored down and
reported. Retries per shard are bounded, with exponential backoff.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import httpx
import trio

from shardcast.errors import FetchError, first_error
from shardcast.sources import SourcePicker, SourceStats

log = logging.getLogger(__name__)

FLUSH_BYTES = 2 * 1024 * 1024


class VersionGone(FetchError):
    """No source holds the version any more (every one answered 404)."""


class _TransferFailed(Exception):
    """One attempt at one shard failed in a way another attempt may not."""


@dataclass
class _Progress:
    """A shard's bytes so far: kept across attempts so a broken transfer resumes."""

    hasher: blake3.blake3 = field(default_factory=blake3.blake3)
    got: int = 0
    contributors: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ShardJob:
    name: str
    """Payload file name, as served under /v/{version}/f/."""
    index: int
    offset: int
    length: int
    hash: str
    path: Path
    """Local file the shard is written into, at `offset`."""


@dataclass
class FetchPolicy:
    parallel: int = 8
    max_attempts: int = 8
    backoff: float = 0.05
    max_backoff: float = 2.0
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    """Longest silence on one transfer; must exceed a relay's cut-through wait."""


def prepare_file(path: Path, size: int) -> None:
    """Create `path` with its final size, reserving the blocks so a full disk fails now,
    with a clear error, rather than halfway through the download."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, size)
        else:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def disk_error(e: OSError, path: Path) -> FetchError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    what = "the disk is full (or the file size limit reached)" if full else e.strerror
    return FetchError(f"cannot write {path}: {what} ({errno.errorcode.get(e.errno, e.errno)})")


class ResponseTooLarge(Exception):
    """A peer sent more bytes than the message it was asked for may have."""


async def get_capped(
    http: httpx.AsyncClient, url: str, cap: int, params: dict | None = None
) -> tuple[int, bytes]:
    """GET `url`: (status, body), reading at most `cap` bytes, so an untrusted peer cannot
    make us buffer an endless body."""
    async with http.stream("GET", url, params=params) as r:
        body = bytearray()
        async for chunk in r.aiter_raw():
            body += chunk
            if len(body) > cap:
                raise ResponseTooLarge(f"{url}: response exceeds {cap} bytes")
        return r.status_code, bytes(body)


def _sink(fd: int, chunks: list[bytes], pos: int, hasher: blake3.blake3) -> None:
    """Hash and write received chunks as they are (no joining copy)."""
    for c in chunks:
        hasher.update(c)
    views = [memoryview(c) for c in chunks]
    while views:
        n = os.pwritev(fd, views, pos)
        pos += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def http_client(policy: FetchPolicy) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=policy.connect_timeout, read=policy.read_timeout, write=10.0, pool=None
    )
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False)


class ShardFetcher:
    def __init__(
        self,
        http: httpx.AsyncClient,
        picker: SourcePicker,
        policy: FetchPolicy,
        on_corrupt: Callable[[str, int, ShardJob], None] | None = None,
    ) -> None:
        self.http = http
        self.picker = picker
        self.policy = policy
        self.on_corrupt = on_corrupt

    async def fetch(
        self,
        version: int,
        jobs: list[ShardJob],
        on_done: Callable[[ShardJob], None] | None = None,
    ) -> None:
        """Fetch every job; raises VersionGone or FetchError (and cancels the rest) on the
        first shard that cannot be had."""
        queue = deque(jobs)

        async def worker() -> None:
            while queue:
                job = queue.popleft()
                await self._fetch_one(version, job)
                if on_done is not None:
                    on_done(job)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.policy.parallel, len(jobs))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _fetch_one(self, version: int, job: ShardJob) -> None:
        try:
            fd = os.open(job.path, os.O_WRONLY)
        except OSError as e:
            raise disk_error(e, job.path) from None
        try:
            await self._fetch_into(version, job, fd)
        finally:
            os.close(fd)

    async def _fetch_into(self, version: int, job: ShardJob, fd: int) -> None:
        prog = _Progress()
        avoid: set[str] = set()
        attempts = 0
        last_error = "no attempt"
        while True:
            if attempts >= self.policy.max_attempts:
                raise FetchError(
                    f"v{version} {job.name} shard {job.index}: gave up after {attempts} "
                    f"attempts; last error: {last_error}"
                )
            source = self.picker.pick(version, avoid)
            if source is None:
                if all(version in s.missing for s in self.picker.stats.values()):
                    raise VersionGone(f"no source holds version {version} any more")
                raise FetchError(f"v{version} {job.name}: every source is banned")
            attempts += 1
            source.inflight += 1
            start = trio.current_time()
            before = prog.got
            try:
                await self._transfer(version, job, fd, source, prog)
            except _TransferFailed as e:
                last_error = f"{source.url}: {e}"
                log.info("v%d %s shard %d: %s", version, job.name, job.index, last_error)
                self.picker.record_partial(source, prog.got - before, trio.current_time() - start)
                avoid.add(source.url)
                delay = min(self.policy.max_backoff, self.policy.backoff * 2 ** (attempts - 1))
                await trio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            finally:
                source.inflight -= 1
            if prog.hasher.hexdigest() == job.hash:
                self.picker.record_success(source, prog.got - before, trio.current_time() - start)
                return
            last_error = f"hash mismatch from {sorted(prog.contributors)}"
            if len(prog.contributors) == 1:
                (url,) = prog.contributors
                self.picker.record_corrupt(self.picker.stats[url])
                log.warning("v%d %s shard %d: bad bytes from %s", version, job.name, job.index, url)
                if self.on_corrupt is not None:
                    self.on_corrupt(url, version, job)
                avoid.add(url)
            else:
                # Bytes from several sources (a resumed transfer): which one lied is unknown,
                # and blaming all would let a liar frame an honest source. Fetch the whole
                # shard again from one source; a second mismatch then names the culprit.
                for url in prog.contributors:
                    self.picker.record_failure(self.picker.stats[url])
            prog = _Progress()

    async def _transfer(
        self,
        version: int,
        job: ShardJob,
        fd: int,
        source: SourceStats,
        prog: _Progress,
    ) -> None:
        """One HTTP request for the rest of the shard, advancing `prog`."""
        first = job.offset + prog.got
        last = job.offset + job.length - 1
        url = f"{source.url}/v/{version}/f/{job.name}"
        chunks: list[bytes] = []
        pending = 0

        async def flush() -> None:
            nonlocal chunks, pending
            if not chunks:
                return
            batch, n = chunks, pending
            chunks, pending = [], 0
            try:
                await trio.to_thread.run_sync(_sink, fd, batch, job.offset + prog.got, prog.hasher)
            except OSError as e:
                raise disk_error(e, job.path) from None
            prog.contributors.add(source.url)
            prog.got += n

        try:
            headers = {"Range": f"bytes={first}-{last}"}
            async with self.http.stream("GET", url, headers=headers) as r:
                if r.status_code == 404:
                    self.picker.record_missing(source, version)
                    raise _TransferFailed("404: version not held")
                if r.status_code != 206:
                    raise _TransferFailed(f"HTTP {r.status_code}")
                expect = f"bytes {first}-{last}/"
                if not r.headers.get("content-range", "").startswith(expect):
                    raise _TransferFailed(f"wrong Content-Range {r.headers.get('content-range')}")
                async for chunk in r.aiter_raw():
                    if prog.got + pending + len(chunk) > job.length:
                        raise _TransferFailed("more bytes than the range asked for")
                    chunks.append(chunk)
                    pending += len(chunk)
                    if pending >= FLUSH_BYTES:
                        await flush()
                await flush()
        except (httpx.HTTPError, httpx.StreamError) as e:
            await flush()
            raise _TransferFailed(f"{type(e).__name__}: {e}") from None
        if prog.got < job.length:
            raise _TransferFailed(f"body ended after {prog.got} of {job.length} bytes")
