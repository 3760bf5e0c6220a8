"""A pool across a NAT, end to end, in network namespaces the test makes (tests/shardcast/netns.py).

The coordinator (`coordinator run`, a real process) is in the public namespace and runs the
pool's relay hop. Node A (`node join`) is behind a masquerading router: its dial-back check
through the coordinator says it cannot be dialled, so it re-serves its weights over libp2p
and advertises `p2p://peer/<its id>`. The coordinator checks that source over A's own
connection like any relay and hands it out. A pool member B in the public namespace, which
cannot reach A's HTTP port, fetches a version from A alone, through the coordinator's hop,
every byte checked against the signed manifest.

Run as a script (`fetch ...`), this file is member B: it joins the pool with a fresh key and
fetches from A (see `_fetch_through_a`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.pool import FAST, _env
from tests.shardcast.netns import (
    NAT_IP,
    PUBLIC_IP,
    Lab,
    NetnsUnavailable,
    nat_lab,
    unavailable_here,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
P2P_PORT, ORIGIN_PORT, API_PORT, RELAY_PORT = 7101, 7102, 7103, 7104


@dataclass
class NatPool:
    lab: Lab
    tmp: Path
    pool_id: str
    bootstrap: str
    a_peer: str
    a_key: str
    procs: list[subprocess.Popen]

    def status(self, path: str = "/api/status") -> dict:
        """An API page, read from inside the public namespace (the API listens there)."""
        url = f"http://{PUBLIC_IP}:{API_PORT}{path}"
        code = f"import urllib.request as u;print(u.urlopen({url!r},timeout=5).read().decode())"
        out = _ns(self.lab.public, sys.executable, "-c", code, timeout=20)
        return json.loads(out.stdout)

    def wait_for(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        last: dict | None = None
        while time.monotonic() < deadline:
            try:
                last = self.status()
                if predicate(last):
                    return last
            except (subprocess.CalledProcessError, ValueError):
                pass
            time.sleep(1.0)
        raise AssertionError(f"timed out waiting for {what}; last status {last}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in self.tmp.glob("*.log"))


def _ns(ns: str, *cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env=_env(REPO),
        cwd=REPO,
    )


def _start(ns: str, log: Path, *cmd: str) -> subprocess.Popen:
    env = {**_env(log.parent / "home"), "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, *cmd],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )


def _init_pool(tmp: Path) -> tuple[Path, str]:
    spec = tmp / "pool.toml"
    args = ["init", "--model", "tiny", "-o", str(spec)]
    args += ["--listen", f"/ip4/{PUBLIC_IP}/tcp/{P2P_PORT}"]
    args += ["--origin", f"http://{PUBLIC_IP}:{ORIGIN_PORT}"]
    for s in FAST:
        args += ["--set", s]
    out = subprocess.run(
        [sys.executable, "-m", "trainer", *args],
        env=_env(tmp / "home"),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return spec, re.search(r"pool id: (\w+)", out.stdout).group(1)


def _wait_for_line(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := re.search(pattern, log.read_text()):
            return m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"{log.name}: no {pattern!r}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def nat_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatPool]:
    from protocol.identity import Identity

    tmp = tmp_path_factory.mktemp("pool_nat")
    try:
        lab_cm = nat_lab()
        lab = lab_cm.__enter__()
    except NetnsUnavailable as e:
        unavailable_here(e)
    procs: list[subprocess.Popen] = []
    try:
        spec, pool_id = _init_pool(tmp)
        log = tmp / "coordinator.log"
        procs.append(_start(lab.public, log, "-m", "trainer", "run", str(spec), "--data-dir",
                            str(tmp / "coordinator"), "--host", PUBLIC_IP,
                            "--http-port", str(API_PORT)))  # fmt: skip
        bootstrap = _wait_for_line(log, r"libp2p:\s+(\S+)", procs[-1], 120)
        a_key_file = tmp / "a.key"
        identity = Identity.generate()
        identity.save(a_key_file)
        procs.append(_start(lab.nat, tmp / "a.log", "-m", "node", "join", "--pool", pool_id,
                            "--bootstrap", bootstrap, "--key", str(a_key_file), "--data-dir",
                            str(tmp / "a"), "--listen", f"/ip4/{NAT_IP}/tcp/0",
                            "--relay-host", NAT_IP, "--relay", str(RELAY_PORT),
                            "--quiet"))  # fmt: skip
        yield NatPool(
            lab, tmp, pool_id, bootstrap, identity.peer_id(), identity.public_key.hex(), procs
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        lab_cm.__exit__(None, None, None)


def test_pool_nat_node_serves_through_the_coordinators_hop(nat_pool: NatPool) -> None:
    a_url = f"p2p://peer/{nat_pool.a_peer}"
    # A joins and works: its answers are accepted and the pool steps.
    nat_pool.wait_for(
        lambda s: s["counts"]["accepted_groups"] > 0 and s["step"] >= 1, 240, "A's accepted work"
    )
    # A's dial-back check said it cannot be dialled, so it advertised its stream source; the
    # coordinator checked it over A's connection and hands it out.
    status = nat_pool.wait_for(lambda s: a_url in s["weights_urls"], 120, "A's p2p relay verified")
    assert all(u == a_url or not u.startswith("p2p://") for u in status["weights_urls"])
    # B, in the public namespace, joins and fetches a version from A alone, through the hop:
    # first as a peer nobody can dial, without hole punching (every byte goes through the
    # circuit), then as a dialable peer with DCUtR, which has A dial B directly and moves
    # streams opened after that onto the direct connection.
    for dcutr in ("off", "on"):
        cpu = _cpu_s(nat_pool.procs[0].pid)
        r = _member_b_fetches(nat_pool, dcutr)
        cpu = _cpu_s(nat_pool.procs[0].pid) - cpu
        got = r["sources"].get(a_url, 0) / 1e6
        print(
            f"B (DCUtR {dcutr}) fetched v{r['version']}: {got:.2f} MB verified, all from A, "
            f"in {r['wall_s']} s; its connections to A after: {r['paths']}; the coordinator "
            f"(hop and training) used {cpu:.1f} CPU-s meanwhile"
        )
        assert r["a_http_reachable"] is False
        assert a_url in r["join_weights_urls"] and a_url in r["peer_list"]
        assert set(r["sources"]) == {a_url} and r["sources"][a_url] > 0
        assert r["bad_shards"] == 0 and r["version"] >= 1
        if dcutr == "off":
            assert r["paths"] == ["relayed"]
    # Each B joined claiming A's peer id as its own stream source: refused, so the only
    # stream source the coordinator knows of is A's, under A's key.
    relays = nat_pool.status("/api/weights")["relays"]
    assert [(x["url"], x["node"]) for x in relays] == [(a_url, nat_pool.a_key)]


def _cpu_s(pid: int) -> float:
    """CPU seconds a process has used (user + system; `ip netns exec` execs its command, so
    the pid is the coordinator's own)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _member_b_fetches(nat_pool: NatPool, dcutr: str) -> dict:
    log = nat_pool.tmp / f"b-dcutr-{dcutr}.log"
    proc = _start(nat_pool.lab.public, log, str(Path(__file__).resolve()), "fetch",
                  nat_pool.pool_id, nat_pool.bootstrap, nat_pool.a_peer,
                  str(nat_pool.tmp / f"b-{dcutr}"), f"http://{NAT_IP}:{RELAY_PORT}",
                  dcutr)  # fmt: skip
    assert proc.wait(timeout=120) == 0, nat_pool.logs()
    lines = log.read_text().strip().splitlines()
    return json.loads(next(line for line in reversed(lines) if line.startswith("{")))


# ----------------------------------------------------------------------------- member B


async def _join(host, bootstrap: str, relay_url: str):
    """Join the pool with this host's key (a member in good standing may use the hop),
    advertising `relay_url`."""
    from importlib.metadata import version as package_version

    import trio

    from node.hardware import probe
    from protocol import messages as msg

    request = msg.JoinRequest(
        hardware=probe("cpu"), engine="hf", software=package_version("swarmrl"), relay_url=relay_url
    )
    for _ in range(30):
        reply = (await host.request(bootstrap, msg.JOIN_PROTOCOL, request, msg.JoinReply)).message
        if reply.accepted:
            return reply
        assert reply.code == "busy", reply
        await trio.sleep(max(reply.retry_after_s, 1.0))
    raise AssertionError("the pool stayed busy")


async def _reachable(url: str) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=3.0) as http:
            await http.get(f"{url}/versions")
    except httpx.HTTPError:
        return False
    return True


