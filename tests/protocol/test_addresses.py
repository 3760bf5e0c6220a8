"""protocol.addresses: unspecified listen addresses become the interface addresses peers dial."""

import socket
from types import SimpleNamespace

import pytest

from protocol import addresses
from protocol.addresses import dialable, interface_ips

PEER = "/p2p/12D3KooWNuxpRZy3MpqZjXMmrhMvz4ADryqXg7F4usmeiFzJ7T6r"


@pytest.fixture
def interfaces(monkeypatch):
    def entry(family, address):
        return SimpleNamespace(family=family, address=address)

    table = {
        "lo": [entry(socket.AF_INET, "127.0.0.1"), entry(socket.AF_INET6, "::1")],
        "eth0": [
            entry(socket.AF_INET, "203.0.113.7"),
            entry(socket.AF_INET6, "2001:db8::7"),
            entry(socket.AF_INET6, "fe80::1%eth0"),  # link-local: needs a scope, left out
            entry(socket.AF_PACKET, "00:11:22:33:44:55"),
        ],
        "docker0": [entry(socket.AF_INET, "172.17.0.1"), entry(socket.AF_INET, "169.254.3.3")],
    }
    monkeypatch.setattr(addresses.psutil, "net_if_addrs", lambda: table)


def test_interface_ips_put_loopback_last_and_leave_out_link_local(interfaces):
    assert interface_ips("ip4") == ["203.0.113.7", "172.17.0.1", "127.0.0.1"]
    assert interface_ips("ip6") == ["2001:db8::7", "::1"]


def test_unspecified_addresses_expand_and_others_stay(interfaces):
    got = dialable(
        [
            f"/ip4/0.0.0.0/tcp/4001{PEER}",
            f"/ip4/127.0.0.1/tcp/4001{PEER}",  # already there: not repeated
            f"/ip6/::/tcp/4002{PEER}",
            "/ip4/198.51.100.1/tcp/9",
        ]
    )
    assert got == [
        f"/ip4/203.0.113.7/tcp/4001{PEER}",
        f"/ip4/172.17.0.1/tcp/4001{PEER}",
        f"/ip4/127.0.0.1/tcp/4001{PEER}",
        f"/ip6/2001:db8::7/tcp/4002{PEER}",
        f"/ip6/::1/tcp/4002{PEER}",
        "/ip4/198.51.100.1/tcp/9",
    ]
