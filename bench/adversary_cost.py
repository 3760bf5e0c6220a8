"""What sybil identities flooding junk cost the coordinator, and what they cost honest training.

    python bench/adversary_cost.py [--quick] [--json FILE] [--window-s S] [--identities 1,10,100]

One pool on this machine, built with `examples/swarm.py`'s machinery (its tiny-digits preset): a
coordinator and honest nodes training throughout. Phases in one run, the attack-free baseline
first, then one per identity count. Each phase is a fixed window, over which the bench measures

    coordinator CPU   utime + stime of the coordinator process (/proc/PID/stat), per minute
    honest steps      training steps committed (/api/status), per minute
    identities        keys of the attacker the coordinator admitted, banned, and the prefill
                      seconds it spent on them (/api/contributions)

The attacker is one process (`adversary_cost.py flood N ...`) holding N identities at once. Each
discovers the pool, pays the join proof of work, takes a lease, answers it with maximum-size
junk that passes the cheap checks (`examples/byzantine.py`'s `junk_results`), and when its key
is banned pays for a fresh one, so N identities stay in play. It runs at nice 19: on one
machine its own CPU would otherwise be billed to the honest nodes, where on a network it burns
the attacker's machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
from collections import Counter
from pathlib import Path
from typing import Any

# The repo root first: bench/protocol.py would otherwise shadow the `protocol` package.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from swarm import Proc, Swarm  # noqa: E402

HONEST_NODES = 2


# ---------------------------------------------------------------------- the attacker process


async def sybil_slot(
    pool: str, bootstrap: str, vocab: int, counts: Counter[str], rng: random.Random
) -> None:
    """One identity at a time, forever: join, answer every lease with junk, and after a ban
    start over under a fresh key."""
    from protocol.discovery import discover
    from protocol.host import Host
    from protocol.identity import Identity

    while True:
        identity = Identity.generate()
        async with Host.open(identity, pool, ["/ip4/127.0.0.1/tcp/0"]) as host:
            location = await discover(host, [bootstrap])
            counts["keys"] += 1
            await junk_until_banned(host, location, identity, vocab, counts, rng)


async def junk_until_banned(
    host: Any, location: Any, identity: Any, vocab: int, counts: Counter[str], rng: random.Random
) -> None:
    import trio
    from byzantine import junk_results

    from protocol import messages as msg
    from protocol import pow as join_pow
    from protocol.errors import RemoteError, SwarmError

    addr = location.coordinator_addrs[0]
    bits = location.spec.admission.join_pow_bits
    nonce = await trio.to_thread.run_sync(join_pow.solve, host.pool_id, identity.public_key, bits)
    join = msg.JoinRequest(
        hardware=msg.Hardware(device="cpu"), engine="hf", software="0", pow_nonce=nonce
    )
    version = 0
    while True:
        try:
            reply = await request(host, addr, msg.JOIN_PROTOCOL, join, msg.JoinReply)
        except SwarmError:
            counts["join:error"] += 1
            await trio.sleep(1.0)
            continue
        counts[f"join:{reply.code}"] += 1
        if reply.accepted:
            version = reply.current_version
            break
        if reply.code != "busy":
            return
        await trio.sleep(reply.retry_after_s + rng.uniform(0, 1))
    while True:
        try:
            got = await request(
                host,
                addr,
                msg.LEASE_PROTOCOL,
                msg.LeaseRequest(weight_version=version),
                msg.LeaseReply,
            )
        except SwarmError as e:
            if isinstance(e, RemoteError) and e.code == "forbidden":
                # a banned key is refused by the transport before its request is read
                counts["lease:forbidden"] += 1
                return
            counts["lease:error"] += 1
            await trio.sleep(1.0)
            continue
        counts[f"lease:{got.code}"] += 1
        if got.code == "banned":
            return
        if got.lease is None:
            await trio.sleep(max(got.retry_after_s, 0.5) + rng.uniform(0, 1))
            continue
        junk = msg.Submission(
            lease_id=got.lease.lease_id,
            weight_version=got.lease.weight_version,
            results=junk_results(got.lease, vocab, rng),
        )
        try:
            receipt = await request(host, addr, msg.SUBMIT_PROTOCOL, junk, msg.Receipt)
            counts[f"receipt:{receipt.code}"] += 1
        except SwarmError as e:
            counts[f"submit:{type(e).__name__}"] += 1


async def request(host: Any, addr: str, protocol_id: str, message: Any, reply_type: type) -> Any:
    return (await host.request(addr, protocol_id, message, reply_type, timeout_s=30.0)).message


def flood(args: argparse.Namespace) -> int:
    """The attacker: `args.n` sybil slots in one process; counts written to `args.stats`."""
    import trio

    config = json.loads((Path(args.model) / "config.json").read_text())
    counts: Counter[str] = Counter()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(args.n):
                rng = random.Random(i)
                nursery.start_soon(
                    sybil_slot, args.pool, args.bootstrap, config["vocab_size"], counts, rng
                )
            while True:
                await trio.sleep(2.0)
                Path(args.stats).write_text(json.dumps(counts))

    trio.run(main)
    return 0


# ---------------------------------------------------------------------- the measurement


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def contributions(swarm: Swarm) -> list[dict[str, Any]] | None:
    try:
        return swarm.api("/api/contributions")
    except urllib.error.HTTPError:
        return None  # a coordinator without the endpoint: the identity columns stay empty


def wait_for_step(swarm: Swarm, step: int, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = swarm.status()
        if status and status["step"] >= step:
            return
        time.sleep(1.0)
    raise SystemExit(f"the pool did not reach step {step} in {timeout_s:.0f} s")


def wait_until_flooding(stats: Path, timeout_s: float = 180.0) -> None:
    """The window starts once the attacker has a key in play: its start-up (imports, at nice
    19 on a busy machine) would otherwise eat the window."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stats.exists() and json.loads(stats.read_text()).get("keys", 0) > 0:
            return
        time.sleep(1.0)
    raise SystemExit(f"the attacker put no key in play within {timeout_s:.0f} s")


