"""Start the simulated swarm's processes by forking one that has already imported them.

Every swarmrl process imports torch and transformers before it does anything: about 8 CPU-s
each. The demo starts a coordinator, a relay, three nodes and a cheater at once, so on two
cores the imports alone took some 25 s of its start. Here the demo's own process imports the
modules once, runs no torch work itself, and forks a child per process: each child is still
its own OS process running the same CLI entry point (`node.cli.main`, ...) with its own log,
PID and signals, but starts with the modules loaded (copy-on-write pages).

Fork is safe here because the parent starts no threads and runs no torch op before forking (a
child forked after OpenMP started could deadlock in its first parallel region). `preload`
checks the first; the second is a rule for callers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

# What the coordinator, nodes, relays and cheaters import on their way to their first step.
PRELOAD = (
    "trainer.cli",
    "trainer.pool_init",
    "trainer.coordinator",
    "node.cli",
    "node.worker",
    "shardcast.cli",
    "shardcast.relay",
    "transformers.models.llama.modeling_llama",
)


class PreforkError(RuntimeError):
    """The parent cannot fork safely (a thread is running); start processes by exec."""


def preload(script_modules: dict[str, Path]) -> dict[str, ModuleType]:
    """Import PRELOAD and the given scripts (name -> file); returns the scripts' modules.

    Raises PreforkError when an import left a thread running: forking then copies a lock
    some thread may hold."""
    for name in PRELOAD:
        importlib.import_module(name)
    scripts = {}
    for name, path in script_modules.items():
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        scripts[name] = module
    if threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        raise PreforkError(f"threads running after the imports: {names}")
    return scripts


class Forked:
    """A forked child, with the part of `subprocess.Popen`'s interface the demo uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0.0)
            time.sleep(0.05)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


def fork_main(main: Callable[[list[str]], int | None], argv: list[str], log: Path) -> Forked:
    """Run `main(argv)` in a forked child in a session of its own, stdout and stderr appended
    to `log`, and exit the child with its return code (never return into the parent's code)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return Forked(pid)
    code = 1
    try:
        os.setsid()  # like start_new_session: a Ctrl-C reaches only the demo, which stops us
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        sys.stdout.reconfigure(line_buffering=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        result = main(argv)
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
