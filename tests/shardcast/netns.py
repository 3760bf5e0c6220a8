"""Linux network namespaces for NAT tests: a public network, and private ones, each behind a
router that masquerades (source NAT) and drops unsolicited inbound connections, as a home
router does. Private address ranges only; nothing here touches the host's own interfaces
beyond the veth pairs and the bridge it creates, and everything is removed on exit, failure
included.

    public (10.201.1.2, a bridge) --- (10.201.1.1) router (10.201.2.1) --- (10.201.2.2) nat
                                  --- (10.201.1.3) router2 (10.201.3.1) --- (10.201.3.2) nat2
                                      (the second private network only with `nats=2`)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

import pytest

PUBLIC_IP = "10.201.1.2"
ROUTER_PUBLIC_IP = "10.201.1.1"
NAT_IP = "10.201.2.2"
ROUTER2_PUBLIC_IP = "10.201.1.3"
NAT2_IP = "10.201.3.2"


class NetnsUnavailable(Exception):
    """This machine cannot make namespaces here (not root, no tools, no CAP_NET_ADMIN)."""


def unavailable_here(e: NetnsUnavailable) -> NoReturn:
    """A developer without root or the tools skips the NAT tests, told why. CI runs as root
    after scripts/setup.sh installed `ip` and `iptables`, so there a missing piece fails
    rather than hide the tests (as the browser tests do without Chromium)."""
    why = f"NAT tests need network namespaces: {e}"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@dataclass(frozen=True)
class Lab:
    public: str
    router: str
    nat: str
    router2: str | None = None
    nat2: str | None = None

    def exec_prefix(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    missing = [t for t in ("ip", "iptables") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (scripts/setup.sh installs them as root)"
    return None


@contextmanager
def nat_lab(nats: int = 1) -> Iterator[Lab]:
    """The namespaces, wired: the public one and `nats` (1 or 2) private networks, each behind
    its own router; raises NetnsUnavailable when they cannot be made."""
    why = _unavailable()
    if why:
        raise NetnsUnavailable(why)
    tag = uuid.uuid4().hex[:6]  # interface names hold at most 15 characters
    second = nats == 2
    lab = Lab(
        f"scpub{tag}",
        f"scrtr{tag}",
        f"scnat{tag}",
        f"scrt2{tag}" if second else None,
        f"scna2{tag}" if second else None,
    )
    made: list[str] = []
    try:
        for ns in (lab.public, lab.router, lab.nat, lab.router2, lab.nat2):
            if ns is None:
                continue
            try:
                _run("ip", "netns", "add", ns)
            except RuntimeError as e:
                raise NetnsUnavailable(f"cannot create a network namespace: {e}") from None
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # The public network is a bridge, so that several routers can sit on it.
        bridge = f"br{tag}"
        _run("ip", "-n", lab.public, "link", "add", bridge, "type", "bridge")
        _run("ip", "-n", lab.public, "addr", "add", f"{PUBLIC_IP}/24", "dev", bridge)
        _run("ip", "-n", lab.public, "link", "set", bridge, "up")
        _private_network(lab.public, bridge, lab.router, lab.nat, f"{tag}a", 2, ROUTER_PUBLIC_IP)
        if second:
            assert lab.router2 is not None and lab.nat2 is not None
            _private_network(
                lab.public, bridge, lab.router2, lab.nat2, f"{tag}b", 3, ROUTER2_PUBLIC_IP
            )
        yield lab
    finally:
        # Deleting a namespace takes its veth ends (and their peers) with it.
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def _private_network(
    public: str, bridge: str, router: str, nat: str, tag: str, net: int, router_public_ip: str
) -> None:
    """`nat` in 10.201.`net`.0/24 behind `router`, whose other side is `router_public_ip` on
    the public bridge. The NATed host's only way out is its router; the public network has
    no route into the private range at all (as on the internet)."""
    pub_r, pub_p = f"vr{tag}p", f"vp{tag}"
    nat_r, nat_n = f"vr{tag}n", f"vn{tag}"
    # veth pairs are made in the router namespace, then one end is moved out.
    _run("ip", "-n", router, "link", "add", pub_r, "type", "veth", "peer", "name", pub_p)
    _run("ip", "-n", router, "link", "add", nat_r, "type", "veth", "peer", "name", nat_n)
    _run("ip", "-n", router, "link", "set", pub_p, "netns", public)
    _run("ip", "-n", router, "link", "set", nat_n, "netns", nat)
    _run("ip", "-n", public, "link", "set", pub_p, "master", bridge)
    _run("ip", "-n", public, "link", "set", pub_p, "up")
    for ns, dev, ip in (
        (router, pub_r, router_public_ip),
        (router, nat_r, f"10.201.{net}.1"),
        (nat, nat_n, f"10.201.{net}.2"),
    ):
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        _run("ip", "-n", ns, "link", "set", dev, "up")
    _run("ip", "-n", nat, "route", "add", "default", "via", f"10.201.{net}.1")
    in_router = ["ip", "netns", "exec", router]
    _run(*in_router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    _run(*in_router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"10.201.{net}.0/24",
         "-o", pub_r, "-j", "MASQUERADE")  # fmt: skip
    _run(*in_router, "iptables", "-A", "FORWARD", "-i", pub_r, "-o", nat_r, "-m", "conntrack",
         "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
    _run(*in_router, "iptables", "-A", "FORWARD", "-i", pub_r, "-o", nat_r, "-j", "DROP")
    # Unsolicited packets to the router's own public address are dropped too, not answered
    # with a reset: a reset would cancel the outbound mapping a hole punch is opening from
    # the other side (each side's first SYN reaches the other router before that router's
    # own SYN has left, and a reset there ends both attempts).
    _run(*in_router, "iptables", "-A", "INPUT", "-i", pub_r, "-m", "conntrack", "--ctstate",
         "NEW,INVALID", "-j", "DROP")  # fmt: skip
