"""Broadcast benchmark: one checkpoint from the origin through R relays to N clients.

Every role is its own process on loopback, and every server (origin and relays) is capped at
the same upload rate U, so the network, not the CPU, is what is measured. Two runs, back to
back on the same origin:

  tree:  origin -> R relays -> N clients (each client may use every relay)
  naive: origin -> N clients

The time of a run is from the moment `shardcast publish` returns (the version is in the
origin's store; clients are already long-polling) to the moment the last client process
exits with the version complete and verified. The tree is compared with its bound
S / min(D, R*U/N) plus one shard crossing the origin (shard / (U/R)); D, the clients'
download rate, is not capped here.

    python bench/shardcast_broadcast.py            # 1 GiB, U = 50 MB/s, 2 relays, 8 clients
    python bench/shardcast_broadcast.py --quick    # 64 MiB
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from shardcast_common import Proc, machine, make_pool, run_cli, save, table


def make_checkpoint(folder: Path, size: int) -> None:
    """Random bytes shaped like a sharded safetensors checkpoint (incompressible, like
    trained weights), plus config and tokenizer files."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    half = size // 2
    for i, n in enumerate((half, size - half)):
        with open(folder / f"model-0000{i + 1}-of-00002.safetensors", "wb") as f:
            left = n
            while left:
                chunk = min(left, 64 << 20)
                f.write(rng.bytes(chunk))
                left -= chunk
    (folder / "config.json").write_text('{"model_type": "bench"}')
    (folder / "tokenizer.json").write_text("{}")


def run_clients(
    work: Path, pool: Path, sources: list[str], n: int, after: int, tag: str, publish
) -> tuple[float, list[dict]]:
    clients = []
    for i in range(n):
        args = ["fetch", "--pool", str(pool), "--dest", str(work / f"{tag}-c{i}")]
        args += ["--wait", "900", "--after", str(after), "--read-timeout", "120"]
        for s in sources:
            args += ["--source", s]
        clients.append(Proc(*args, log=work / f"{tag}-c{i}.log"))
    time.sleep(3.0)  # let every client start and begin long-polling
    publish()
    t0 = time.time()
    done: dict[int, float] = {}
    while len(done) < n:
        for i, c in enumerate(clients):
            if i not in done and c.popen.poll() is not None:
                done[i] = time.time() - t0
        time.sleep(0.02)
    results = []
    for i, c in enumerate(clients):
        if c.popen.returncode:
            raise RuntimeError(f"client {i} failed: {(work / f'{tag}-c{i}.log').read_text()}")
        results.append({**c.first_json(10), "done_s": done[i]})
    return max(r["done_s"] for r in results), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 1 GiB")
    ap.add_argument("--size-mb", type=float, help="checkpoint size in MiB")
    ap.add_argument("--rate-mb", type=float, default=50.0, help="U: upload cap per server, MB/s")
    ap.add_argument("--relays", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--shard-mb", type=float, help="shard size, MiB (default 16; 4 if --quick)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temp folder)")
    args = ap.parse_args()
    size = int((args.size_mb or (64 if args.quick else 1024)) * 2**20)
    rate = args.rate_mb * 1e6
    args.shard_mb = args.shard_mb or (4.0 if args.quick else 16.0)
    started = machine()
    work = Path(tempfile.mkdtemp(prefix="shardcast-bench-", dir=args.workdir))
    procs: list[Proc] = []
    try:
        key, pool, _ = make_pool(work)
        ck = work / "checkpoint"
        make_checkpoint(ck, size)
        total = sum(p.stat().st_size for p in ck.iterdir())
        store = work / "origin"
        origin = Proc(
            "origin", "--root", str(store), "--key", str(key), "--pool", str(pool),
            "--port", "0", "--rate-mb", str(args.rate_mb), log=work / "origin.log",
        )  # fmt: skip
        procs.append(origin)
        origin_url = origin.first_json()["url"]
        relays = []
        for i in range(args.relays):
            r = Proc(
                "relay", "--root", str(work / f"relay{i}"), "--pool", str(pool),
                "--upstream", origin_url, "--port", "0", "--rate-mb", str(args.rate_mb),
                log=work / f"relay{i}.log",
            )  # fmt: skip
            procs.append(r)
            relays.append(r.first_json()["url"])

        def publish(version: int):
            def go() -> None:
                run_cli(
                    "publish", str(ck), "--root", str(store), "--key", str(key),
                    "--pool", str(pool), "--version", str(version), "--full",
                    "--shard-mb", str(args.shard_mb),
                )  # fmt: skip

            return go

        tree_s, tree = run_clients(work, pool, relays, args.clients, -1, "tree", publish(1))
        for i in range(args.clients):
            shutil.rmtree(work / f"tree-c{i}", ignore_errors=True)
        for p in procs[1:]:
            p.kill()
        naive_s, naive = run_clients(work, pool, [origin_url], args.clients, 1, "naive", publish(2))
    finally:
        for p in procs:
            p.kill()
        shutil.rmtree(work, ignore_errors=True)

    shard = int(args.shard_mb * 2**20)
    bound = total / min(float("inf"), args.relays * rate / args.clients) + shard / (
        rate / args.relays
    )
    naive_bound = total * args.clients / rate
    result = {
        "machine": started,
        "bytes": total,
        "rate_bytes_per_s": rate,
        "relays": args.relays,
        "clients": args.clients,
        "shard_bytes": shard,
        "tree_last_client_s": tree_s,
        "tree_bound_s": bound,
        "tree_over_bound": tree_s / bound,
        "naive_last_client_s": naive_s,
        "naive_bound_s": naive_bound,
        "naive_over_tree": naive_s / tree_s,
        "tree_clients": tree,
        "naive_clients": naive,
    }
    md = table(
        ["run", "S (MiB)", "U (MB/s)", "last client (s)", "bound (s)", "ratio to bound"],
        [
            ["tree", total // 2**20, args.rate_mb, tree_s, bound, tree_s / bound],
            ["naive", total // 2**20, args.rate_mb, naive_s, naive_bound, naive_s / naive_bound],
        ],
    )
    md += f"\n\nnaive / tree = {naive_s / tree_s:.2f}x (R={args.relays}, N={args.clients})"
    save("shardcast_broadcast" + ("_quick" if args.quick else ""), result, md)


if __name__ == "__main__":
    main()