def measure(swarm: Swarm, window_s: float, known: set[str]) -> dict[str, Any]:
    """One window: coordinator CPU and honest steps per minute; the identities that appeared."""
    pid = swarm.proc("coordinator").popen.pid
    cpu0, step0, t0 = cpu_seconds(pid), swarm.status()["step"], time.monotonic()
    time.sleep(window_s)
    cpu1, step1, minutes = cpu_seconds(pid), swarm.status()["step"], (time.monotonic() - t0) / 60
    row: dict[str, Any] = {
        "coordinator_cpu_s_per_min": round((cpu1 - cpu0) / minutes, 2),
        "honest_steps_per_min": round((step1 - step0) / minutes, 2),
    }
    rows = contributions(swarm)
    if rows is not None:
        new = [r for r in rows if r["key"] not in known]
        row |= {
            "identities_admitted": len(new),
            "identities_banned": sum(r["banned"] for r in new),
            "prefill_s": round(sum(r["validation_s"] for r in new), 2),
            "leases_issued": sum(r["leases_issued"] for r in new),
        }
        known.update(r["key"] for r in new)
    return row


def attack(swarm: Swarm, n: int) -> Proc:
    model = swarm.work / "models" / "tiny-digits"
    cmd = [
        "nice", "-n", "19", sys.executable, str(Path(__file__).resolve()), "flood", str(n),
        "--pool", swarm.pool_id, "--bootstrap", swarm.bootstrap, "--model", str(model),
        "--stats", str(swarm.logs / f"flood-{n}.json"),
    ]  # fmt: skip
    proc = Proc(f"flood-{n}", "byzantine", cmd, swarm.logs / f"flood-{n}.log", kind="sybil")
    swarm.procs.append(proc)
    proc.start(swarm.env)
    return proc


