"""How near an address is, and so which gossiped URLs a member may follow.

An announcement is signed by whoever made it, about any `http://host:port` it likes (a free
identity makes as many as it wants). A member that followed every URL it heard of could be
aimed, one announcement per target, at the hosts of its own network: its loopback and its
LAN, which nobody outside could otherwise reach, would get GETs of the swarm's paths (a
blind scan, each answer read only by the member). So a gossiped URL is followed only when it
is an IP address no nearer than the pool's own sources (`pool_scope`): a pool served from
public addresses follows public ones, a LAN pool also private ones, and a pool on one
machine (the simulated swarm, tests) anything. A name is followed only in a loopback pool:
it may resolve to one address when checked and another when fetched. URLs the coordinator
vouches for in its signed list are not filtered: it probed each at its node's own address.
The same rule bounds the addresses a peer reports for a hole punch (DCUtR): `may_dial`.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class Scope(enum.IntEnum):
    LOOPBACK = 0
    """This machine (the unspecified address reaches it too)."""
    PRIVATE = 1
    """A local network: RFC 1918, unique-local, link-local, shared and documentation
    ranges; anything not globally routable."""
    PUBLIC = 2


def plain_ip(text: str) -> IP:
    """`text` as an IP address, an IPv4-mapped IPv6 address as its IPv4 one; ValueError if
    it is not one."""
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def scope_of(ip: IP) -> Scope | None:
    """Where `ip` is; None for addresses never dialled (multicast, reserved)."""
    if ip.is_loopback or ip.is_unspecified:
        return Scope.LOOPBACK
    if ip.is_multicast or ip.is_reserved:
        return None
    return Scope.PUBLIC if ip.is_global else Scope.PRIVATE


@lru_cache(maxsize=4096)
def url_scope(url: str) -> Scope | None:
    """The scope of an http(s) URL's host when it is an IP address (or `localhost`); None
    for another name, an address never dialled, or no http(s) URL at all."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return None
        host = parts.hostname or ""
        if host == "localhost" or host.endswith(".localhost"):
            return Scope.LOOPBACK  # resolved on this machine by convention (RFC 6761)
        return scope_of(plain_ip(host))
    except ValueError:
        return None


def pool_scope(sources: Iterable[str]) -> Scope:
    """How far the pool's own sources reach: the scope of the most public one (a name counts
    as public; `p2p://` sources do not count). PUBLIC when no http(s) source is given."""
    found = [url_scope(u) for u in sources if urlsplit(u).scheme in ("http", "https")]
    return max((Scope.PUBLIC if s is None else s for s in found), default=Scope.PUBLIC)


def multiaddr_scope(addr: str) -> Scope | None:
    """The scope of a multiaddr's IP (`/ip4/...`, `/ip6/...`); None for any other kind (a
    DNS name) or an address never dialled."""
    parts = str(addr).split("/")
    if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
        return None
    try:
        return scope_of(plain_ip(parts[2]))
    except ValueError:
        return None


def dial_floor(hops: Iterable[str]) -> Scope:
    """How near an address a peer reports for a direct dial (DCUtR) may be: as near as the
    most public relay hop (multiaddrs), never this machine unless every hop is on it;
    PRIVATE when no hop is known."""
    found = [multiaddr_scope(h) for h in hops]
    return max((Scope.PUBLIC if s is None else s for s in found), default=Scope.PRIVATE)


def may_dial(addr: str, floor: Scope) -> bool:
    """Whether a peer's reported multiaddr `addr` may be dialled under `floor`."""
    scope = multiaddr_scope(addr)
    return scope is not None and scope >= floor


def may_follow(url: str, pool: Scope) -> bool:
    """Whether a member of a pool of scope `pool` may fetch from the gossiped `url`."""
    if pool is Scope.LOOPBACK:
        return True
    scope = url_scope(url)
    return scope is not None and scope >= pool
