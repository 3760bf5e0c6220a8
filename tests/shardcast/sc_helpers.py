"""Shared fixtures: keys, small checkpoints, and real shardcast processes on loopback."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from protocol.identity import Identity

REPO = Path(__file__).resolve().parents[2]
POOL_ID = "testpool"
SHARD = 64 * 1024


@pytest.fixture
def identity() -> Identity:
    return Identity(bytes(range(32)))


@pytest.fixture
def key_file(tmp_path: Path, identity: Identity) -> Path:
    path = tmp_path / "coordinator.key"
    identity.save(path)
    return path


def make_checkpoint(folder: Path, seed: int = 0, mb: float = 1.0) -> Path:
    """A checkpoint-shaped folder: a big weights file, a small one, config and tokenizer."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(mb * 1e6) // 2
    weights = rng.standard_normal(n).astype(np.float16)
    (folder / "model.safetensors").write_bytes(weights.tobytes())
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "extra.bin").write_bytes(rng.bytes(5000))
    (folder / "config.json").write_text(json.dumps({"seed": seed}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def nudge_checkpoint(folder: Path, seed: int, fraction: float = 0.01) -> None:
    """Change a small fraction of the weights in place, as one optimizer step would."""
    rng = np.random.default_rng(seed)
    path = folder / "model.safetensors"
    w = np.frombuffer(path.read_bytes(), dtype=np.float16).copy()
    idx = rng.choice(len(w), size=max(1, int(len(w) * fraction)), replace=False)
    w[idx] += np.float16(0.01)
    path.write_bytes(w.tobytes())


def same_tree(a: Path, b: Path) -> bool:
    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        }

    return files(a) == files(b)


class Proc:
    """A shardcast process whose first stdout line is a JSON announcement."""

    def __init__(
        self, args: list[str], log: Path, env: dict | None = None, module: str = "shardcast"
    ) -> None:
        self.log = log
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=open(log, "w"),  # noqa: SIM115 - lives as long as the process
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line)
        self._lines.put("")

    def announcement(self, timeout: float = 30.0) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no announcement from {self.args}: {self.stderr()}") from None
        if not line:
            raise AssertionError(f"{self.args} exited early: {self.stderr()}")
        return json.loads(line)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[callable]:
    started: list[Proc] = []
    counter = iter(range(1000))

    def start(*args: str, env: dict | None = None, module: str = "shardcast") -> Proc:
        p = Proc(list(args), tmp_path / f"proc{next(counter)}.log", env, module)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
