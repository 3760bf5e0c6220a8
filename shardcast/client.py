"""Fetching versions into a local folder.

    dest/v{N}/                 a finished version: its files and `.shardcast-manifest`
    dest/.v{N}.partial/        a download in progress (resumed by the next fetch of N)
    dest/.v{N}.delta/          delta payload while a version is rebuilt from its base

Shards are written straight into their final files inside `.v{N}.partial/`; when every shard
(or every rebuilt file) is verified, the folder is renamed to `v{N}` in one step, so a folder
named `v{N}` is always complete. A delta version is rebuilt from `v{base}`; a client without
the base first fetches the base (recursively down to the last full version, at most
`full_every` steps back). A version is fetched together with the versions its manifest
`requires` (a LoRA adapter version's base), and `prune` keeps those while a kept version
requires them, however old they are.

Listings are unsigned claims. A node learns the newest real version from signed data (the
coordinator's join reply or a signed announcement) and passes it to `trust_version`; the
client then ignores any listed version above it, so a relay that lists v999 cannot make it
chase a version that does not exist. Without a trusted version, "latest" follows the
listings, skipping versions that proved fake and, for a while, the sources that listed them.
Every fetch has an overall deadline (`FetchPolicy.deadline`) and raises `FetchDeadline`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from shardcast.answers import LISTING, decode
from shardcast.delta import apply_delta
from shardcast.errors import BadAnswer, DeltaError, FetchError, ManifestError, ShardcastError
from shardcast.fetcher import (
    FetchDeadline,
    FetchPolicy,
    ResponseTooLarge,
    ShardFetcher,
    ShardJob,
    VersionGone,
    disk_error,
    get_capped,
    http_client,
    prepare_file,
    unit_jobs,
)
from shardcast.manifest import (
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    open_manifest,
    with_requirements,
)
from shardcast.shards import hash_range, link_or_copy
from shardcast.sources import SourcePicker, SourceStats

log = logging.getLogger(__name__)

MANIFEST_FILE = ".shardcast-manifest"
MAX_LISTING_BYTES = 1024 * 1024
LISTING_TIMEOUT = 10.0
MIN_POLL_ROUND_S = 1.0
"""`wait_for_newer` polls its sources at most once a second, however they answer."""


@dataclass
class BadShardReport:
    source: str
    version: int
    payload: str
    shard: int


@dataclass
class FetchResult:
    version: int
    path: Path
    payload_bytes: int
    """Bytes that had to be transferred (delta payload for a delta version)."""
    seconds: float
    bad_shards: list[BadShardReport] = field(default_factory=list)


class Client:
    """Fetches signed versions from a set of sources (origin and/or relays) into `dest`."""

    def __init__(
        self,
        sources: list[str],
        dest: Path,
        *,
        public_key: bytes,
        pool_id: str,
        keep: int = 3,
        policy: FetchPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.dest.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self.pool_id = pool_id
        self.keep = keep
        self.policy = policy or FetchPolicy()
        self.picker = SourcePicker(sources)
        self._http = http
        self.bad_shards: list[BadShardReport] = []
        self.trusted: int | None = None
        """Newest version known to be real (from signed data); listings above it are lies."""
        self._trust_rose = trio.Event()
        """Set (and replaced) each time `trusted` rises: wakes `wait_for_newer`."""
        self._fetching: dict[int, trio.Lock] = {}
        """One lock per version being fetched (see `_fetch`)."""

    def trust_version(self, version: int) -> None:
        """Tell the client that `version` exists: the caller saw it in signed data (the
        coordinator's join reply or a signed announcement). Monotonic: an older one is a
        no-op. From now on listings above the newest trusted version are ignored, and
        `fetch("latest")` fetches that version even before any source lists it."""
        if self.trusted is None or version > self.trusted:
            self.trusted = version
            self._trust_rose.set()
            self._trust_rose = trio.Event()

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = http_client(self.policy)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    # -- what is where ---------------------------------------------------------------------

    def local_versions(self) -> list[int]:
        """Complete versions held in `dest`, oldest first."""
        out = []
        for d in self.dest.glob("v*"):
            if d.name[1:].isdigit() and (d / MANIFEST_FILE).exists():
                out.append(int(d.name[1:]))
        return sorted(out)

    def bytes_by_source(self, limit: int = 32) -> dict[str, int]:
        """Verified bytes fetched from each source so far, the `limit` biggest."""
        served = sorted((s for s in self.picker.stats.values() if s.bytes), key=lambda s: -s.bytes)
        return {s.url: s.bytes for s in served[:limit]}

    def path_of(self, version: int) -> Path:
        return self.dest / f"v{version}"

    async def listings(
        self, after: int = -1, wait: float = 0.0, after_by_source: dict[str, int] | None = None
    ) -> dict[str, list[int]]:
        """The versions each reachable source lists (long-polling up to `wait` seconds for one
        newer than `after`, or than the source's own entry in `after_by_source`)."""
        out: dict[str, list[int]] = {}
        after_by_source = after_by_source or {}

        async def one(url: str) -> None:
            try:
                listed = await get_listing(self.http, url, after_by_source.get(url, after), wait)
            except LISTING_ERRORS as e:
                log.info("listing from %s failed: %s", url, e)
                return
            out[url] = list(listed)
            self.picker.note_listing(url, out[url])

        async with trio.open_nursery() as nursery:
            for url in self.picker.stats:
                nursery.start_soon(one, url)
        return out

    async def latest_version(
        self, after: int = -1, wait: float = 0.0, skip: set[int] = frozenset()
    ) -> int | None:
        """Newest version listed (a claim, checked when its manifest is fetched), `skip`
        aside, never above the trusted version; sources caught lying are not heard while
        any other source lists something."""
        return self._newest_believed(await self.listings(after, wait), skip)

    def _newest_believed(
        self, listed: dict[str, list[int]], skip: set[int] = frozenset()
    ) -> int | None:
        """The newest listed version that can be believed: not in `skip`, not above the
        trusted version, and not one every source said lately it lacks (a fresh listing from
        an unmuted source clears its mark). A muted liar listing it alone would otherwise have
        a node fetch, fail and poll again at once, round after round."""
        heard = {u: vs for u, vs in listed.items() if self.picker.heard(u)}
        best = None
        for versions in (heard or listed).values():
            for v in versions:
                if v in skip or (self.trusted is not None and v > self.trusted):
                    continue
                if (best is None or v > best) and not self.picker.all_lack(v):
                    best = v
        return best

    async def wait_for_newer(self, after: int, timeout: float) -> int | None:
        """Long-poll the sources until one lists a version newer than `after` that can be
        believed (not above the trusted version).

        Sources may list versions the signed data has not named yet, and a source answers a
        poll for what it already lists at once: asking again at once was a busy loop (in CI it
        took a node's event loop for a minute, ~45 requests a second, while the node could not
        reach its coordinator to learn newer versions). So each source is next asked for what
        is newer than all it listed, everyone again for `after` once `trust_version` rises,
        and a round ends no sooner than `MIN_POLL_ROUND_S` after it began, however the sources
        answer (a lying one only delays its own poll)."""
        seen: dict[str, int] = {}
        with trio.move_on_after(timeout):
            while True:
                rose = self._trust_rose
                started = trio.current_time()
                listed = await self._listings_unless(rose, after, min(timeout, 30.0), seen)
                v = self._newest_believed(listed)
                if v is not None and v > after:
                    return v
                for url, versions in listed.items():
                    seen[url] = max([seen.get(url, after), *versions])
                with trio.move_on_after(max(0.0, started + MIN_POLL_ROUND_S - trio.current_time())):
                    await rose.wait()
                if rose.is_set():
                    seen.clear()  # a version listed before may be believed now
        return None

    async def _listings_unless(
        self, event: trio.Event, after: int, wait: float, after_by_source: dict[str, int]
    ) -> dict[str, list[int]]:
        """`listings(...)`, or nothing as soon as `event` is set."""
        listed: dict[str, list[int]] = {}
        async with trio.open_nursery() as nursery:

            async def poll() -> None:
                listed.update(await self.listings(after, wait, after_by_source))
                nursery.cancel_scope.cancel()

            async def stop_when_set() -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(poll)
            nursery.start_soon(stop_when_set)
        return listed

    # -- fetching ---------------------------------------------------------------------------

    async def fetch_manifest(self, version: int) -> tuple[Manifest, bytes]:
        """The version's manifest from the best source that has a valid one."""
        return await fetch_manifest(
            self.http, self.picker, version, public_key=self.public_key, pool_id=self.pool_id
        )

    async def fetch(self, version: int | str = "latest", retries_on_gone: int = 3) -> FetchResult:
        """Fetch `version` (or the newest real one) into `dest/v{N}` and return where it is.

        "latest" is the trusted version when one is known (nodes should call `trust_version`
        with the version their signed data names), else the newest listed. A version that
        turns out gone (or never existed) is skipped for the next newest, up to
        `retries_on_gone` times plus once per source caught lying. Raises FetchDeadline
        after `policy.deadline` seconds, FetchError when nothing can be had.
        """
        try:
            with trio.fail_after(self.policy.deadline):
                return await self._fetch_newest(version, retries_on_gone)
        except trio.TooSlowError:
            raise FetchDeadline(
                f"fetch of {version} not done after {self.policy.deadline:.0f}s"
            ) from None

    async def _fetch_newest(self, version: int | str, retries_on_gone: int) -> FetchResult:
        gone: set[int] = set()
        # A liar costs one round before it is muted, so rounds scale with the sources.
        for _ in range(retries_on_gone + len(self.picker.stats) + 1):
            target = int(version) if version != "latest" else await self._pick_latest(gone)
            try:
                result = await self._fetch(target, depth=0)
            except VersionGone:
                if version != "latest":
                    raise
                log.info("version %d is not held anywhere; moving on to the newest", target)
                gone.add(target)
                continue
            await self.prune(protect={target})
            return result
        raise FetchError(f"every version tried was gone: {sorted(gone)}")

    async def _pick_latest(self, gone: set[int]) -> int:
        if self.trusted is not None and self.trusted not in gone:
            return self.trusted
        target = await self.latest_version(skip=gone)
        if target is None:
            raise FetchError("no source lists any version")
        return target

    async def _fetch(self, version: int, depth: int) -> FetchResult:
        """`version` fetched by one task at a time: a node fetches from its background
        follower and from its work loop at once, and two fetches of one version would build
        the same partial folder (one failed on the other's `mkdir`, killing a swarm node).
        The second finds the version held once the first is done. Locks are taken from newer
        to older versions only (bases and requirements are older), so they cannot deadlock."""
        lock = self._fetching.setdefault(version, trio.Lock())
        try:
            async with lock:
                return await self._fetch_one(version, depth)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._fetching.pop(version, None)

    async def _fetch_one(self, version: int, depth: int) -> FetchResult:
        final = self.path_of(version)
        if (final / MANIFEST_FILE).exists():
            # Held, but perhaps from before its requirements were kept: fetch them again.
            await self._fetch_required(version, self.local_requires(version), depth)
            return FetchResult(version, final, 0, 0.0)
        if depth > 1000:
            raise FetchError("delta chain too long")
        start = trio.current_time()
        m, raw = await self.fetch_manifest(version)
        reports_before = len(self.bad_shards)
        await self._fetch_required(version, m.requires, depth)
        if m.is_delta:
            assert m.base is not None
            if not (self.path_of(m.base) / MANIFEST_FILE).exists():
                await self._fetch(m.base, depth + 1)
            await self._fetch_delta(m, raw)
        else:
            await self._fetch_full(m, raw)
        return FetchResult(
            version,
            final,
            m.payload_bytes,
            trio.current_time() - start,
            self.bad_shards[reports_before:],
        )

    async def _fetch_required(self, version: int, requires: list[int], depth: int) -> None:
        """Fetch what `version` requires (its manifest checked each is older, so this ends)."""
        for r in requires:
            try:
                await self._fetch(r, depth + 1)
            except VersionGone:
                # Not "v{version} is gone": the next newest would require the same.
                raise FetchError(f"v{version} requires v{r}, which no source holds") from None

    def local_requires(self, version: int) -> list[int]:
        """What held `version` requires, from the manifest kept beside it; none when that
        cannot be read (it was checked when fetched: only a damaged disk gets here)."""
        try:
            raw = (self.path_of(version) / MANIFEST_FILE).read_bytes()
            m = open_manifest(raw, public_key=self.public_key, pool_id=self.pool_id)
        except (OSError, ShardcastError) as e:
            log.warning("cannot read the manifest of held v%d: %s", version, e)
            return []
        return m.requires

    def _fetcher(self) -> ShardFetcher:
        def report(url: str, version: int, job: ShardJob) -> None:
            self.bad_shards.append(BadShardReport(url, version, job.name, job.index))

        return ShardFetcher(self.http, self.picker, self.policy, on_corrupt=report)

    async def _download(self, m: Manifest, folder: Path, resume: bool) -> None:
        """Fetch every payload unit (piece, or shard) of `m` into `folder/<payload name>`,
        skipping units a previous, interrupted run already left there intact."""
        jobs = []
        for p in m.payload:
            path = folder / p.name
            existed = resume and path.exists() and path.stat().st_size == p.size
            try:
                if not existed:
                    await trio.to_thread.run_sync(prepare_file, path, p.size)
            except OSError as e:
                raise disk_error(e, path) from None
            for job in unit_jobs(m, p, path):
                if existed and job.hash == await trio.to_thread.run_sync(
                    hash_range, path, job.offset, job.length
                ):
                    continue
                jobs.append(job)
        await self._fetcher().fetch(m.version, jobs, unit_bytes=m.unit)

    async def _fetch_full(self, m: Manifest, raw: bytes) -> None:
        partial = self.dest / f".v{m.version}.partial"
        resume = partial.exists()
        partial.mkdir(exist_ok=True)
        await self._download(m, partial, resume)
        await self._finish(m, raw, partial)

    async def _fetch_delta(self, m: Manifest, raw: bytes) -> None:
        assert m.base is not None
        base = self.path_of(m.base)
        staging = self.dest / f".v{m.version}.delta"
        resume = staging.exists()
        staging.mkdir(exist_ok=True)
        await self._download(m, staging, resume)
        partial = self.dest / f".v{m.version}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for f in m.kept():
            await self._keep_from_base(m, base, f, partial)
        for p in m.payload:
            out = partial / p.target
            out.parent.mkdir(parents=True, exist_ok=True)
            want = m.file(p.target).hash
            try:
                if p.encoding == "raw":
                    await trio.to_thread.run_sync(os.replace, staging / p.name, out)
                    continue
                got = await trio.to_thread.run_sync(
                    apply_delta, base / p.target, staging / p.name, out
                )
            except OSError as e:
                raise disk_error(e, out) from None
            if got != want:
                raise DeltaError(
                    f"v{m.version} {p.target}: rebuilt file hashes to {got[:16]}, "
                    f"the manifest says {want[:16]}"
                )
        await self._finish(m, raw, partial)
        shutil.rmtree(staging, ignore_errors=True)

    async def _keep_from_base(self, m: Manifest, base: Path, f: FileEntry, partial: Path) -> None:
        """Take file `f`, which delta `m` leaves unchanged, from the base version held here,
        once its bytes hash as `m` says."""
        src, out = base / f.path, partial / f.path
        try:
            same = src.is_file() and src.stat().st_size == f.size
            if not same or await trio.to_thread.run_sync(hash_range, src, 0, f.size) != f.hash:
                raise DeltaError(
                    f"v{m.version} keeps {f.path} from v{m.base}, but the copy of v{m.base} "
                    f"here is not the file the manifest names (hash {f.hash[:16]})"
                )
            await trio.to_thread.run_sync(link_or_copy, src, out)
        except OSError as e:
            raise disk_error(e, out) from None

    async def _finish(self, m: Manifest, raw: bytes, partial: Path) -> None:
        """Make the version appear: manifest in, fsync, one rename."""

        def commit() -> None:
            (partial / MANIFEST_FILE).write_bytes(raw)
            for root, _, files in os.walk(partial):
                for name in files:
                    fd = os.open(Path(root, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            os.rename(partial, self.path_of(m.version))

        try:
            await trio.to_thread.run_sync(commit)
        except OSError as e:
            raise disk_error(e, partial) from None

    async def prune(self, protect: set[int] = frozenset()) -> list[int]:
        """Delete all but the newest `keep` complete versions, `protect` and what they
        require (and stale partial folders)."""
        held = self.local_versions()
        old = held[: max(0, len(held) - self.keep)]
        kept = with_requirements(
            (set(held) - set(old)) | set(protect),
            lambda v: self.local_requires(v) if v in held else [],
        )
        gone = [v for v in old if v not in kept]
        for v in gone:
            await trio.to_thread.run_sync(shutil.rmtree, self.path_of(v), True)
        newest = held[-1] if held else -1
        for d in self.dest.glob(".v*.*"):
            num = d.name[2:].split(".")[0]
            if num.isdigit() and int(num) < newest and int(num) not in kept:
                await trio.to_thread.run_sync(shutil.rmtree, d, True)
        return gone


LISTING_ERRORS = (httpx.HTTPError, trio.TooSlowError, BadAnswer, ResponseTooLarge)
"""What `get_listing` raises when a source gives no listing."""


async def get_listing(
    http: httpx.AsyncClient, url: str, after: int, wait: float
) -> dict[int, int | None]:
    """{version: base} that `url` lists (the newest few), long-polling up to `wait` seconds
    for one newer than `after`; one of `LISTING_ERRORS` if it gives none."""
    with trio.fail_after(wait + LISTING_TIMEOUT):
        params = {"after": after, "wait": wait}
        status, body = await get_capped(http, f"{url}/versions", MAX_LISTING_BYTES, params)
    if status != 200:
        raise BadAnswer(f"HTTP {status}")
    return decode(LISTING, body).bases()


async def fetch_manifest(
    http: httpx.AsyncClient,
    picker: SourcePicker,
    version: int,
    *,
    public_key: bytes,
    pool_id: str,
    first: Collection[str] = (),
) -> tuple[Manifest, bytes]:
    """Manifest of `version` (decoded, raw bytes) from the best source whose copy checks out,
    the sources in `first` (a relay's upstreams) before any other.

    A relay's picker holds every gossiped peer too, and an untried peer ranks above any
    measured source: one that accepted connections and never answered was asked first for
    every manifest, costing each member `LISTING_TIMEOUT` per version. Peers are asked only
    when `first` has no valid copy. A source that serves a bad manifest is scored as corrupt;
    VersionGone if every source says it does not hold the version.
    """
    errors: list[str] = []
    tried: set[str] = set()
    for among in (set(first), None) if first else (None,):
        while True:
            source = picker.pick(version, tried, among)
            if source is None or source.url in tried:
                break
            tried.add(source.url)
            found = await _manifest_from(http, picker, source, version, public_key, pool_id, errors)
            if found is not None:
                return found
    # Each source asked just now, or lately (a source that said so is not asked again for a
    # moment), said it does not hold the version.
    if all(e.endswith("not held") for e in errors) and (errors or picker.all_lack(version)):
        raise VersionGone(f"no source holds version {version}")
    why = "; ".join(errors) or "no source may be asked for it now (banned, or at fault lately)"
    raise FetchError(f"no valid manifest for version {version}: {why}")


async def _manifest_from(
    http: httpx.AsyncClient,
    picker: SourcePicker,
    source: SourceStats,
    version: int,
    public_key: bytes,
    pool_id: str,
    errors: list[str],
) -> tuple[Manifest, bytes] | None:
    """`version`'s manifest from `source` if its copy checks out; else None, the source
    scored and why appended to `errors`."""
    try:
        with trio.fail_after(LISTING_TIMEOUT):
            status, body = await get_capped(
                http, f"{source.url}/v/{version}/manifest", MAX_MANIFEST_BYTES
            )
        if status == 404:
            picker.record_missing(source, version)
            errors.append(f"{source.url}: not held")
            return None
        if status != 200:
            # A status is no evidence of bad bytes: an honest server answers 400 for a
            # version it cannot serve (one a liar listed) and 503 when busy. Scored as a bad
            # manifest, three such answers banned an honest source for good.
            picker.record_failure(source)
            errors.append(f"{source.url}: HTTP {status}")
            return None
        m = open_manifest(body, public_key=public_key, pool_id=pool_id, version=version)
        return m, body
    except (ManifestError, ResponseTooLarge) as e:
        picker.record_bad_manifest(source, version)
        errors.append(f"{source.url}: {e}")
    except httpx.ConnectError as e:
        picker.record_unreachable(source)
        errors.append(f"{source.url}: {type(e).__name__} {e}")
    except (trio.TooSlowError, httpx.TimeoutException) as e:
        # At fault for the version, as a shard transfer that stalls is: a timeout that only
        # halved its health (healed at every pick) left a silent source first in line. Not
        # a node's only source (its own relay), which must be asked again.
        if picker.has_alternative(version, source.url):
            picker.record_too_slow(source, version, 0, LISTING_TIMEOUT)
        else:
            picker.record_failure(source)
        errors.append(f"{source.url}: {type(e).__name__} {e}")
    except httpx.HTTPError as e:
        picker.record_failure(source)
        errors.append(f"{source.url}: {type(e).__name__} {e}")
    return None