def _paths_to(node, peer: str) -> list[str]:
    """How `node` is connected to `peer` now: "relayed" (through the hop) or "direct" (DCUtR
    upgraded it), one word per connection."""
    from libp2p.peer.id import ID

    conns = node.raw.get_network().connections.get(ID.from_base58(peer)) or []
    conns = conns if isinstance(conns, list) else [conns]
    kinds = ("/p2p-circuit" in str(c.get_transport_addresses()) for c in conns)
    return ["relayed" if relayed else "direct" for relayed in kinds]


async def _fetch_through_a(
    pool_id: str, bootstrap: str, a_peer: str, dest: str, a_http: str, dcutr: str
):
    import httpx
    import trio

    from protocol.host import Host, public_key_of_peer
    from protocol.identity import Identity
    from shardcast.client import Client
    from shardcast.fetcher import FetchPolicy, http_client
    from shardcast.nat import attach_node, p2p_mounts, peer_of
    from shardcast.p2p import p2p_url
    from shardcast.peerlist import open_peer_list

    # Listening on loopback only, B cannot be dialled: A's DCUtR cannot reach it directly.
    listen = f"/ip4/{PUBLIC_IP if dcutr == 'on' else '127.0.0.1'}/tcp/0"
    async with Host.open(Identity.generate(), pool_id, [listen]) as host:
        reply = await _join(host, bootstrap, p2p_url(a_peer))  # A's id, not B's: refused
        origin = reply.weights_urls[0]
        async with httpx.AsyncClient(timeout=10) as http:
            raw = (await http.get(f"{origin}/peerlist")).content
        async with attach_node(host.libp2p, dcutr=dcutr == "on") as node:
            node.use_hops([bootstrap])  # A's address is never given: the hop is the way
            public_key = public_key_of_peer(peer_of(bootstrap))
            listed = open_peer_list(raw, public_key=public_key, pool_id=pool_id)
            policy = FetchPolicy()
            client = Client(
                [p2p_url(a_peer)],
                Path(dest),
                public_key=public_key,
                pool_id=pool_id,
                policy=policy,
                http=http_client(policy, p2p_mounts(node)),
            )
            client.trust_version(reply.current_version)
            start = trio.current_time()
            try:
                result = await _fetch_with_retries(client, host, bootstrap)
                sources = client.bytes_by_source()
            finally:
                await client.aclose()
            wall_s = trio.current_time() - start
            paths = _paths_to(node, a_peer)
    return {
        "version": result.version,
        "payload_bytes": result.payload_bytes,
        "seconds": round(result.seconds, 2),
        "wall_s": round(wall_s, 2),
        "paths": paths,
        "bad_shards": len(result.bad_shards),
        "sources": sources,
        "join_weights_urls": list(reply.weights_urls),
        "peer_list": list(listed.urls),
        "a_http_reachable": await _reachable(a_http),
    }


