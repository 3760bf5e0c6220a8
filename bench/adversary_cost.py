"""What sybil identities flooding junk cost the coordinator, and what they cost honest training.

    python bench/adversary_cost.py [--quick] [--json FILE] [--window-s S] [--identities 1,10,100]
                                   [--attacker-cpu 0.5]

One pool on this machine, built with `examples/swarm.py`'s machinery (its tiny-digits preset): a
coordinator and honest nodes training throughout (at a learning rate of ~0, so every phase sees
the same policy). Phases in one run: an attack-free baseline,
one phase per identity count, and a second baseline. Each phase is a fixed window, over which
the bench measures

    coordinator CPU   utime + stime of the coordinator process (/proc/PID/stat), per minute
    honest steps      training steps committed (/api/status), per minute
    honest work       submissions of the honest nodes accepted, per minute (/api/contributions)
    newcomer          seconds an honest newcomer takes to discover the coordinator, mid-window
    identities        keys of the attacker the coordinator admitted, banned, and the prefill
                      seconds it spent on them (/api/contributions)

The attacker is one process (`adversary_cost.py flood N ...`) holding N identities at once. Each
discovers the pool, pays the join proof of work, takes a lease, answers it with maximum-size
junk that passes the cheap checks (`examples/byzantine.py`'s `junk_results`), and when its key
is banned pays for a fresh one, so N identities stay in play.

On one machine the attacker's own CPU would be billed to the honest nodes, where on a network
it burns the attacker's machine. So the attacker runs under a fixed CPU cap (`--attacker-cpu`,
a share of one core, enforced in-process by pausing), and every baseline phase runs a null load
(`adversary_cost.py burn`) under the same cap. What differs between a baseline and an attack is
then what the attack makes the *pool* do. Baselines run first and last; attacks are compared
with their mean, so drift over the run (the policy learning) is not read as damage.
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

from swarm import Proc, Swarm, parse_args  # noqa: E402

HONEST_NODES = 2
STAGGER_S = 0.2


# ---------------------------------------------------------------------- the attacker process


async def sybil_slot(
    pool: str, bootstrap: str, vocab: int, counts: Counter[str], rng: random.Random
) -> None:
    """One identity at a time, forever: join, answer every lease with junk, and after a ban
    start over under a fresh key."""
    import trio

    from protocol.discovery import discover
    from protocol.errors import SwarmError
    from protocol.host import Host
    from protocol.identity import Identity

    while True:
        identity = Identity.generate()
        async with Host.open(identity, pool, ["/ip4/127.0.0.1/tcp/0"]) as host:
            try:
                location = await discover(host, [bootstrap])
            except SwarmError as e:
                counts[f"discover:error:{type(e).__name__}"] += 1
                await trio.sleep(rng.uniform(0, 1))
                continue
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
        except SwarmError as e:
            counts[f"join:error:{getattr(e, 'code', type(e).__name__)}"] += 1
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
            counts[f"lease:error:{getattr(e, 'code', type(e).__name__)}"] += 1
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


def hold_cpu_share(share: float, started: tuple[float, float]) -> None:
    """Pause the whole process (a blocking sleep) until the CPU time it used since `started`
    (monotonic and process time then) is back within `share` of one core: the cap that keeps
    the attacker's own work off the honest nodes' cores the same in every phase."""
    wall0, cpu0 = started
    over = time.process_time() - cpu0 - share * (time.monotonic() - wall0)
    if over > 0:
        time.sleep(over / share)


def flood(args: argparse.Namespace) -> int:
    """The attacker: `args.n` sybil slots in one process; counts written to `args.stats`."""
    import trio

    config = json.loads((Path(args.model) / "config.json").read_text())
    counts: Counter[str] = Counter()
    started = (time.monotonic(), time.process_time())

    async def cap() -> None:
        while True:
            hold_cpu_share(args.cpu, started)
            await trio.sleep(0.05)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap)
            nursery.start_soon(write_stats)
            for i in range(args.n):
                rng = random.Random(i)
                nursery.start_soon(
                    sybil_slot, args.pool, args.bootstrap, config["vocab_size"], counts, rng
                )
                # Staggered: a hundred libp2p handshakes at once under the CPU cap would all
                # time out together and keep doing so.
                await trio.sleep(STAGGER_S)

    async def write_stats() -> None:
        while True:
            await trio.sleep(2.0)
            Path(args.stats).write_text(json.dumps(counts))

    trio.run(main)
    return 0


def burn(args: argparse.Namespace) -> int:
    """The baselines' null load: busy work under the attacker's CPU cap, and nothing else."""
    started, x = (time.monotonic(), time.process_time()), 0
    while True:
        for _ in range(20_000):
            x = (x * 31 + 7) % 1_000_003
        hold_cpu_share(args.cpu, started)


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


def wait_until_flooding(stats: Path, timeout_s: float = 180.0) -> bool:
    """The window starts once the attacker has a key in play: its start-up would otherwise
    eat the window. False when it got none in play in time (the window is measured anyway)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stats.exists() and json.loads(stats.read_text()).get("keys", 0) > 0:
            return True
        time.sleep(1.0)
    return False


