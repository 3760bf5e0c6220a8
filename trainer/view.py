"""The read-only view of a running pool that the HTTP API and the dashboard get.

The coordinator builds one `PoolView` from its services; the API never sees the services, the
trainer or the host, so it cannot change the pool except through `Operator` (which checks the
operator token first) and cannot reach back into the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class PoolInfo:
    """What the pool spec says, for people."""

    pool_id: str
    name: str
    model: str
    dtype: str
    task: str
    algorithm: str
    max_staleness: int
    temperature: float
    top_k: int
    top_p: float
    has_accuracy: bool
    """The task's rewards include an exact-answer check (the dashboard charts accuracy)."""


@dataclass(frozen=True)
class Progress:
    step: int
    version: int
    resumed_from: dict[str, int]
    """Step and version this process started at (a restart resumed there)."""
    in_training: tuple[int, ...] = ()
    """The weight version of each group a step has taken that no checkpoint covers yet: still
    untrained in the ledger, though no later step will take it."""
    frontier: int = 0
    """The newest version made, or being made by the step in progress: the next batch still
    to be taken trains the versions `max_staleness` back from the one after it."""


@dataclass(frozen=True)
class Endpoints:
    pool_id: str
    peer_id: str
    addrs: list[str]
    api_url: str
    origin_url: str


@dataclass(frozen=True)
class RelayStatus:
    """A weights source other than the origin, as the coordinator last checked it."""

    url: str
    node: str | None
    """Hex key of the node that advertised it; None for relays named in the pool spec."""
    verified: bool
    """It served the current signed manifest at the last check; only these are handed out."""
    checked_at: float
    error: str | None = None
    """Why the last check failed (a typed reason code), None when it passed."""
    versions: list[int] = field(default_factory=list)
    served: int | None = None
    """Bytes the relay says it served (its own word: shown, never relied on)."""


class LedgerReader(Protocol):
    """The ledger's read methods (see `trainer.ledger.Ledger`)."""

    def nodes(self) -> list[dict[str, Any]]: ...
    def node(self, key: bytes) -> dict[str, Any] | None: ...
    def submission(self, submission_id: int) -> dict[str, Any] | None: ...
    def recent_submissions(
        self, limit: int, node: bytes | None = None, outcome: str | None = None
    ) -> list[dict[str, Any]]: ...
    def steps(self, since: int = 0) -> list[dict[str, Any]]: ...
    def versions(self) -> list[dict[str, Any]]: ...
    def counts(self) -> dict[str, int]: ...
    def contributions(self) -> list[dict[str, Any]]: ...
    def groups_page(self, since_id: int, limit: int) -> list[dict[str, Any]]: ...
    def integrity(self) -> dict[str, int]: ...


class Operator(Protocol):
    """What the operator may do through the API (after the token check)."""

    def ban(self, key: bytes, reason: str) -> list[int]:
        """Ban a node; returns the lease ids revoked."""
        ...


class PoolView(Protocol):
    info: PoolInfo
    ledger: LedgerReader
    samples_path: Path
    """The sample log (JSONL, appended); read it from its tail only."""

    def progress(self) -> Progress: ...
    def endpoints(self) -> Endpoints | None: ...
    def weights_urls(self) -> list[str]:
        """The sources a joining node is handed: the origin, spec relays, verified relays."""
        ...

    def relays(self) -> list[RelayStatus]:
        """Every relay known, verified or not, with its last check (cached: no I/O)."""
        ...

    def weights_sources(self, node: bytes) -> dict[str, int]:
        """Bytes `node` says it fetched from each weights URL (its latest heartbeat)."""
        ...

    def origin_listing(self) -> tuple[str | None, list[int]]:
        """The origin's URL and the versions it holds."""
        ...

    def served(self, clients: bool) -> dict[str, Any] | None:
        """Bytes the origin served (per version; per client address only when `clients`)."""
        ...

    def prometheus(self) -> str: ...
    def complete(
        self, prompt: str, max_tokens: int, sample: bool, template: bool
    ) -> dict[str, Any] | None:
        """Complete `prompt` with the newest published weights (blocking: call in a worker
        thread); None before any version is published."""
        ...