async def _fetch_with_retries(client, host, bootstrap: str, tries: int = 6):
    """`client.fetch("latest")`, asked again after a failure as a node's worker does: it asks
    the coordinator (a heartbeat) which version is current and trusts that one. The pool
    publishes a few versions a second here and A keeps only the last few, so the version
    named in B's join reply can be pruned on A before B asks for it; A lists only newer ones,
    which B must not believe until signed data names them. Opening a stream through the hop
    also failed now and then in earlier runs (the multistream handshake). A member that
    cannot be reached at all still fails every try."""
    import trio

    from protocol import messages as msg
    from shardcast.errors import FetchError

    for attempt in range(tries - 1):
        try:
            return await client.fetch("latest")
        except FetchError as e:
            print(f"fetch {attempt + 1} of {tries} failed: {e}", file=sys.stderr, flush=True)
            await trio.sleep(5.0)  # past a short outage, and past a 10 s cutoff in a few tries
            beat = msg.Heartbeat(weight_version=0)
            reply = await host.request(bootstrap, msg.HEARTBEAT_PROTOCOL, beat, msg.HeartbeatReply)
            client.trust_version(reply.message.current_version)
    return await client.fetch("latest")


if __name__ == "__main__":
    import logging

    import trio

    assert sys.argv[1] == "fetch"
    # Why a listing or a stream failed goes to B's log (stderr), which a failed test prints.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("shardcast").setLevel(logging.INFO)
    print(json.dumps(trio.run(_fetch_through_a, *sys.argv[2:8])), flush=True)
