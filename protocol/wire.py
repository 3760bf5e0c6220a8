"""Declared, versioned wire types and their strict, bounded codec.

Every message is a `Message` subclass: a frozen msgspec struct with a `kind` tag, a wire version
and a maximum encoded size. Decoding checks the size before parsing, then types and field
constraints (msgspec `Meta` bounds), and refuses unknown fields. Any failure is a
`ProtocolError` with the reason; no other exception escapes `decode`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from protocol.errors import ProtocolError

WIRE_VERSION = 1

# Common field shapes, so bounds are declared once.
PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
ShortStr = Annotated[str, msgspec.Meta(max_length=256)]
PoolId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z2-7]+$")]
UInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]


class Message(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="kind", kw_only=True
):
    """Base of all wire messages. Subclasses set `max_bytes` for their encoded size."""

    max_bytes: ClassVar[int] = 64 * 1024

    @classmethod
    def kind(cls) -> str:
        # The struct config holds the resolved tag; `msgspec.inspect.type_info` rebuilds the
        # whole type description on every call (~0.6 ms), and this runs for every envelope.
        return cls.__struct_config__.tag  # type: ignore[return-value]


M = TypeVar("M", bound=Message)

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def encode(message: msgspec.Struct) -> bytes:
    """Encode a wire struct to msgpack bytes."""
    return _encoder.encode(message)


def decode(data: bytes, type_: type[M], max_bytes: int | None = None) -> M:
    """Decode `data` as `type_`, refusing anything larger than its bound or malformed."""
    limit = type_.max_bytes if max_bytes is None else max_bytes
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"expected bytes for {type_.__name__}, got {type(data).__name__}")
    if len(data) > limit:
        raise ProtocolError(f"{type_.__name__} of {len(data)} bytes exceeds the {limit}-byte limit")
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.msgpack.Decoder(type_)
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:
        raise ProtocolError(f"invalid {type_.__name__}: {e}") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed {type_.__name__}: {e}") from None
    except (RecursionError, MemoryError, ValueError, OverflowError) as e:
        raise ProtocolError(f"malformed {type_.__name__}: {type(e).__name__}") from None
