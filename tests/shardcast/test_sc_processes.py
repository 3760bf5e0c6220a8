"""Every role as its own OS process, on loopback, through the CLI; faults included."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sc_helpers import REPO, SHARD, make_checkpoint, nudge_checkpoint, same_tree

from protocol import poolspec
from protocol.identity import Identity

HELPERS = Path(__file__).parent / "helpers"


def pool_file(tmp_path: Path, identity: Identity) -> tuple[Path, str]:
    coordinator = {"public_key": identity.public_key.hex()}
    spec = poolspec.from_dict({"name": "t", "coordinator": coordinator})
    path = tmp_path / "pool.toml"
    path.write_text(poolspec.dumps(spec))
    return path, poolspec.pool_id(spec)


def publish(key_file: Path, pool: Path, root: Path, folder: Path, version: int, *extra: str):
    out = subprocess.run(
        [sys.executable, "-m", "shardcast", "publish", str(folder), "--root", str(root),
         "--version", str(version), "--key", str(key_file), "--pool", str(pool),
         "--shard-mb", str(SHARD / 2**20), *extra],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def wait_listed(url: str, version: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/versions", timeout=2).json()["latest"] == version:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} never listed version {version}")


def fetch_args(dest: Path, pool: Path, sources: list[str], *extra: str) -> list[str]:
    args = ["fetch", "--dest", str(dest), "--pool", str(pool), "--read-timeout", "10"]
    for s in sources:
        args += ["--source", s]
    return [*args, *extra]


def start_origin(procs, tmp_path, key_file, pool, *extra: str) -> str:
    root = tmp_path / "origin"
    o = procs("origin", "--root", str(root), "--key", str(key_file), "--pool", str(pool),
              "--port", "0", *extra)  # fmt: skip
    return o.announcement()["url"]


def start_relay(procs, tmp_path, name, pool, upstreams, *extra: str) -> tuple[object, str]:
    args = ["relay", "--root", str(tmp_path / name), "--pool", str(pool), "--port", "0"]
    for u in upstreams:
        args += ["--upstream", u]
    p = procs(*args, *extra)
    return p, p.announcement()["url"]


def test_tree_of_processes_full_and_delta(tmp_path, identity, key_file, procs) -> None:
    pool, _ = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=2)
    origin = start_origin(procs, tmp_path, key_file, pool)
    _, a = start_relay(procs, tmp_path, "relay-a", pool, [origin])
    _, b = start_relay(procs, tmp_path, "relay-b", pool, [origin, a])
    publish(key_file, pool, tmp_path / "origin", ck, 1)
    for url in (origin, a, b):
        wait_listed(url, 1)
    clients = [procs(*fetch_args(tmp_path / f"c{i}", pool, [a, b])) for i in range(3)]
    for c in clients:
        assert c.wait(60) == 0, c.stderr()
        r = c.announcement()
        assert r["version"] == 1 and same_tree(Path(r["path"]), ck)

    nudge_checkpoint(ck, seed=7)
    info = publish(key_file, pool, tmp_path / "origin", ck, 2)
    assert info["base"] == 1 and info["payload_bytes"] < info["total_bytes"] / 5
    wait_listed(b, 2)
    clients = [procs(*fetch_args(tmp_path / f"c{i}", pool, [a, b])) for i in range(3)]
    for c in clients:
        assert c.wait(60) == 0, c.stderr()
        r = c.announcement()
        assert r["version"] == 2 and r["payload_bytes"] == info["payload_bytes"]
        assert same_tree(Path(r["path"]), ck)


def test_corrupting_relay_is_detected_and_reported(tmp_path, identity, key_file, procs) -> None:
    pool, pid = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=1)
    origin = start_origin(procs, tmp_path, key_file, pool)
    # The corrupting relay runs through its own script, not the CLI.
    bad_proc = subprocess.Popen(
        [sys.executable, str(HELPERS / "evil_relay.py"), origin, str(tmp_path / "evil"), pid,
         identity.public_key.hex(), str(SHARD)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    try:
        bad = json.loads(bad_proc.stdout.readline())["url"]
        _, good = start_relay(procs, tmp_path, "good", pool, [origin])
        publish(key_file, pool, tmp_path / "origin", ck, 1)
        wait_listed(bad, 1)
        wait_listed(good, 1)
        c = procs(*fetch_args(tmp_path / "c", pool, [bad, good], "--parallel", "4"))
        assert c.wait(60) == 0, c.stderr()
        r = c.announcement()
        assert same_tree(Path(r["path"]), ck)
        reported = {b["source"] for b in r["bad_shards"]}
        assert reported == {bad}
        assert all(b["shard"] % 2 == 0 for b in r["bad_shards"])
    finally:
        bad_proc.kill()
        bad_proc.wait()


def test_relay_killed_mid_transfer(tmp_path, identity, key_file, procs) -> None:
    pool, _ = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=4)
    origin = start_origin(procs, tmp_path, key_file, pool)
    ra, a = start_relay(procs, tmp_path, "relay-a", pool, [origin], "--rate-mb", "1")
    _, b = start_relay(procs, tmp_path, "relay-b", pool, [origin], "--rate-mb", "1")
    publish(key_file, pool, tmp_path / "origin", ck, 1)
    wait_listed(a, 1)
    wait_listed(b, 1)
    c = procs(*fetch_args(tmp_path / "c", pool, [a, b]))
    time.sleep(1.0)
    assert c.popen.poll() is None, "the fetch ended before the relay could be killed"
    ra.kill()  # mid-transfer: 4 MB at 2 x 1 MB/s takes about two seconds
    assert c.wait(60) == 0, c.stderr()
    r = c.announcement()
    assert same_tree(Path(r["path"]), ck)


def test_upstream_drops_version_mid_fetch(tmp_path, identity, key_file, procs) -> None:
    """The origin keeps 2 versions; v1 is pruned while the relay and client still fetch it
    (slowly); both move on to the newest version instead of wedging."""
    pool, _ = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=4)
    origin = start_origin(procs, tmp_path, key_file, pool, "--keep", "2", "--rate-mb", "0.25")
    relay_proc, relay = start_relay(procs, tmp_path, "relay", pool, [origin], "--keep", "2")
    publish(key_file, pool, tmp_path / "origin", ck, 1, "--keep", "2", "--full")
    wait_listed(relay, 1)
    c = procs(*fetch_args(tmp_path / "c", pool, [relay]))
    time.sleep(0.5)
    assert c.popen.poll() is None, "the fetch of v1 ended before v1 could be dropped"
    small = make_checkpoint(tmp_path / "small", seed=3, mb=0.2)
    publish(key_file, pool, tmp_path / "origin", small, 2, "--keep", "2", "--full")
    publish(key_file, pool, tmp_path / "origin", small, 3, "--keep", "2", "--full")
    assert c.wait(60) == 0, c.stderr()
    r = c.announcement()
    # The newest version listed when v1 vanished: v2 or v3 (both hold `small`).
    assert r["version"] in (2, 3) and same_tree(Path(r["path"]), small)
    wait_listed(relay, 3)
    listing = httpx.get(f"{relay}/versions").json()
    assert [v["version"] for v in listing["versions"]] == [2, 3]
    assert relay_proc.popen.poll() is None


def test_full_disk_is_a_clear_error(tmp_path, identity, key_file, procs) -> None:
    pool, _ = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=1)
    origin = start_origin(procs, tmp_path, key_file, pool)
    publish(key_file, pool, tmp_path / "origin", ck, 1)
    # A file-size limit makes writes past 200 kB fail as a full disk would.
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "from shardcast.cli import main\n"
        f"sys.exit(main({fetch_args(tmp_path / 'c', pool, [origin])!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60,
        check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "disk is full" in out.stderr
    assert not (tmp_path / "c" / "v1").exists()


def test_cli_help(tmp_path) -> None:
    for cmd in ([], ["origin"], ["publish"], ["relay"], ["fetch"], ["hop"]):
        out = subprocess.run(
            [sys.executable, "-m", "shardcast", *cmd, "--help"],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 0 and "usage: shardcast" in out.stdout


def test_cli_refuses_a_negative_or_unreadable_rate() -> None:
    for cmd, rate in ((["hop"], "-1"), (["hop"], "nan"), (["origin", "--root", "x"], "fast")):
        out = subprocess.run(
            [sys.executable, "-m", "shardcast", *cmd, "--rate-mb", rate],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
        )  # fmt: skip
        assert out.returncode == 2 and f"{rate!r} is not a number" in out.stderr, out.stderr


def test_cli_refuses_bad_pool(tmp_path, identity, key_file, procs) -> None:
    pool, _ = pool_file(tmp_path, identity)
    ck = make_checkpoint(tmp_path / "ck", mb=0.1)
    origin = start_origin(procs, tmp_path, key_file, pool)
    publish(key_file, pool, tmp_path / "origin", ck, 1)
    args = ["fetch", "--dest", str(tmp_path / "c"), "--source", origin, "--pool-id", "otherpool",
            "--public-key", identity.public_key.hex(), "--version", "1"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "shardcast", *args],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1 and "not 'otherpool'" in out.stderr
    assert not (tmp_path / "c" / "v1").exists()
