"""Versions on disk and what a server may say about them.

Layout under a store root:
    v{N}/manifest        the signed manifest bytes, exactly as served
    v{N}/payload/<name>  payload files (complete, or being filled shard by shard on a relay)
    v{N}/complete        marker: every shard is held and verified

A `StoredVersion` tracks which units (pieces, or shards in manifests without pieces) are
verified; servers wait on it to serve a shard the
moment it lands (cut-through). The store also holds the retention rule: the newest `keep`
versions stay, and so does every version one of them needs (its delta base chain, and what
its signed manifest `requires`, such as a LoRA base), so a late joiner can always reach a
retained version and use it.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import trio

from shardcast.errors import ManifestError
from shardcast.manifest import Manifest, open_manifest, shard_index, units, with_requirements

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]*", re.ASCII)  # fromhex alone takes upper case and spaces too
DEFAULT_KEEP = 4  # max_staleness (2 by default) + 2


class StoredVersion:
    def __init__(self, manifest: Manifest, manifest_bytes: bytes, folder: Path, complete: bool):
        self.manifest = manifest
        self.manifest_bytes = manifest_bytes
        self.folder = folder
        self.dropped = False
        self._have = {p.name: [complete] * len(units(manifest, p)) for p in manifest.payload}
        self._total = sum(len(held) for held in self._have.values())
        self._missing = 0 if complete else self._total
        # Units this server is fetching from a seed right now: peers leave those to it
        # rather than asking the seed for a second copy (see fetcher, `Swarming`).
        self._soon = {name: [False] * len(held) for name, held in self._have.items()}
        self.changes = 0
        """Units held plus units promised: what a peer's long-poll on `/have` waits on."""
        # Per unit (bitfield order), the value of `changes` when it last changed: a long-poll
        # that names the units it wants waits for a change to one of those only.
        self._first = shard_index(manifest)
        self._changed_at = np.full(self._total, -1, dtype=np.int64)
        self._changed = trio.Event()

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def complete(self) -> bool:
        return self._missing == 0

    def payload_path(self, name: str) -> Path:
        return self.folder / "payload" / name

    def has(self, name: str, index: int) -> bool:
        return self._have[name][index]

    @property
    def held(self) -> int:
        return self._total - self._missing

    @property
    def total(self) -> int:
        """Units in the version (pieces, or shards)."""
        return self._total

    def bitfield(self) -> str:
        """Which units are held, as hex: bit i (most significant first) is unit i in the
        manifest's order (payload files in turn). Peers read it to choose rarest-first."""
        return _hex_bits(self._have, self.manifest)

    def soon_bitfield(self) -> str:
        """Which units this server is fetching from a seed, as `bitfield` (held ones
        cleared)."""
        return _hex_bits(self._soon, self.manifest)

    async def wait_held(self, more_than: int, timeout: float) -> None:
        """Long-poll: return once more than `more_than` units are held, or on timeout."""
        with trio.move_on_after(timeout):
            while self.held <= more_than and not self.dropped:
                await self._changed.wait()

    def want_bitfield(self) -> str:
        """The units not held yet, as `bitfield`: what this server asks its peers about."""
        lacking = {name: [not b for b in held] for name, held in self._have.items()}
        return _hex_bits(lacking, self.manifest)

    def wanted_units(self, hexbits: str) -> np.ndarray:
        """Unit indices set in a peer's `want` bitfield (lower-case hex, as `bitfield`);
        ValueError if it is anything else or longer than this version's bitfield."""
        if not _HEX.fullmatch(hexbits):
            raise ValueError("want: not a lower-case hex bitfield")
        if len(hexbits) > 2 * ((self._total + 7) // 8) or len(hexbits) % 2:
            raise ValueError("want: not a bitfield of this version")
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))
        return np.flatnonzero(bits[: self._total])

    async def wait_changes(
        self, more_than: int, timeout: float, want: np.ndarray | None = None
    ) -> None:
        """Long-poll: return once `changes` exceeds `more_than` (given `want`, unit indices,
        once one of those units changed after it), or on timeout."""

        def news() -> bool:
            if want is None or more_than < 0:
                return self.changes > more_than
            return bool((self._changed_at[want] > more_than).any())

        with trio.move_on_after(timeout):
            while not news() and not self.dropped:
                await self._changed.wait()

    def promise(self, name: str, index: int) -> None:
        """Record that unit `index` of `name` is being fetched from a seed."""
        if not self._have[name][index] and not self._soon[name][index]:
            self._soon[name][index] = True
            self.changes += 1
            self._changed_at[self._first[name] + index] = self.changes
            self._wake()

    def mark(self, name: str, index: int) -> None:
        """Record that unit `index` of `name` is on disk and verified; wake waiting servers."""
        if not self._have[name][index]:
            self._have[name][index] = True
            self._soon[name][index] = False
            self._missing -= 1
            self.changes += 1
            self._changed_at[self._first[name] + index] = self.changes
            # A prune drops a version (this flag first, its folder after) while its mirror
            # may still finish units: a late joiner mirroring a dozen versions at once had
            # its folder gone under the last one, and the FileNotFoundError ended the node.
            if self._missing == 0 and not self.dropped:
                (self.folder / "complete").touch()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def drop(self) -> None:
        self.dropped = True
        self._changed.set()

    async def wait_for(self, name: str, index: int, timeout: float) -> bool:
        """Wait until the unit is held; False on timeout or if the version was dropped."""
        with trio.move_on_after(timeout):
            while not self._have[name][index]:
                if self.dropped:
                    return False
                await self._changed.wait()
            return not self.dropped
        return False


