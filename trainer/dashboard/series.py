"""Time series for the dashboard's charts, built from the ledger and the sample log."""

from __future__ import annotations

import json
import math
import os
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

# Reward functions that score correctness as 0 or 1: their mean is the task's accuracy.
ACCURACY_FUNCS = ("exact_numeric", "math_verify_reward")
TAIL_BYTES = 4 << 20
"""The most of the sample log one read takes (its end): about ten thousand samples."""
MAX_BUCKETS = 2000
OFF_POLICY_KEYS = (
    "staleness_mean",
    "staleness_max",
    "tis_weight_mean",
    "icepop_masked_frac",
    "mismatch_kl",
)
"""Off-policy statistics a step's metrics may hold (trainer/loss.py): charted where present."""
EVAL_KEYS = ("eval_accuracy", "eval_pass@1", "eval_pass@k", "eval_mean_reward", "eval_rewarded")
EVAL_BYTES = 1 << 20
"""The most of the evaluation log one read takes: thousands of evaluations."""


def tail_lines(path: Path, max_bytes: int = TAIL_BYTES) -> list[bytes]:
    """The lines in the last `max_bytes` of `path`, reading nothing before them. The first is
    dropped when the window starts inside the file: it is most likely cut."""
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(size - start)  # the size at open: a line appended since waits
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    return lines[1:] if start > 0 else lines


def read_samples(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records in the last `max_bytes` of a samples.jsonl, oldest first; bad lines skipped."""
    out = []
    for line in tail_lines(path, max_bytes):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # empty, torn (being appended right now) or not UTF-8
        if isinstance(record, dict):
            out.append(record)
    return out


class SampleLog:
    """The sample log's newest records, re-read only when the file changed (size, mtime): every
    open Overview and Samples page polls them every few seconds."""

    def __init__(self, path: Path, max_bytes: int = TAIL_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._records: list[dict[str, Any]] = []

    def records(self) -> list[dict[str, Any]]:
        """Oldest first; shared between callers, so read-only."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        seen = (st.st_size, st.st_mtime_ns)
        with self._lock:  # one reader at a time; the others then find it cached
            if seen != self._seen:
                self._records = read_samples(self.path, self.max_bytes)
                self._seen = seen
            return self._records


def accuracy_by_step(samples: list[dict[str, Any]]) -> dict[int, float]:
    """Mean correctness of the accepted samples logged while the trainer was at each step."""
    hits: dict[int, list[float]] = defaultdict(list)
    for s in samples:
        rewards = s.get("rewards") or {}
        for name in ACCURACY_FUNCS:
            if rewards.get(name) is not None and s.get("trainer_step") is not None:
                hits[int(s["trainer_step"])].append(float(rewards[name]))
                break
    return {step: sum(v) / len(v) for step, v in sorted(hits.items())}


def step_series(
    steps: list[dict[str, Any]], samples: list[dict[str, Any]], has_accuracy: bool
) -> list[dict[str, Any]]:
    """One point per training step: the time it finished and the numbers charted."""
    acc = accuracy_by_step(samples) if has_accuracy else {}
    out = []
    for s in steps:
        m = s["metrics"]
        out.append(
            {
                "time": s["finished_at"],
                "step": s["step"],
                "reward_mean": m.get("reward_mean"),
                # Samples are logged with the step the trainer was at when they were accepted:
                # those feeding step n were logged at step n - 1.
                "accuracy": acc.get(s["step"] - 1),
                "tokens_per_s": m.get("tokens_per_s"),
                **{k: m.get(k) for k in OFF_POLICY_KEYS},
            }
        )
    return out


def eval_series(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per evaluated version, in version order (the newest record of a version
    re-evaluated after a restart wins); records without a version are skipped."""
    by_version: dict[int, dict[str, Any]] = {}
    for r in records:
        if isinstance(r.get("version"), int):
            by_version[r["version"]] = {
                "version": r["version"],
                "time": r.get("time"),
                "k": r.get("eval_k"),
                **{k: r.get(k) for k in EVAL_KEYS},
            }
    return [by_version[v] for v in sorted(by_version)]


def check_of(v: dict[str, Any]) -> str:
    """The check a verdict came from. Refusals before validation carry no `check` in their
    details: a lease that could not be answered (`lease_id`) or a transport refusal (`code`)."""
    details = v.get("details") or {}
    if details.get("check"):
        return str(details["check"])
    if "code" in details:
        return "transport"
    if "lease_id" in details:
        return "lease"
    return "other"


def verdict_key(v: dict[str, Any]) -> str:
    """`accept`, or `soft:<check>` / `hard:<check>` for a rejection."""
    if v["outcome"] == "accept":
        return "accept"
    return f"{v['outcome']}:{check_of(v)}"


def minute_buckets(
    verdicts: list[dict[str, Any]], width: float = 60.0, max_buckets: int = MAX_BUCKETS
) -> list[dict[str, Any]]:
    """Verdicts per `width`-second bucket (empty buckets included, so rates read true): counts
    by outcome and by outcome:check, and validation latency (mean and max seconds). The newest
    `max_buckets` only: a quiet pool's window may span weeks, in 5-second buckets."""
    decided = [v for v in verdicts if v.get("outcome") and v.get("decided_at")]
    if not decided:
        return []
    buckets: dict[int, dict[str, Any]] = {}
    for v in decided:
        b = math.floor(v["decided_at"] / width)
        cell = buckets.setdefault(
            b, {"outcomes": defaultdict(int), "keys": defaultdict(int), "lat": []}
        )
        cell["outcomes"][v["outcome"]] += 1
        cell["keys"][verdict_key(v)] += 1
        seconds = (v.get("details") or {}).get("seconds")
        if isinstance(seconds, int | float):  # absent for refusals before validation
            cell["lat"].append(float(seconds))
    out = []
    last = max(buckets)
    for b in range(max(min(buckets), last - max_buckets + 1), last + 1):
        cell = buckets.get(b, {"outcomes": {}, "keys": {}, "lat": []})
        lat = cell["lat"]
        out.append(
            {
                "time": b * width,
                "accept": cell["outcomes"].get("accept", 0),
                "soft": cell["outcomes"].get("soft", 0),
                "hard": cell["outcomes"].get("hard", 0),
                "by_key": dict(cell["keys"]),
                "latency_mean": sum(lat) / len(lat) if lat else None,
                "latency_max": max(lat) if lat else None,
            }
        )
    return out
