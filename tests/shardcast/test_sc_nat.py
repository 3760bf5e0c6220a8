"""SHARDCAST across a NAT, in network namespaces the test makes itself (`netns.nat_lab`).

A public namespace runs the origin (HTTP) and a libp2p relay hop; a namespace behind a
masquerading router runs members. A NATed member mirrors from the origin over HTTP (outbound
works through NAT) and serves over libp2p through its reservation on the hop; a public
fetcher, which cannot reach the member's HTTP port, fetches from it through the circuit with
every byte checked against the signed manifest, and scores down a NATed member that serves
corrupt bytes. A second private network, behind a router of its own, holds a peer that
punches a hole to a member through both NATs. Every process is real; every one runs under
`ip netns exec`.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import (
    NAT2_IP,
    NAT_IP,
    PUBLIC_IP,
    ROUTER_PUBLIC_IP,
    Lab,
    NetnsUnavailable,
    nat_lab,
    unavailable_here,
)
from sc_helpers import REPO, SHARD, Proc, make_checkpoint, same_tree
from test_sc_processes import pool_file, publish

from protocol.identity import Identity
from shardcast.p2p import p2p_url

HELPERS = Path(__file__).parent / "helpers"


class NsProc(Proc):
    """A `Proc` run inside a network namespace."""

    def __init__(self, ns: str, args: list[str], log: Path, script: Path | None = None) -> None:
        self.log = log
        self.args = args
        cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "shardcast"]
        env = {**os.environ, "PYTHONPATH": f"{REPO}:{HELPERS}"}
        self.popen = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd, *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
            text=True,
            cwd=REPO,
            env=env,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()


@dataclass
class World:
    lab: Lab
    tmp: Path
    pool: Path
    pool_id: str
    public_key: str
    checkpoint: Path
    origin: str
    hop: str
    member: dict
    procs: list[NsProc]

    def start(self, ns: str, *args: str, script: Path | None = None) -> NsProc:
        p = NsProc(ns, list(args), self.tmp / f"proc{len(self.procs)}.log", script)
        self.procs.append(p)
        return p

    def fetch(self, ns: str, dest: str, sources: list[str], *extra: str) -> NsProc:
        args = ["fetch", "--dest", str(self.tmp / dest), "--pool", str(self.pool)]
        args += ["--read-timeout", "10", "--version", "latest", "--wait", "30", "--after", "0"]
        for s in sources:
            args += ["--source", s]
        return self.start(ns, *args, *extra)


def wait_complete(root: Path, version: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not (root / f"v{version}" / "complete").exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{root} never held version {version}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("nat")
    identity = Identity(bytes(range(32)))
    key = tmp / "coordinator.key"
    identity.save(key)
    pool, pool_id = pool_file(tmp, identity)
    ck = make_checkpoint(tmp / "ck", mb=2)
    try:
        lab_cm = nat_lab(nats=2)
        lab = lab_cm.__enter__()
    except NetnsUnavailable as e:
        unavailable_here(e)
    w = World(lab, tmp, pool, pool_id, identity.public_key.hex(), ck, "", "", {}, [])
    try:
        origin = w.start(lab.public, "origin", "--root", str(tmp / "origin"), "--key", str(key),
                         "--pool", str(pool), "--host", PUBLIC_IP, "--port", "0")  # fmt: skip
        hop = w.start(lab.public, "hop", "--listen", f"/ip4/{PUBLIC_IP}/tcp/0")
        w.origin = origin.announcement()["url"]
        w.hop = hop.announcement()["addrs"][0]
        member = w.start(lab.nat, "relay", "--root", str(tmp / "member"), "--pool", str(pool),
                         "--host", NAT_IP, "--port", "0", "--upstream", w.origin,
                         "--p2p-relay", w.hop, "--p2p-listen", f"/ip4/{NAT_IP}/tcp/0")  # fmt: skip
        w.member = member.announcement(timeout=60)
        publish(key, pool, tmp / "origin", ck, 1)
        yield w
    finally:
        for p in w.procs:
            p.kill()
        lab_cm.__exit__(None, None, None)


def test_nat_member_fetches_signed_version_from_public_origin(world: World) -> None:
    # The member relay mirrors through the NAT on its own; a plain client there does too.
    wait_complete(world.tmp / "member", 1)
    c = world.fetch(world.lab.nat, "nat-client", [world.origin])
    assert c.wait(60) == 0, c.stderr()
    r = c.announcement()
    assert r["version"] == 1 and not r["bad_shards"]
    assert same_tree(Path(r["path"]), world.checkpoint)


def test_nat_public_member_fetches_through_relay_circuit(world: World) -> None:
    member_http = world.member["url"]
    assert member_http.startswith(f"http://{NAT_IP}:")
    # The dial-back check found the NATed member unreachable, so it took a relay slot.
    assert world.member["reachability"] == "private"
    (circuit,) = world.member["p2p_addrs"]
    assert circuit.startswith(world.hop + "/p2p-circuit/")
    # The public side cannot reach the member's HTTP port at all...
    probe = world.start(world.lab.public, "fetch", "--dest", str(world.tmp / "probe"), "--pool",
                        str(world.pool), "--source", member_http, "--attempts", "1",
                        "--read-timeout", "3")  # fmt: skip
    assert probe.wait(60) != 0
    # ...but a public member mirrors from it through the relay hop, every piece verified,
    # and serves what it got over plain HTTP.
    wait_complete(world.tmp / "member", 1)
    start = time.monotonic()
    public = world.start(world.lab.public, "relay", "--root", str(world.tmp / "public"),
                         "--pool", str(world.pool), "--host", PUBLIC_IP, "--port", "0",
                         "--upstream", p2p_url(world.member["peer_id"]), "--p2p-peer", circuit,
                         "--p2p-relay", world.hop,
                         "--p2p-listen", f"/ip4/{PUBLIC_IP}/tcp/0")  # fmt: skip
    info = public.announcement(timeout=60)
    assert info["reachability"] == "public"
    assert all("/p2p-circuit" not in a for a in info["p2p_addrs"])
    wait_complete(world.tmp / "public", 1, timeout=60)
    print(f"public member mirrored v1 through the relay in {time.monotonic() - start:.1f} s")
    c = world.fetch(world.lab.public, "pub-client", [info["url"]])
    assert c.wait(60) == 0, c.stderr()
    r = c.announcement()
    assert r["version"] == 1 and not r["bad_shards"]
    assert same_tree(Path(r["path"]), world.checkpoint)


def test_nat_corrupt_stream_peer_is_scored_down(world: World) -> None:
    evil = world.start(world.lab.nat, world.origin, str(world.tmp / "evil"), world.pool_id,
                       world.public_key, str(SHARD), NAT_IP, world.hop,
                       script=HELPERS / "evil_p2p_member.py")  # fmt: skip
    info = evil.announcement(timeout=60)
    wait_complete(world.tmp / "evil", 1)
    bad = p2p_url(info["peer_id"])
    c = world.fetch(world.lab.public, "pub-evil", [bad, world.origin], "--parallel", "4",
                    "--p2p-peer", info["p2p_addrs"][0])  # fmt: skip
    assert c.wait(90) == 0, c.stderr()
    r = c.announcement()
    assert same_tree(Path(r["path"]), world.checkpoint)
    reported = {b["source"] for b in r["bad_shards"]}
    assert reported == {bad}
    assert all(b["shard"] % 2 == 0 for b in r["bad_shards"])


def test_nat_dcutr_upgrades_the_circuit_to_a_direct_connection(world: World) -> None:
    # A public peer reaches the NATed member through the hop; DCUtR then has both sides dial
    # each other, and the NATed side's outbound dial passes its router (MASQUERADE): the
    # direct connection arrives from the router's public address.
    (circuit,) = world.member["p2p_addrs"]
    probe = world.start(world.lab.public, f"/ip4/{PUBLIC_IP}/tcp/0", world.member["peer_id"],
                        circuit, script=HELPERS / "dcutr_probe.py")  # fmt: skip
    r = probe.announcement(timeout=90)
    print(f"DCUtR: direct connection {r['direct']} after {r['seconds']} s")
    assert r["relayed"]
    assert any(f"/ip4/{ROUTER_PUBLIC_IP}/tcp/" in a for a in r["direct"]), r
    assert r["stream_direct"]


def test_nat_dcutr_punches_through_two_nats(world: World) -> None:
    # Both peers behind their own masquerading router, neither reachable from outside: the
    # probe in the second private network reaches a member through the hop, then DCUtR has
    # both dial each other at once from their listening ports (TCP simultaneous open), and
    # each router lets the other's SYN in as the reply to its own host's outbound one.
    # A member of its own: py-libp2p punches holes to one relayed peer after another, and the
    # shared member is still retrying the peers of the tests above, long gone (10 s a try).
    second = world.start(world.lab.nat, "relay", "--root", str(world.tmp / "member2"),
                         "--pool", str(world.pool), "--host", NAT_IP, "--port", "0",
                         "--upstream", world.origin, "--p2p-relay", world.hop,
                         "--p2p-listen", f"/ip4/{NAT_IP}/tcp/0")  # fmt: skip
    member = second.announcement(timeout=60)
    (circuit,) = member["p2p_addrs"]
    probe = world.start(world.lab.nat2, f"/ip4/{NAT2_IP}/tcp/0", member["peer_id"], circuit,
                        script=HELPERS / "dcutr_probe.py")  # fmt: skip
    r = probe.announcement(timeout=90)
    print(f"DCUtR through two NATs: direct connection {r['direct']} after {r['seconds']} s")
    assert r["relayed"]
    assert any(f"/ip4/{ROUTER_PUBLIC_IP}/tcp/" in a for a in r["direct"]), r
    assert r["stream_direct"]