def run(args: argparse.Namespace) -> dict[str, Any]:
    swarm_args = argparse.Namespace(
        model="tiny-digits", task=None, set=[], relays=0, dashboard_port=None, steps=100_000
    )
    swarm = Swarm(swarm_args, Path(tempfile.mkdtemp(prefix="swarmrl-adversary-")).resolve())
    try:
        swarm.init_pool()
        swarm.start_coordinator()
        for i in range(HONEST_NODES):
            swarm.start_honest(i)
        wait_for_step(swarm, 2)  # nodes have joined and the pool trains
        honest = {p.key for p in swarm.procs if p.role == "honest"}
        known = set(honest)
        swarm.say(f"baseline: {args.window_s:.0f} s without attack")
        rows = [{"identities": 0, **measure(swarm, args.window_s, known)}]
        for n in args.identities:
            swarm.say(f"attack: {n} sybil identities flooding junk for {args.window_s:.0f} s")
            proc = attack(swarm, n)
            stats = swarm.logs / f"flood-{n}.json"
            wait_until_flooding(stats)
            row = {"identities": n, **measure(swarm, args.window_s, known)}
            proc.stop()
            row["attacker"] = json.loads(stats.read_text())
            rows.append(row)
            swarm.say(json.dumps(row))
    finally:
        swarm.stop_all()
        for p in swarm.procs:
            p.kill()
    return summarise(rows, args)


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = rows[0]
    for r in rows[1:]:
        extra = r["coordinator_cpu_s_per_min"] - base["coordinator_cpu_s_per_min"]
        r["extra_cpu_s_per_min_per_identity"] = round(extra / r["identities"], 3)
        steps = base["honest_steps_per_min"]
        r["honest_rate_vs_baseline"] = (
            round(r["honest_steps_per_min"] / steps, 3) if steps else None
        )
    at_most = rows[-1]
    per_identity = [r["extra_cpu_s_per_min_per_identity"] for r in rows[1:]]
    return {
        "window_s": args.window_s,
        "honest_nodes": HONEST_NODES,
        "cores": os.cpu_count(),
        "rows": rows,
        "goals": {
            "honest_rate_at_most_identities_ge_80pct": (at_most.get("honest_rate_vs_baseline") or 0)
            >= 0.8,
            "cost_per_identity_falls": all(b <= a for a, b in itertools.pairwise(per_identity)),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'identities':>10}{'coord CPU s/min':>17}{'extra/identity':>16}"
          f"{'honest steps/min':>18}{'vs base':>9}{'admitted':>10}{'banned':>8}"
          f"{'prefill s':>11}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['identities']:>10}{r['coordinator_cpu_s_per_min']:>17.2f}"
              f"{r.get('extra_cpu_s_per_min_per_identity', ''):>16}"
              f"{r['honest_steps_per_min']:>18.2f}{r.get('honest_rate_vs_baseline', ''):>9}"
              f"{r.get('identities_admitted', '-'):>10}{r.get('identities_banned', '-'):>8}"
              f"{r.get('prefill_s', '-'):>11}")  # fmt: skip
    print(
        "goals: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in result["goals"].items())
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flood"]:
        p = argparse.ArgumentParser(prog="adversary_cost.py flood")
        p.add_argument("n", type=int)
        for name in ("--pool", "--bootstrap", "--model", "--stats"):
            p.add_argument(name, required=True)
        return flood(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 s windows (about 5 minutes in all)")
    p.add_argument("--window-s", type=float, help="seconds per phase (default 120; quick 40)")
    p.add_argument(
        "--identities",
        default="1,10,100",
        type=lambda s: [int(x) for x in s.split(",")],
        help="attacker identity counts, one phase each (default 1,10,100)",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    args.window_s = args.window_s or (40.0 if args.quick else 120.0)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
