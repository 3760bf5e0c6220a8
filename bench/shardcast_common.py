"""Helpers shared by the shardcast benchmarks: processes, pool files, result tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO))

from protocol import poolspec  # noqa: E402
from protocol.identity import Identity  # noqa: E402


def machine() -> dict:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def make_pool(folder: Path) -> tuple[Path, Path, str]:
    """A coordinator key and a pool spec naming it: (key file, pool file, pool id)."""
    identity = Identity.generate()
    key = folder / "coordinator.key"
    identity.save(key)
    spec = poolspec.from_dict(
        {"name": "bench", "coordinator": {"public_key": identity.public_key.hex()}}
    )
    pool = folder / "pool.toml"
    pool.write_text(poolspec.dumps(spec))
    return key, pool, poolspec.pool_id(spec)


class Proc:
    """A `python -m shardcast ...` process; its stdout lines are collected."""

    def __init__(self, *args: str, log: Path) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "shardcast", *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.lines: list[str] = []
        self._got_line = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            self._got_line.set()
        self._got_line.set()

    def first_json(self, timeout: float = 60.0) -> dict:
        if not self._got_line.wait(timeout) or not self.lines:
            raise RuntimeError(f"{self.popen.args} did not announce itself")
        return json.loads(self.lines[0])

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def run_cli(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "shardcast", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"shardcast {args[0]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, result: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {RESULTS / name}.json and .md")


class HostProcess:
    """A host in a child process of a bench: it prints `ADDR <multiaddr>` once started, then a
    JSON line of its own facts for each line it reads on stdin."""

    def __init__(self, command: list[str]) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "ADDR":
            self.close()
            raise RuntimeError(f"the host did not start: {line}")
        self.addr = line[1]

    def facts(self) -> dict:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