def _hex_bits(flags: dict[str, list[bool]], m: Manifest) -> str:
    bits = [b for p in m.payload for b in flags[p.name]]
    return np.packbits(np.array(bits, dtype=bool)).tobytes().hex()


class VersionStore:
    def __init__(self, root: Path, keep: int) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.versions: dict[int, StoredVersion] = {}
        self._changed = trio.Event()

    def folder(self, version: int) -> Path:
        return self.root / f"v{version}"

    def load_existing(self, public_key: bytes, pool_id: str) -> None:
        """Adopt complete versions left by an earlier run; delete incomplete ones."""
        for d in sorted(self.root.glob("v*")):
            if not d.is_dir() or not d.name[1:].isdigit():
                continue
            try:
                data = (d / "manifest").read_bytes()
                m = open_manifest(data, public_key=public_key, pool_id=pool_id)
            except (OSError, ManifestError) as e:  # a leftover we cannot trust is removed
                log.warning("removing unusable stored version %s: %s", d, e)
                shutil.rmtree(d, ignore_errors=True)
                continue
            if (d / "complete").exists() and m.version == int(d.name[1:]):
                self.versions[m.version] = StoredVersion(m, data, d, complete=True)
            else:
                shutil.rmtree(d, ignore_errors=True)

    def add(self, sv: StoredVersion) -> None:
        self.versions[sv.version] = sv
        self._notify()

    def get(self, version: int) -> StoredVersion | None:
        sv = self.versions.get(version)
        return None if sv is None or sv.dropped else sv

    def latest(self) -> int | None:
        return max(self.versions, default=None)

    def listing(self) -> dict:
        return {
            "latest": self.latest(),
            "versions": [
                {"version": v, "base": sv.manifest.base, "complete": sv.complete}
                for v, sv in sorted(self.versions.items())
            ],
        }

    async def wait_newer(self, after: int, timeout: float) -> None:
        """Long-poll: return once a version newer than `after` exists, or after `timeout`."""
        with trio.move_on_after(timeout):
            # -1 when none is held: version 0 is a version (`latest() or -1` would skip it)
            while max(self.versions, default=-1) <= after:
                await self._changed.wait()

    async def drop(self, version: int) -> None:
        sv = self.versions.pop(version, None)
        if sv is not None:
            sv.drop()
            self._notify()
            # Open streams keep their file descriptors; removing the folder is safe on POSIX.
            await trio.to_thread.run_sync(shutil.rmtree, sv.folder, True)

    def retained(self) -> set[int]:
        """The newest `keep` versions and every version they need (delta bases, required
        versions), held or not."""

        def needs(v: int) -> list[int]:
            sv = self.versions.get(v)
            return sv.manifest.needs if sv is not None else []

        return with_requirements(sorted(self.versions, reverse=True)[: self.keep], needs)

    async def prune(self) -> list[int]:
        kept = self.retained()
        gone = [v for v in self.versions if v not in kept]
        for v in gone:
            await self.drop(v)
        return gone

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
