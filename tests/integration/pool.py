"""Run a real pool for tests: a coordinator and nodes as separate OS processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Small batches and short leases, so a test pool trains within seconds even with an untrained
# model that rarely earns a reward.
FAST = [
    "algorithm.batch_prompts=2",
    "algorithm.micro_batch=64",
    "limits.lease_prompts=2",
    "limits.lease_timeout_s=8.0",
    "sampling.group_size=4",
    "sampling.max_new_tokens=6",
    "task.options={ digits = 2 }",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SWARMRL_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # several torch processes share 2 cores
        "HF_HUB_OFFLINE": "1",
    }


@dataclass
class Coordinator:
    home: Path
    spec: Path
    data: Path
    p2p_port: int = field(default_factory=free_port)
    origin_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: Path | None = None
    pool_id: str = ""
    bootstrap: str = ""
    restarts: int = 0

    @classmethod
    def create(cls, tmp: Path, extra: list[str] = ()) -> Coordinator:
        home = tmp / "home"
        c = cls(home=home, spec=tmp / "pool.toml", data=tmp / "coordinator")
        args = [
            "init",
            "--model",
            "tiny",
            "-o",
            str(c.spec),
            "--listen",
            f"/ip4/127.0.0.1/tcp/{c.p2p_port}",
            "--origin",
            f"http://127.0.0.1:{c.origin_port}",
        ]
        for s in [*FAST, *extra]:
            args += ["--set", s]
        out = subprocess.run(
            [sys.executable, "-m", "trainer", *args],
            env=_env(home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        c.pool_id = re.search(r"pool id: (\w+)", out.stdout).group(1)
        return c

    def start(
        self, max_steps: int | None = None, timeout: float = 120.0, args: Sequence[str] = ()
    ) -> None:
        """Run `coordinator run` (with `args` added, e.g. an operator token) and wait for it."""
        self.log = self.data.parent / f"coordinator-{self.restarts}.log"
        self.restarts += 1
        cmd = [
            sys.executable,
            "-m",
            "trainer",
            "run",
            str(self.spec),
            "--data-dir",
            str(self.data),
            "--http-port",
            str(self.http_port),
        ]
        if max_steps is not None:
            cmd += ["--max-steps", str(max_steps)]
        cmd += list(args)
        self.proc = subprocess.Popen(
            cmd, env=_env(self.home), stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            if m := re.search(r"libp2p:\s+(\S+)", text):
                self.bootstrap = m.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited:\n{text[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(
            f"coordinator did not start in {timeout}s:\n{self.log.read_text()[-3000:]}"
        )

    def api(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.api("/api/status")
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(
            f"timed out waiting for {what}; last status {last}\n"
            f"{self.log.read_text()[-3000:] if self.log else ''}"
        )


@dataclass
class Node:
    name: str
    home: Path
    proc: subprocess.Popen | None = None
    log: Path | None = None
    module: str = "node"
    """What `python -m` runs: the node CLI, or a test's variant of it (e.g. a cheating node)."""

    def start(self, pool_id: str, bootstrap: str, *extra: str) -> None:
        self.log = self.home / f"{self.name}.log"
        self.home.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            self.module,
            "join",
            "--pool",
            pool_id,
            "--bootstrap",
            bootstrap,
            "--key",
            str(self.home / f"{self.name}.key"),
            "--data-dir",
            str(self.home / self.name),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--quiet",
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd, env=_env(self.home), stdout=self.log.open("w"), stderr=subprocess.STDOUT
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def text(self) -> str:
        return self.log.read_text() if self.log and self.log.exists() else ""


def start_relaying_nodes(coordinator: Coordinator, home: Path, started: list[Node]) -> int:
    """alice (re-serving the weights on a fixed port as well), bob, and the cheater mallory
    (tests/browser/cheater.py) join `coordinator`'s pool: the dashboard tests' pool, and
    bench/weights_lag.py's. Each node goes into `started` as it starts, for the caller to
    kill; returns alice's relay port."""
    relay_port = free_port()
    for name, module in (("alice", "node"), ("bob", "node"), ("mallory", "tests.browser.cheater")):
        node = Node(name, home, module=module)
        started.append(node)
        extra = ["--relay", str(relay_port)] if name == "alice" else []
        node.start(coordinator.pool_id, coordinator.bootstrap, *extra)
    return relay_port