def newcomer_discovery_s(swarm: Swarm) -> float | None:
    """Seconds an honest newcomer (a fresh key, outside the attacker's CPU cap) takes to find
    the coordinator now; None when it could not within 30 s. Sybils must not lock it out."""
    import trio

    from protocol.discovery import discover
    from protocol.errors import SwarmError
    from protocol.host import Host
    from protocol.identity import Identity

    async def once() -> float | None:
        t0 = time.monotonic()
        async with Host.open(Identity.generate(), swarm.pool_id, ["/ip4/127.0.0.1/tcp/0"]) as h:
            try:
                await discover(h, [swarm.bootstrap], timeout_s=30.0)
            except SwarmError:
                return None
        return round(time.monotonic() - t0, 2)

    return trio.run(once)


def honest_work(rows: list[dict[str, Any]] | None, honest: set[str]) -> tuple[int, int]:
    """Accepted submissions and verified tokens of the honest nodes so far."""
    mine = [r for r in rows or [] if r["key"] in honest]
    return sum(r["accepted"] for r in mine), sum(r["verified_tokens"] for r in mine)


def measure(swarm: Swarm, window_s: float, known: set[str], honest: set[str]) -> dict[str, Any]:
    """One window: coordinator CPU, honest steps and honest accepted work per minute; the
    identities that appeared."""
    pid = swarm.proc("coordinator").popen.pid
    cpu0, step0, t0 = cpu_seconds(pid), swarm.status()["step"], time.monotonic()
    work0 = honest_work(contributions(swarm), honest)
    time.sleep(window_s / 2)
    discovery_s = newcomer_discovery_s(swarm)
    time.sleep(max(0.0, t0 + window_s - time.monotonic()))
    cpu1, step1, minutes = cpu_seconds(pid), swarm.status()["step"], (time.monotonic() - t0) / 60
    rows = contributions(swarm)
    work1 = honest_work(rows, honest)
    row: dict[str, Any] = {
        "coordinator_cpu_s_per_min": round((cpu1 - cpu0) / minutes, 2),
        "honest_steps_per_min": round((step1 - step0) / minutes, 2),
        "honest_accepted_per_min": round((work1[0] - work0[0]) / minutes, 1),
        "honest_tokens_per_min": round((work1[1] - work0[1]) / minutes),
        "newcomer_discovery_s": discovery_s,
    }
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


def attack(swarm: Swarm, n: int, cpu: float) -> Proc:
    model = swarm.work / "models" / "tiny-digits"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "flood", str(n), "--cpu", str(cpu),
        "--pool", swarm.pool_id, "--bootstrap", swarm.bootstrap, "--model", str(model),
        "--stats", str(swarm.logs / f"flood-{n}.json"),
    ]  # fmt: skip
    return start(swarm, Proc(f"flood-{n}", "byzantine", cmd, swarm.logs / f"flood-{n}.log"))


def null_load(swarm: Swarm, cpu: float, name: str) -> Proc:
    cmd = [sys.executable, str(Path(__file__).resolve()), "burn", "--cpu", str(cpu)]
    # role "byzantine": stopped first, with the attackers, and never counted as honest
    return start(swarm, Proc(name, "byzantine", cmd, swarm.logs / f"{name}.log"))


def start(swarm: Swarm, proc: Proc) -> Proc:
    """Start one of this bench's own processes (`flood`, `burn`) as a fresh interpreter: they
    run this script, which the swarm's forking does not preload."""
    swarm.procs.append(proc)
    proc.start(swarm.env, forking=False)
    return proc


