"""Linux network namespaces for NAT tests: a public network, and a private one behind a
router that masquerades (source NAT) and drops unsolicited inbound connections, as a home
router does. Private address ranges only; nothing here touches the host's own interfaces
beyond the veth pairs it creates, and everything is removed on exit, failure included.

    public (10.201.1.2) --- (10.201.1.1) router (10.201.2.1) --- (10.201.2.2) nat
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
ROUTER_NAT_IP = "10.201.2.1"


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
def nat_lab() -> Iterator[Lab]:
    """The three namespaces, wired; raises NetnsUnavailable when they cannot be made."""
    why = _unavailable()
    if why:
        raise NetnsUnavailable(why)
    tag = uuid.uuid4().hex[:6]  # interface names hold at most 15 characters
    lab = Lab(f"scpub{tag}", f"scrtr{tag}", f"scnat{tag}")
    made: list[str] = []
    try:
        for ns in (lab.public, lab.router, lab.nat):
            try:
                _run("ip", "netns", "add", ns)
            except RuntimeError as e:
                raise NetnsUnavailable(f"cannot create a network namespace: {e}") from None
            made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        # veth pairs are made in the router namespace, then one end is moved out.
        pub_r, pub_p = f"vr{tag}p", f"vp{tag}"
        nat_r, nat_n = f"vr{tag}n", f"vn{tag}"
        _run("ip", "-n", lab.router, "link", "add", pub_r, "type", "veth", "peer", "name", pub_p)
        _run("ip", "-n", lab.router, "link", "add", nat_r, "type", "veth", "peer", "name", nat_n)
        _run("ip", "-n", lab.router, "link", "set", pub_p, "netns", lab.public)
        _run("ip", "-n", lab.router, "link", "set", nat_n, "netns", lab.nat)
        for ns, dev, ip in (
            (lab.router, pub_r, ROUTER_PUBLIC_IP),
            (lab.router, nat_r, ROUTER_NAT_IP),
            (lab.public, pub_p, PUBLIC_IP),
            (lab.nat, nat_n, NAT_IP),
        ):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
        # The NATed host's only way out is the router; the public host has no route into
        # the private range at all (as on the internet).
        _run("ip", "-n", lab.nat, "route", "add", "default", "via", ROUTER_NAT_IP)
        router = ["ip", "netns", "exec", lab.router]
        _run(*router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        _run(*router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.201.2.0/24",
             "-o", pub_r, "-j", "MASQUERADE")  # fmt: skip
        _run(*router, "iptables", "-A", "FORWARD", "-i", pub_r, "-o", nat_r, "-m", "conntrack",
             "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
        _run(*router, "iptables", "-A", "FORWARD", "-i", pub_r, "-o", nat_r, "-j", "DROP")
        yield lab
    finally:
        # Deleting a namespace takes its veth ends (and their peers) with it.
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
