"""The one exception family of swarmrl.

Everything that refuses input from the outside (bytes off the wire, a key file, a pool spec, a
proof) raises a subclass of `SwarmError` with a message that says what was wrong and, where it
helps, what to do. Callers at a trust boundary catch `SwarmError` and nothing broader.
"""


class SwarmError(Exception):
    """Base class of every error swarmrl raises on purpose."""


class ProtocolError(SwarmError):
    """A message could not be decoded, was too large, or failed a signature or replay check."""


class NotFresh(ProtocolError):
    """A signed message outside the time window or seen before: a sender's clock, or its
    retry of a frame whose reply was lost. Never proof of a lie (only the signer can send its
    own envelopes), so never a mark against the sender."""


class KeyFileError(SwarmError):
    """A key file is missing, malformed, or readable by others."""


class PoolSpecError(SwarmError):
    """A pool spec is malformed, or does not hash to the pool id it was fetched for."""


class TransportError(SwarmError):
    """A peer could not be reached, dropped the stream, or did not answer in time."""


class SilentConnection(TransportError):
    """A connection that looks open did not answer a stream negotiation in time, so it was
    closed: the next try dials afresh."""


class RemoteError(ProtocolError):
    """The peer answered a request with an error reply (refused, rate limited, bad request)."""

    def __init__(self, code: str, detail: str, retry_after_s: float = 0.0) -> None:
        super().__init__(f"peer refused the request ({code}): {detail}")
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s


class DiscoveryError(SwarmError):
    """No peer could tell us where a pool's coordinator is, or none told the truth."""