def baseline(
    swarm: Swarm, args: argparse.Namespace, known: set[str], honest: set[str], name: str
) -> dict:
    swarm.say(f"{name}: {args.window_s:.0f} s without attack (null load at {args.attacker_cpu})")
    load = null_load(swarm, args.attacker_cpu, name)
    row = {"identities": 0, "phase": name, **measure(swarm, args.window_s, known, honest)}
    load.stop()
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    # A learning rate of ~0 keeps the policy (and so the share of all-equal groups, which are
    # not trained) the same in every phase: a learning pool trains fewer groups per accepted
    # submission as it masters the task, which would read as the attack's damage.
    frozen = ["algorithm.lr=1e-12"]
    swarm_args = parse_args(["--relays", "0", "--steps", "100000", *[f"--set={s}" for s in frozen]])
    swarm = Swarm(swarm_args, Path(tempfile.mkdtemp(prefix="swarmrl-adversary-")).resolve())
    try:
        swarm.init_pool()
        swarm.start_coordinator()
        for i in range(HONEST_NODES):
            swarm.start_honest(i)
        wait_for_step(swarm, 2)  # nodes have joined and the pool trains
        honest = {p.key for p in swarm.procs if p.role == "honest"}
        known = set(honest)
        rows = [baseline(swarm, args, known, honest, "baseline")]
        for n in args.identities:
            swarm.say(f"attack: {n} sybil identities flooding junk for {args.window_s:.0f} s")
            proc = attack(swarm, n, args.attacker_cpu)
            stats = swarm.logs / f"flood-{n}.json"
            if not wait_until_flooding(stats):
                swarm.say("the attacker put no key in play in 180 s; measuring anyway")
            row = {
                "identities": n,
                "phase": "attack",
                **measure(swarm, args.window_s, known, honest),
            }
            proc.stop()
            row["attacker"] = json.loads(stats.read_text())
            rows.append(row)
            swarm.say(json.dumps(row))
        rows.append(baseline(swarm, args, known, honest, "baseline-after"))
    finally:
        swarm.stop_all()
        for p in swarm.procs:
            p.kill()
    return summarise(rows, args)


def summarise(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    bases = [r for r in rows if r["phase"] != "attack"]
    attacks = [r for r in rows if r["phase"] == "attack"]
    base_cpu = sum(r["coordinator_cpu_s_per_min"] for r in bases) / len(bases)
    base_steps = sum(r["honest_steps_per_min"] for r in bases) / len(bases)
    for r in attacks:
        extra = r["coordinator_cpu_s_per_min"] - base_cpu
        r["extra_cpu_s_per_min_per_identity"] = round(extra / r["identities"], 3)
        r["honest_rate_vs_baseline"] = (
            round(r["honest_steps_per_min"] / base_steps, 3) if base_steps else None
        )
    at_most = attacks[-1]
    per_identity = [r["extra_cpu_s_per_min_per_identity"] for r in attacks]
    return {
        "window_s": args.window_s,
        "attacker_cpu_share": args.attacker_cpu,
        "honest_nodes": HONEST_NODES,
        "cores": os.cpu_count(),
        "baseline": {
            "coordinator_cpu_s_per_min": round(base_cpu, 2),
            "honest_steps_per_min": round(base_steps, 2),
        },
        "rows": rows,
        "goals": {
            "honest_rate_at_most_identities_ge_80pct": (at_most.get("honest_rate_vs_baseline") or 0)
            >= 0.8,
            "cost_per_identity_falls": all(b <= a for a, b in itertools.pairwise(per_identity)),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{'phase':>15}{'ids':>5}{'coord CPU s/min':>16}{'extra/id':>10}"
          f"{'steps/min':>10}{'vs base':>8}{'honest acc/min':>15}{'newcomer s':>11}"
          f"{'admitted':>9}{'banned':>7}{'prefill s':>10}")  # fmt: skip
    for r in result["rows"]:
        print(f"{r['phase']:>15}{r['identities']:>5}{r['coordinator_cpu_s_per_min']:>16.2f}"
              f"{r.get('extra_cpu_s_per_min_per_identity', ''):>10}"
              f"{r['honest_steps_per_min']:>10.2f}{r.get('honest_rate_vs_baseline', ''):>8}"
              f"{r['honest_accepted_per_min']:>15}{r['newcomer_discovery_s'] or 'failed':>11}"
              f"{r.get('identities_admitted', '-'):>9}{r.get('identities_banned', '-'):>7}"
              f"{r.get('prefill_s', '-'):>10}")  # fmt: skip
    print(
        "goals: " + ", ".join(f"{k} {'OK' if v else 'MISSED'}" for k, v in result["goals"].items())
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["flood"]:
        p = argparse.ArgumentParser(prog="adversary_cost.py flood")
        p.add_argument("n", type=int)
        p.add_argument("--cpu", type=float, required=True)
        for name in ("--pool", "--bootstrap", "--model", "--stats"):
            p.add_argument(name, required=True)
        return flood(p.parse_args(argv[1:]))
    if argv[:1] == ["burn"]:
        p = argparse.ArgumentParser(prog="adversary_cost.py burn")
        p.add_argument("--cpu", type=float, required=True)
        return burn(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="40 s windows (about 6 minutes in all)")
    p.add_argument("--window-s", type=float, help="seconds per phase (default 120; quick 40)")
    p.add_argument(
        "--identities",
        default="1,10,100",
        type=lambda s: [int(x) for x in s.split(",")],
        help="attacker identity counts, one phase each (default 1,10,100)",
    )
    p.add_argument(
        "--attacker-cpu",
        type=float,
        default=0.5,
        help="the attacker's CPU cap, and the baselines' null load, in cores (default 0.5)",
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
