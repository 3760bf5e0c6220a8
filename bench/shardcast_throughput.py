"""Hashing and serving throughput per core.

- BLAKE3 on one thread, and `hash_and_copy` (the origin's one-pass copy + shard hashes).
- XOR-delta encode and apply on near-identical data.
- Serving: an uncapped origin process and one `shardcast fetch` process on loopback; the
  bytes moved per CPU-second of each process (from /proc) is its per-core throughput.

    python bench/shardcast_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np
from shardcast_common import Proc, machine, make_pool, proc_cpu_seconds, run_cli, save, table

from shardcast.delta import apply_delta, encode_delta
from shardcast.shards import hash_and_copy


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    args = ap.parse_args()
    size = (64 if args.quick else 512) << 20
    work = Path(tempfile.mkdtemp(prefix="shardcast-tp-"))
    rows = []
    result: dict = {"machine": machine(), "bytes": size}
    try:
        rng = np.random.default_rng(0)
        data = rng.bytes(size)
        src = work / "ck" / "model.safetensors"
        src.parent.mkdir()
        src.write_bytes(data)
        gbs = size / 1e9

        t = timed(lambda: blake3.blake3(data).digest())
        rows.append(["BLAKE3, 1 thread, in memory", gbs / t])
        t = timed(lambda: hash_and_copy(src, work / "copy", 16 << 20))
        rows.append(["publish: read + hash + shard hashes + copy", gbs / t])

        arr = np.frombuffer(data, dtype=np.uint16).copy()
        idx = rng.choice(len(arr), size=len(arr) // 100, replace=False)
        arr[idx] ^= 1  # 1% of bf16 elements change in their last bit
        (work / "next").write_bytes(arr.tobytes())
        t = timed(lambda: encode_delta(src, work / "next", work / "delta"))
        rows.append(["delta encode (1% of 2-byte elements changed)", gbs / t])
        t = timed(lambda: apply_delta(src, work / "delta", work / "rebuilt"))
        rows.append(["delta apply + hash of the rebuilt file", gbs / t])
        result["delta_fraction_1pct"] = (work / "delta").stat().st_size / size

        key, pool, _ = make_pool(work)
        run_cli(
            "publish", str(src.parent), "--root", str(work / "store"), "--key", str(key),
            "--pool", str(pool), "--version", "1",
        )  # fmt: skip
        origin = Proc(
            "origin", "--root", str(work / "store"), "--key", str(key), "--pool", str(pool),
            "--port", "0", log=work / "origin.log",
        )  # fmt: skip
        try:
            url = origin.first_json()["url"]
            cpu0 = proc_cpu_seconds(origin.popen.pid)
            client = Proc(
                "fetch", "--source", url, "--pool", str(pool), "--dest", str(work / "c"),
                log=work / "client.log",
            )  # fmt: skip
            t0 = time.perf_counter()
            # Sample the client's CPU time just before it exits (its /proc entry then goes).
            client_cpu = 0.0
            while client.popen.poll() is None:
                try:
                    client_cpu = proc_cpu_seconds(client.popen.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            server_cpu = proc_cpu_seconds(origin.popen.pid) - cpu0
            if client.popen.returncode:
                raise RuntimeError((work / "client.log").read_text())
        finally:
            origin.kill()
        rows.append(["serve: origin, bytes per CPU-second", gbs / server_cpu])
        rows.append(["fetch: client (recv + hash + write), bytes per CPU-second", gbs / client_cpu])
        rows.append(["one origin -> one client, wall clock", gbs / wall])
        result["rows"] = [{"what": r[0], "GB_per_s": r[1]} for r in rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    md = table(["what", "GB/s"], rows)
    save("shardcast_throughput" + ("_quick" if args.quick else ""), result, md)


if __name__ == "__main__":
    main()
