"""Listen addresses as others can dial them.

A host listening on an unspecified address (`/ip4/0.0.0.0/...`, `/ip6/::/...`) accepts on
every interface, but libp2p reports the unspecified address itself, which no peer can dial.
Worse, an AutoNAT server dials back only addresses at the IP it sees the asker at, so a node
that advertised `0.0.0.0` was always told "private", even on a public IP, and served through
the coordinator's relay hop (docs/security.md, "NAT traversal"). `dialable` expands such an
address into one per interface address of its family: the others first, loopback last (a
peer elsewhere that dials its own loopback first may reach whatever listens there).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

import psutil

_UNSPECIFIED = {"ip4": "0.0.0.0", "ip6": "::"}
_FAMILY = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}


def interface_ips(protocol: str) -> list[str]:
    """This machine's addresses for `protocol` ("ip4" or "ip6"), link-local ones left out
    (they need a scope no multiaddr carries), loopback last."""
    found: list[str] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family != _FAMILY[protocol]:
                continue
            ip = ipaddress.ip_address(entry.address.split("%")[0])
            if not ip.is_link_local and str(ip) not in found:
                found.append(str(ip))
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def dialable(addrs: Iterable[str]) -> list[str]:
    """`addrs` (multiaddr strings) with each unspecified IP replaced by this machine's
    interface addresses of the same family; other addresses unchanged, order kept."""
    out: list[str] = []
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) > 2 and _UNSPECIFIED.get(parts[1]) == parts[2]:
            expanded = ["/".join([*parts[:2], ip, *parts[3:]]) for ip in interface_ips(parts[1])]
        else:
            expanded = [addr]
        out.extend(a for a in expanded if a not in out)
    return out
