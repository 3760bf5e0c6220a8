"""Errors shardcast raises on purpose; all are `SwarmError`s so callers at a trust boundary
catch one family."""

import trio

from protocol.errors import SwarmError


class ShardcastError(SwarmError):
    """Base of shardcast's errors."""


class ManifestError(ShardcastError):
    """A manifest is malformed, badly signed, or for another pool."""


class FetchError(ShardcastError):
    """A version could not be fetched: no source had it, retries ran out, or the disk failed."""


class BadAnswer(ShardcastError):
    """A peer's or upstream's JSON answer is malformed: not JSON, nested too deep, or not the
    shape or range its endpoint has. A fault of whoever sent it, never of the reader."""


class DeltaError(ShardcastError):
    """A delta payload is malformed or does not reconstruct the files its manifest names."""


def first_error(group: BaseExceptionGroup, *, cancelled: bool = False) -> BaseException:
    """The exception to raise for a nursery's group: its first `ShardcastError` when every
    leaf is one (so callers catch plain errors), else the group itself (a bug, or a
    cancellation, must not be hidden). `cancelled`: the caller's own scope was cancelled, so
    `trio.Cancelled` leaves are its doing and do not count (trio raises them again at the
    next checkpoint if an outer scope was cancelled too)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    if cancelled:
        leaves = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if leaves and all(isinstance(e, ShardcastError) for e in leaves):
        return leaves[0]
    return group
