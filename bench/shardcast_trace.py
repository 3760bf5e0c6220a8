"""Where a swarm run's time and the seed's upload went, from its members' logs.

Run the swarm benchmark with its members at DEBUG and keep their logs, then read them:

    python bench/shardcast_swarm.py --size-mb 32 --rate-mb 1 --nodes 32 --skip-tree \\
        --workdir /tmp/trace --log-level DEBUG
    python bench/shardcast_trace.py /tmp/trace/shardcast-swarm-* --rate-mb 1 [--json F] [--plot P]

Every member logs each verified unit ("unit N: B bytes from URL in T s") and each transfer it
cut or gave up ("shard N: URL: why"). From those: the seed's bytes and how many of them were
second copies of a unit (and how many of those followed a cut), units verified per 2 s,
the uploads' rate and how many uploaders sat under half their cap per 4 s, each uploader's
total, and the cuts by kind. The seed is every source no member learnt as a peer. And how
evenly the asks spread, at the middle of every 2 s: how many uploaders had no transfer
going, and the most transfers one peer (not the seed) had going, its queue. Only verified
transfers are logged, so a cut one or a hedge that lost counts as none.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from shardcast_common import table

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})"
UNIT = re.compile(
    STAMP
    + r" DEBUG shardcast\.fetcher: v\d+ (\S+) unit (\d+): (\d+) bytes from (\S+) in ([\d.]+) s"
)
CUT = re.compile(STAMP + r" INFO shardcast\.fetcher: v\d+ (\S+) shard (\d+): (\S+): (.*)")
PEER = re.compile(r"INFO shardcast\.swarm: learnt peer (\S+)")


@dataclass
class Unit:
    end: float  # seconds from the first request
    took: float
    member: str
    unit: tuple[str, int]
    nbytes: int
    source: str


def _time(day: str, ms: str) -> float:
    return datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp() + int(ms) / 1000


def read(folder: Path) -> tuple[list[Unit], list[tuple[str, tuple[str, int], str]], set[str]]:
    """Verified units, cuts (member, unit, why) and the members' URLs, from `folder`'s logs."""
    units, cuts, peers = [], [], set()
    for log in sorted(folder.glob("*-n*.log")):
        member = log.stem.rsplit("-", 1)[-1]
        for line in log.read_text(errors="replace").splitlines():
            if m := UNIT.match(line):
                end = _time(m[1], m[2])
                units.append(Unit(end, float(m[7]), member, (m[3], int(m[4])), int(m[5]), m[6]))
            elif m := CUT.match(line):
                why = re.sub(r"\d+(\.\d+)?", "N", m[6])[:60]
                cuts.append((member, (m[3], int(m[4])), why))
            elif m := PEER.search(line):
                peers.add(m[1].rstrip("/"))
    if not units:
        raise SystemExit(f"no unit lines in {folder}/*-n*.log: run the members at DEBUG")
    start = min(u.end - u.took for u in units)
    for u in units:
        u.end -= start
    return sorted(units, key=lambda u: u.end), cuts, peers


def analyse(units: list[Unit], cuts: list, peers: set[str], rate: float) -> dict:
    seed_units = [u for u in units if u.source.rstrip("/") not in peers]
    first: dict[tuple[str, int], str] = {}
    extra = Counter()
    cut_units = {(member, unit) for member, unit, _ in cuts}
    for u in seed_units:
        owner = first.setdefault(u.unit, u.member)
        if owner != u.member:
            extra["after a cut" if (u.member, u.unit) in cut_units else "no cut"] += u.nbytes
    per2 = Counter(int(u.end // 2) for u in units)
    up: dict[str, Counter] = defaultdict(Counter)
    for u in units:
        up[u.source][int(u.end // 4)] += u.nbytes
    buckets = range(int(units[-1].end // 4) + 1)
    going = [_going(units, 2 * i + 1) for i in range(int(units[-1].end // 2) + 1)]
    return {
        "seconds": units[-1].end,
        "seed_bytes": sum(u.nbytes for u in seed_units),
        "seed_extra_bytes": dict(extra),
        "units_per_2s": [per2[i] for i in range(max(per2) + 1)],
        "upload_mb_per_s_per_4s": [round(sum(c[i] for c in up.values()) / 4e6, 1) for i in buckets],
        "uploaders_under_half_per_4s": [
            sum(1 for c in up.values() if c[i] < rate * 4 / 2) for i in buckets
        ],
        "uploaders_idle_per_2s": [sum(1 for src in up if c[src] == 0) for c in going],
        "longest_peer_queue_per_2s": [
            max((n for src, n in c.items() if src.rstrip("/") in peers), default=0) for c in going
        ],
        "uploader_mb": sorted(round(sum(c.values()) / 1e6, 1) for c in up.values()),
        "cuts": dict(Counter(why for _, _, why in cuts).most_common()),
    }


def _going(units: list[Unit], t: float) -> Counter:
    """Transfers going at time `t`, by uploader."""
    return Counter(u.source for u in units if u.end - u.took <= t < u.end)


def plot(r: dict, rate: float, path: Path) -> bool:
    """Units verified per 2 s, the uploads per 4 s against what every uploader at its cap
    would give, and each uploader's total; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (units, uploads, totals) = plt.subplots(1, 3, figsize=(13, 3.5))
    per2 = r["units_per_2s"]
    units.bar([2 * i for i in range(len(per2))], per2, width=1.8, align="edge")
    units.set(title="units verified, per 2 s", xlabel="s")
    mbs = r["upload_mb_per_s_per_4s"]
    uploads.step([4 * i for i in range(len(mbs) + 1)], [*mbs, mbs[-1]], where="post")
    full = len(r["uploader_mb"]) * rate / 1e6
    uploads.axhline(
        full, color="grey", linestyle="--", label=f"every uploader at its cap ({full:.0f})"
    )
    uploads.set(title="uploads (MB/s), per 4 s", xlabel="s", ylim=(0, full * 1.1))
    uploads.legend(loc="lower center")
    totals.bar(range(len(r["uploader_mb"])), r["uploader_mb"])
    totals.set(title="each uploader's total (MB), sorted", xlabel="uploader")
    for ax in (units, uploads, totals):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a kept run: the shardcast-swarm-* folder")
    ap.add_argument("--rate-mb", type=float, default=50.0, help="the run's upload cap, MB/s")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--plot", type=Path, help="also draw them here (a .png)")
    args = ap.parse_args()
    units, cuts, peers = read(args.folder)
    r = analyse(units, cuts, peers, args.rate_mb * 1e6)
    extra = sum(r["seed_extra_bytes"].values())
    rows = [
        ["last unit verified (s)", f"{r['seconds']:.1f}"],
        ["seed sent (MB)", f"{r['seed_bytes'] / 1e6:.1f}"],
        ["of which second copies (MB)", f"{extra / 1e6:.1f} {r['seed_extra_bytes']}"],
        ["units verified per 2 s", " ".join(map(str, r["units_per_2s"]))],
        ["uploads per 4 s (MB/s)", " ".join(map(str, r["upload_mb_per_s_per_4s"]))],
        ["uploaders under half their cap", " ".join(map(str, r["uploaders_under_half_per_4s"]))],
        ["uploaders sending nothing, per 2 s", " ".join(map(str, r["uploaders_idle_per_2s"]))],
        ["longest queue at a peer, per 2 s", " ".join(map(str, r["longest_peer_queue_per_2s"]))],
        ["uploaders' totals (MB), low..high", f"{r['uploader_mb'][:4]} .. {r['uploader_mb'][-4:]}"],
        ["cuts", " ".join(f"{n} x {why}" for why, n in r["cuts"].items()) or "none"],
    ]
    print(table(["what", "figure"], rows))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
        print(f"wrote {args.json}")
    if args.plot:
        drawn = plot(r, args.rate_mb * 1e6, args.plot)
        print(f"wrote {args.plot}" if drawn else "no plot: matplotlib is not installed")


if __name__ == "__main__":
    main()
