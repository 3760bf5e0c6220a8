"""A whole swarmrl network on one machine, as separate OS processes on 127.0.0.1.

    python examples/swarm.py [--nodes N] [--relays R] [--byzantine KIND[,KIND...]]
        [--model tiny-digits|tiny|smollm2-135m|DIR] [--task NAME] [--steps S] [--chaos]
        [--report FILE] [--dashboard-port P]

It starts a coordinator (`coordinator run`), SHARDCAST relays (`shardcast relay`), honest nodes
(`node join`) and cheating nodes (`examples/byzantine.py`), shows progress while the pool trains,
optionally injects faults (`--chaos`: nodes killed and restarted, a relay killed, the
coordinator SIGKILLed once and restarted), and ends with a summary table and a JSON report built
from the coordinator's ledger: reward at the start and the end, per-node verdicts, bans and why,
bytes published, staleness, and a check that no accepted group was lost or trained twice;
the reward curve by weight version is drawn beside the report (`report-reward.png`).

Every process it starts is stopped by its PID when it ends, however it ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import prefork

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

KINDS = (
    # The kinds that take many verdicts or several leases to judge start first, while
    # training still leases; the relays, judged by what the coordinator hands out, last.
    "intermittent",
    "sybil",
    "replay",
    "seed-reroller",
    "lease-hoarder",
    "garbage",
    "forge",
    "validation-flooder",
    "wrong-model",
    "perturbed",
    "tamper-tokens",
    "cherry-pick",
    "fabricate",
    "truncate",
    "stale",
    "fake-logprobs",
    "flood",
    "lying-relay",
    "trickling-relay",
)
# What stops each kind: a ban (the default), or a bound on what it can take. Flooding is
# answered by the rate limiter (an honest node behind a busy NAT may burst too); the others
# waste the pool's time or misadvertise without a provable lie, so admission keeps what they
# get small instead.
EXPECTED: dict[str, str] = {
    "flood": "rate-limited",
    "lease-hoarder": "bounded",
    "seed-reroller": "bounded",
    "lying-relay": "bounded",
    "trickling-relay": "bounded",
}
# Kinds whose every answer is a cheat: none of their groups may ever be trained. (The others
# also do honest work, e.g. the intermittent cheat three leases in four, which may be.)
ALWAYS_CHEATS = {
    "wrong-model",
    "tamper-tokens",
    "fabricate",
    "truncate",
    "fake-logprobs",
    "sybil",
    "lease-hoarder",
    "validation-flooder",
}
# The costs a node imposed on the coordinator, from /api/contributions.
COSTS = (
    "validation_s",
    "leases_issued",
    "leases_expired",
    "leases_released",
    "soft_faults",
    "rate_refusals",
)


def judged(row: dict[str, Any]) -> bool:
    """Whether the coordinator checked the content of some work of this key (accepted or
    hard-rejected it) or banned it. A soft verdict (stale weights, say) looks at no content. A
    key given a lease so late that the run ended before its answer was checked had no chance
    to be caught, and did no harm: nothing of it was accepted."""
    return bool(row["accepted"] or row["hard"] or row["banned"])


# The default model: the `tiny` preset's architecture (Llama, hidden 128, 4 layers) with a
# 20-token vocabulary (digits, the letters of "copy", space, "="). With the preset's ~100-token
# vocabulary a random policy almost never hits a digit, so the reward starts near zero and rises
# too slowly for a demo; with 20 tokens it learns 2-digit copying in a few minutes on 2 cores.
DIGITS_CHARS = "0123456789copy ="
FACTS_TIMEOUT_S = 60.0
"""How long the report's reads of the coordinator's API may take: on a fast pool the nodes keep
its cores busy validating until they stop, and reading 12,000 groups took more than 5 s."""


def _copy_profile(digits: int) -> dict[str, Any]:
    """The toy copy task at `digits` digits, one sampled token per digit."""
    return {
        "task": "copy",
        "steps": 40,
        "set": [
            f"task.options={{ digits = {digits} }}",
            f"sampling.max_new_tokens={digits}",
            # 16, not 8: at the start (reward ~0.04) 8 samples of a prompt were all wrong 72% of
            # the time and near the end all right ~40%, groups that cannot train; 16 halves
            # both, and a lease's fixed costs (round trips, signing, proofs) buy twice the work
            "sampling.group_size=16",
            # up to 64 for a prompt whose recent groups say 16 would likely all earn one reward
            # (trainer/curriculum.py): at the start, and for solved prompts near the end
            "sampling.max_group_size=64",
            "algorithm.lr=2e-3",
            # 12 groups a step, not 8: with 8 the final reward fell under 0.9 in one run in
            # five (a late take-off or a noisy end: too few groups per gradient). Groups up to
            # 3 versions old (off-policy corrected), not 2: with 12 a step alone a dozen groups
            # still went stale and the waste sat near 15%. Both goals (waste at most 15%, reward
            # at least 0.9) in 26 of 28 runs (docs/swarm.md, "Twenty-seventh session")
            "algorithm.batch_prompts=12",
            "limits.max_staleness=3",
            "algorithm.micro_batch=128",
            "limits.lease_prompts=4",
            "limits.lease_timeout_s=30.0",
        ],
    }


# Pool settings per model, applied with `coordinator init --set` (any can be overridden with
# --set). Chosen by measurement on 2 CPU cores; see docs/swarm.md.
PROFILES: dict[str, dict[str, Any]] = {
    "tiny-digits": _copy_profile(1),
    "tiny": _copy_profile(2),
    "smollm2-135m": {
        "task": "arithmetic",
        "steps": 10,
        "timeout": 1800.0,  # ~40 s a step here, mostly validation and generation
        "set": [
            'task.options={ op = "+", digits = 2 }',
            "sampling.max_new_tokens=8",
            "sampling.group_size=8",
            "algorithm.lr=1e-5",
            "algorithm.batch_prompts=4",
            "algorithm.micro_batch=16",
            "limits.lease_prompts=2",
            "limits.lease_timeout_s=300.0",
        ],
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_digits_model(folder: Path, seed: int = 0) -> Path:
    """The default model: the `tiny` preset's architecture with a digits-only vocabulary,
    saved as an HF folder (config, safetensors, tokenizer)."""
    if (folder / "config.json").exists():
        return folder
    from transformers.utils import logging as hf_logging

    from toploc.models import build_tiny

    hf_logging.disable_progress_bar()
    model, tok = build_tiny(seed, chars=DIGITS_CHARS)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-digits.", dir=folder.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def init_main(digits: Path | None, argv: list[str]) -> int:
    """`coordinator init` (after building the tiny-digits model, if it is the one)."""
    if digits:
        build_digits_model(digits)
    from trainer.cli import main

    return main(["init", *argv])


@dataclass
class Proc:
    """One child process: how to start it again, its log, and what it is."""

    name: str
    role: str  # coordinator, relay, honest, byzantine
    cmd: list[str]
    log: Path
    kind: str = "honest"
    key: str = ""  # hex public key (nodes)
    popen: subprocess.Popen | prefork.Forked | None = None
    starts: int = 0
    started_at: float = 0.0
    ended: str = ""

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def entry(self) -> tuple[str, list[str]]:
        """The module whose `main(argv)` `cmd` runs, and the argv: `python -m trainer ...` runs
        `trainer.cli`, `python examples/byzantine.py ...` runs the script's module."""
        if self.cmd[1] == "-m":
            return f"{self.cmd[2]}.cli", self.cmd[3:]
        return Path(self.cmd[1]).stem, self.cmd[2:]

    def start(self, env: dict[str, str], forking: bool) -> None:
        """Start `cmd`: forked from this (preloaded) process, or as a fresh interpreter."""
        self.starts += 1
        with self.log.open("a") as f:
            f.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n")
        if forking:
            module, argv = self.entry()
            self.popen = prefork.fork_main(sys.modules[module].main, argv, self.log)
        else:
            out = self.log.open("a")
            # A session of its own: a Ctrl-C in the terminal reaches only this script, which
            # then stops the children in order (nodes first, so they can release their leases).
            self.popen = subprocess.Popen(
                self.cmd,
                env=env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
        self.started_at = time.time()
        self.ended = ""

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                self.popen.send_signal(sig)  # by PID: only what this script started

    def stop(self, grace: float = 10.0) -> None:
        if not self.alive:
            return
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def kill(self) -> None:
        if self.alive:
            self.signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Swarm:
    args: argparse.Namespace
    work: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    pool_id: str = ""
    bootstrap: str = ""
    spec_path: Path | None = None
    t0: float = field(default_factory=time.time)
    crash_checks: list[dict[str, Any]] = field(default_factory=list)
    served: dict[str, Any] = field(default_factory=dict)
    batch_prompts: int = 0
    model_name: str = ""
    urls_handed_out: set[str] = field(default_factory=set)
    """Every weights URL the coordinator listed as a source while the swarm ran."""
    coordinator_log_mark: int = 0
    forking: bool = False
    """Children are forked from this process after it imported their modules (`prefork`)."""
    startup: dict[str, float] = field(default_factory=dict)
    """Seconds from the start to each start-up milestone, first time seen."""
    never_started: list[str] = field(default_factory=list)
    """Cheater kinds still waiting for a slot when the run ended."""
    last_progress: str = ""
    """The last progress line printed, so the same line is not printed twice."""

    # ------------------------------------------------------------------ setup

    def __post_init__(self) -> None:
        self.home = self.work / "home"
        self.data = self.work / "coordinator"
        self.logs = self.work / "logs"
        for d in (self.home, self.logs, self.work / "keys", self.work / "nodes"):
            d.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "SWARMRL_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",  # many torch processes share few cores
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        if self.args.spawn == "fork":
            os.environ.update(self.env)  # before the imports: some read the environment then
        self.p2p_port = free_port()
        self.origin_port = free_port()
        self.http_port = self.args.dashboard_port or free_port()
        self.relay_ports = [free_port() for _ in range(self.args.relays)]

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {text}", flush=True)

    def milestone(self, name: str) -> None:
        self.startup.setdefault(name, round(time.time() - self.t0, 1))

    def event(self, what: str, **details: Any) -> None:
        self.events.append({"t": round(time.time() - self.t0, 1), "event": what, **details})
        self.say(what + (f" ({details})" if details else ""))

    def init_pool(self) -> None:
        """`coordinator init` for the chosen model and task. When forking, it runs in a child
        forked before this process imports anything heavy, so its imports and `preload`'s run
        on two cores at once."""
        a = self.args
        model = a.model
        profile = PROFILES.get(model, PROFILES["tiny"])
        digits = self.work / "models" / "tiny-digits" if model == "tiny-digits" else None
        model_arg = str(digits) if digits else model
        self.model_name = model
        task = a.task or profile["task"]
        self.spec_path = self.work / "pool.toml"
        cmd = [
            sys.executable, "-m", "trainer", "init",
            "--model", model_arg,
            "--task", task,
            "--name", f"swarm-{model}-{task}",
            "--key", str(self.home / "coordinator.key"),
            "--listen", f"/ip4/127.0.0.1/tcp/{self.p2p_port}",
            "--origin", f"http://127.0.0.1:{self.origin_port}",
            "-o", str(self.spec_path),
        ]  # fmt: skip
        for port in self.relay_ports:
            cmd += ["--relay", f"http://127.0.0.1:{port}"]
        for s in [*profile["set"], *a.set]:
            cmd += ["--set", s]
        init = Proc("init", "init", cmd, self.logs / "init.log")
        if a.spawn == "fork":
            init.popen = prefork.fork_main(partial(init_main, digits), cmd[4:], init.log)
            self.preload()
        else:
            if digits:
                build_digits_model(digits)
            init.start(self.env, forking=False)
        if init.popen.wait() != 0:
            raise SystemExit(f"coordinator init failed:\n{init.text()[-3000:]}")
        self.pool_id = re.search(r"pool id: (\w+)", init.text()).group(1)
        import tomllib

        spec = tomllib.loads(self.spec_path.read_text())
        self.batch_prompts = spec["algorithm"]["batch_prompts"]
        self.spec = spec

    def preload(self) -> None:
        """Import what every child runs, so that children forked from here skip it."""
        try:
            prefork.preload({"byzantine": HERE / "byzantine.py"})
            self.forking = True
        except prefork.PreforkError as e:
            print(f"starting every process by exec instead of fork: {e}", flush=True)

    def _key(self, name: str) -> tuple[Path, str]:
        from protocol.identity import Identity

        path = self.work / "keys" / f"{name}.key"
        identity, _ = Identity.load_or_create(path)
        return path, identity.public_key.hex()

    # ------------------------------------------------------------------ processes

    def start_coordinator(self, timeout: float = 180.0) -> None:
        self.launch_coordinator()
        self.wait_for_coordinator(timeout)

    def launch_coordinator(self) -> None:
        proc = self.proc("coordinator")
        if proc is None:
            cmd = [
                sys.executable, "-m", "trainer", "run", str(self.spec_path),
                "--key", str(self.home / "coordinator.key"),
                "--data-dir", str(self.data),
                "--http-port", str(self.http_port),
                "--max-steps", str(self.args.steps),
            ]  # fmt: skip
            proc = Proc("coordinator", "coordinator", cmd, self.logs / "coordinator.log")
            self.procs.append(proc)
        self.coordinator_log_mark = len(proc.text())
        proc.start(self.env, self.forking)

    def wait_for_coordinator(self, timeout: float) -> None:
        """Until the coordinator prints its libp2p address (nodes may already be dialing it)."""
        proc, mark = self.proc("coordinator"), self.coordinator_log_mark
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = proc.text()[mark:]
            if m := re.search(r"libp2p:\s+(\S+)", text):
                self.bootstrap = m.group(1)
                return
            if not proc.alive:
                raise SystemExit(f"the coordinator exited:\n{text[-3000:]}")
            time.sleep(0.3)
        raise SystemExit(f"the coordinator did not start in {timeout:.0f} s")

    def start_relay(self, i: int) -> None:
        cmd = [
            sys.executable, "-m", "shardcast", "relay",
            "--upstream", f"http://127.0.0.1:{self.origin_port}",
            "--pool", str(self.spec_path),
            "--root", str(self.work / f"relay-{i}"),
            "--port", str(self.relay_ports[i]),
        ]  # fmt: skip
        proc = Proc(f"relay-{i}", "relay", cmd, self.logs / f"relay-{i}.log")
        self.procs.append(proc)
        proc.start(self.env, self.forking)

    def start_honest(self, i: int) -> Proc:
        name = f"honest-{i}"
        key, pub = self._key(name)
        cmd = [
            sys.executable, "-m", "node", "join",
            "--pool", self.pool_id,
            "--bootstrap", self.bootstrap,
            "--key", str(key),
            "--data-dir", str(self.work / "nodes" / name),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--quiet",
        ]  # fmt: skip
        proc = Proc(name, "honest", cmd, self.logs / f"{name}.log", key=pub)
        self.procs.append(proc)
        proc.start(self.env, self.forking)
        return proc

    def start_byzantine(self, kind: str, n: int) -> Proc:
        name = f"cheat-{kind}" if n == 0 else f"cheat-{kind}-{n}"
        key, pub = self._key(name)
        cmd = [
            sys.executable, str(HERE / "byzantine.py"), kind,
            "--pool", self.pool_id,
            "--bootstrap", self.bootstrap,
            "--key", str(key),
            "--data-dir", str(self.work / "nodes" / name),
            "--stats", str(self.logs / f"{name}.json"),
        ]  # fmt: skip
        proc = Proc(name, "byzantine", cmd, self.logs / f"{name}.log", kind=kind, key=pub)
        self.procs.append(proc)
        proc.start(self.env, self.forking)
        return proc

    def proc(self, name: str) -> Proc | None:
        return next((p for p in self.procs if p.name == name), None)

    def stop_all(self) -> None:
        # Nodes first (a stopped node releases its lease), then relays, the coordinator last.
        order = {"byzantine": 0, "honest": 0, "relay": 1, "coordinator": 2}
        for rank in (0, 1, 2):
            group = [p for p in self.procs if order[p.role] == rank and p.alive]
            for p in group:
                p.signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for p in group:
                try:
                    p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()

    # ------------------------------------------------------------------ observing

    def api(self, path: str, timeout_s: float = 5.0) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any] | None:
        try:
            return self.api("/api/status")
        except (OSError, ValueError):
            return None  # restarting, or busy

    def ledger(self) -> sqlite3.Connection:
        db = sqlite3.connect(f"file:{self.data / 'ledger.sqlite'}?mode=ro", uri=True, timeout=10)
        db.row_factory = sqlite3.Row
        return db

    def recent_reward(self, accepted_groups: int) -> float | None:
        """Mean reward of the accepted groups of the newest two versions (flat groups
        included: the trainer's own metric sees only the informative ones)."""
        try:
            groups = self.all_groups(max(0, accepted_groups - 8 * self.batch_prompts))
        except (OSError, ValueError):
            return None
        if not groups:
            return None
        newest = max(g["weight_version"] for g in groups)
        values = [x for g in groups if g["weight_version"] >= newest - 1 for x in g["rewards"]]
        return sum(values) / len(values) if values else None

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        a = self.args
        self.say(f"work folder {self.work}")
        self.init_pool()
        self.milestone("pool_init")
        self.say(f"pool {self.pool_id}: {self.model_name}, task {self.spec['task']['name']} "
                 f"{self.spec['task']['options']}, {a.steps} steps")  # fmt: skip
        # Everything starts at once: the nodes' start-up (imports, model load) overlaps the
        # coordinator's, and their joins retry until it listens.
        self.bootstrap = self.spec["coordinator"]["bootstrap"][0]
        self.launch_coordinator()
        for i in range(a.relays):
            self.start_relay(i)
        for i in range(a.nodes):
            self.start_honest(i)
        self.wait_for_coordinator(180.0)
        self.milestone("coordinator_up")
        api = f"http://127.0.0.1:{self.http_port}"
        print(f"\n  dashboard:  {api}/   (JSON API {api}/api/status, metrics {api}/metrics)")
        print(f"  bootstrap:  {self.bootstrap}\n", flush=True)
        queue = list(a.byzantine)
        seen_kinds: Counter[str] = Counter()
        chaos = self.chaos_plan() if a.chaos else []
        last_print = 0.0
        done = False
        status: dict[str, Any] | None = None
        while time.time() - self.t0 < a.timeout:
            time.sleep(1.0)
            # cheaters: at most `cheaters_at_once` at a time, the next as soon as one leaves
            running = [p for p in self.procs if p.role == "byzantine" and p.alive]
            for p in self.procs:
                if p.role == "byzantine" and not p.alive and not p.ended:
                    p.ended = f"exited {p.popen.returncode}"
                    self.say(f"{p.name} left ({p.ended})")
                if p.role == "byzantine" and p.alive and time.time() - p.started_at > a.cheat_s:
                    p.kill()
                    p.ended = "killed: still running after --cheat-s"
                    self.say(f"{p.name} {p.ended}")
            # Every kind must get work while training still leases: past a quarter of the steps,
            # the kinds still queued all start (the last one queued once started as the pool
            # ended, was never leased work, and so could not be caught; started at a third, one
            # chased versions it fetched too slowly on a loaded machine until the pool ended).
            late = status is not None and status["step"] >= a.steps // 4
            while queue and (late or len(running) < a.cheaters_at_once):
                kind = queue.pop(0)
                running.append(self.start_byzantine(kind, seen_kinds[kind]))
                seen_kinds[kind] += 1
                self.event("cheater started", kind=kind)
            self.never_started = list(queue)
            coordinator = self.proc("coordinator")
            finished = status is not None and status["step"] >= a.steps
            if coordinator is not None and not coordinator.alive and not finished:
                # outside the chaos plan (its restart is done before the loop comes back here):
                # a crash, which the stale status would otherwise show as a stalled pool
                raise SystemExit(
                    f"the coordinator exited ({coordinator.popen.returncode}); see "
                    f"{coordinator.log}:\n{coordinator.text()[-3000:]}"
                )
            status = self.status() or status
            if status:
                self.urls_handed_out.update(status.get("weights_urls", []))
            step = status["step"] if status else 0
            if status and status["counts"]["accepted_groups"]:
                self.milestone("first_accepted_group")
            if step >= 1:
                self.milestone("first_step")
            if chaos and step >= chaos[0][0]:
                self.do_chaos(chaos.pop(0)[1])
                continue
            # honest nodes that died outside the chaos plan are a failure worth seeing; one
            # that left with 0 once the pool finished was told so by the coordinator
            for p in self.procs:
                if p.role != "honest" or p.alive or p.ended:
                    continue
                if step >= a.steps and p.popen.returncode == 0:
                    continue
                p.ended = f"exited {p.popen.returncode}"
                self.say(f"{p.name} exited unexpectedly ({p.ended}); see {p.log}")
            if time.time() - last_print >= a.progress_s and status:
                last_print = time.time()
                self.print_progress(status)
            budget_spent = (
                a.train_s is not None
                and time.time() - self.t0 - self.startup["coordinator_up"] >= a.train_s
            )
            if (
                (step >= a.steps or budget_spent)
                and not queue
                and not any(p.alive for p in self.procs if p.role == "byzantine")
            ):
                done = True
                break
        if done:
            self.drain_validation()
            if step >= a.steps:  # the pool finished: its last step is committed soon
                self.await_commit(step)
        if status:
            self.print_progress(status)
        if not done:
            self.event("timed out", seconds=a.timeout)
        self.served = self.bytes_served()
        facts = self.api_facts()  # while the coordinator still answers
        self.stop_all()
        return self.report(done, facts)

    def api_facts(self) -> dict[str, Any]:
        """What the report reads from the coordinator's API."""
        read = partial(self.api, timeout_s=FACTS_TIMEOUT_S)
        return {
            "contributions": read("/api/contributions"),
            "hard": read("/api/verdicts?outcome=hard&limit=1000"),
            "verdicts": read("/api/verdicts?limit=1000"),
            "steps": read("/api/steps"),
            "versions": read("/api/versions"),
            "groups": self.all_groups(),
            "integrity": read("/api/ledger/integrity"),
        }

    def all_groups(self, since_id: int = 0) -> list[dict[str, Any]]:
        """Every accepted group after `since_id`, page by page (GET /api/groups)."""
        out: list[dict[str, Any]] = []
        while True:
            page = self.api(f"/api/groups?since_id={since_id}&limit=5000", FACTS_TIMEOUT_S)
            out += page
            if len(page) < 5000:
                return out
            since_id = page[-1]["id"]

    def drain_validation(self, limit_s: float = 60.0) -> None:
        """Let the coordinator decide what it has received before anyone is judged: a
        cheater's decisive submission may still wait in the validation queue when training
        ends (no new work is leased after the last step)."""
        deadline = time.time() + limit_s
        while time.time() < deadline:
            status = self.status()
            if status and status["counts"]["pending"] == 0:
                return
            time.sleep(1.0)
        self.say(f"submissions still awaiting a verdict after {limit_s:.0f} s")

    def await_commit(self, step: int, limit_s: float = 60.0) -> None:
        """Wait until the ledger records `step`: the status counts a step when it is trained,
        the ledger once its checkpoint is on disk. Facts read in between saw the step's
        groups trained on one read and no such step on the next (a false "ledger
        inconsistent" in the report)."""
        deadline = time.time() + limit_s
        while time.time() < deadline:
            try:
                if step <= 0 or self.api(f"/api/steps?since={step - 1}&limit=1"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        self.say(f"step {step} not in the ledger after {limit_s:.0f} s")

    def bytes_served(self) -> dict[str, Any]:
        """What the origin counted and each relay says it served, from the Weights API (the
        counters start at zero whenever a server starts)."""
        try:
            w = self.api("/api/weights")
        except (OSError, ValueError):
            return {"origin": None, "relays": None}
        relays = [r.get("served") for r in w["relays"]]
        return {
            "origin": (w.get("served") or {}).get("total"),
            "relays": sum(r for r in relays if isinstance(r, int)) if relays else 0,
        }

    def print_progress(self, s: dict[str, Any]) -> None:
        nodes = {p.key: p for p in self.procs if p.key}
        banned = []
        try:
            for n in self.api("/api/nodes"):
                if n["status"] == "banned" and n["key"] in nodes:
                    banned.append(nodes[n["key"]].name.removeprefix("cheat-"))
        except (OSError, ValueError):
            pass
        reward = self.recent_reward(s["counts"]["accepted_groups"])
        alive = sum(p.alive for p in self.procs if p.role in ("honest", "byzantine"))
        c = s["counts"]
        line = (
            f"step {s['step']:>3}/{self.args.steps}  v{s['version']:<3} "
            f"reward {'-' if reward is None else f'{reward:.2f}'}  "
            f"submissions {c['submissions']:>4}  groups {c['accepted_groups']:>4} "
            f"(trained {c['trained_groups']})  nodes {alive} up  "
            f"banned: {', '.join(banned) or '-'}"
        )
        if line != self.last_progress:  # the closing print repeats the loop's last one
            self.last_progress = line
            self.say(line)

    # ------------------------------------------------------------------ chaos

    def chaos_plan(self) -> list[tuple[int, str]]:
        """(at step, action): spread over the run so learning has to carry on through each."""
        n = self.args.steps
        plan = [
            (max(1, n // 6), "restart-node"),
            (max(2, n // 3), "kill-relay"),
            (max(3, n // 2), "crash-coordinator"),
            (max(4, 2 * n // 3), "restart-node"),
        ]
        if not self.args.relays:
            plan = [p for p in plan if p[1] != "kill-relay"]
        return plan

    def do_chaos(self, action: str) -> None:
        rng = random.Random(len(self.events))
        if action == "restart-node":
            live = [p for p in self.procs if p.role == "honest" and p.alive]
            if not live:
                return
            p = rng.choice(live)
            p.kill()
            self.event("chaos: SIGKILL node", node=p.name)
            time.sleep(3.0)
            p.start(self.env, self.forking)
            self.event("chaos: node restarted", node=p.name)
        elif action == "kill-relay":
            live = [p for p in self.procs if p.role == "relay" and p.alive]
            if live:
                live[0].kill()
                self.event("chaos: SIGKILL relay", relay=live[0].name)
                # Back after a while: nodes must cope meanwhile (they fall back to the origin).
                # It is restarted because a node that joins while it is down can fail its
                # first fetch (a delta chain older than the origin keeps; see docs/swarm.md).
                time.sleep(10.0)
                live[0].start(self.env, self.forking)
                self.event("chaos: relay restarted", relay=live[0].name)
        elif action == "crash-coordinator":
            before = self.status()
            coordinator = self.proc("coordinator")
            coordinator.kill()
            facts = self.ledger_facts()
            self.event(
                "chaos: SIGKILL coordinator",
                step=facts["steps"][-1] if facts["steps"] else 0,
                accepted_groups=len(facts["group_ids"]),
            )
            time.sleep(2.0)
            self.start_coordinator()
            after = None
            while after is None:
                time.sleep(0.5)
                after = self.status()
            self.crash_checks.append(
                {
                    "api_groups_before": before["counts"]["accepted_groups"] if before else None,
                    "ledger_group_ids": facts["group_ids"],
                    "ledger_step": facts["steps"][-1] if facts["steps"] else 0,
                    # Not after["step"]: the restarted coordinator may train on groups it had
                    # accepted before the kill before this poll first reaches its API.
                    "resumed_step": after["resumed_from"]["step"],
                    "versions_before": facts["max_version"],
                    "resumed_version": after["resumed_from"]["version"],
                }
            )
            self.event("chaos: coordinator restarted", step=after["step"], version=after["version"])

    def ledger_facts(self) -> dict[str, Any]:
        """What the ledger on disk holds, read while the coordinator is SIGKILLed (its API is
        down, and what survived on disk is the point)."""
        db = self.ledger()
        try:
            return {
                "group_ids": [r[0] for r in db.execute("SELECT id FROM groups ORDER BY id")],
                "steps": [r[0] for r in db.execute("SELECT step FROM steps ORDER BY step")],
                "max_version": db.execute("SELECT MAX(version) FROM versions").fetchone()[0],
            }
        finally:
            db.close()

    def first_leases(self) -> list[tuple[float, float]]:
        """(published at, first lease issued on it) for every version some lease was on."""
        db = self.ledger()
        try:
            return db.execute(
                """SELECT v.published_at, MIN(l.issued_at) FROM versions v
                   JOIN leases l ON l.weight_version = v.version GROUP BY v.version"""
            ).fetchall()
        finally:
            db.close()

    # ------------------------------------------------------------------ the report

    def report(self, finished: bool, facts: dict[str, Any]) -> dict[str, Any]:
        return self._report(finished, facts, facts["groups"], facts["integrity"])

    def owners(self) -> dict[str, Proc]:
        """Every key a node process used (a sybil uses several, listed in its stats file)."""
        out = {p.key: p for p in self.procs if p.key}
        for p in self.procs:
            for key in self.cheat_stats(p).get("keys", []):
                out[key] = p
        return out

    def cheat_stats(self, p: Proc) -> dict[str, Any]:
        path = self.logs / f"{p.name}.json"
        return json.loads(path.read_text()) if p.role == "byzantine" and path.exists() else {}

    def node_rows(self, facts: dict[str, Any]) -> list[dict[str, Any]]:
        """Per identity: verdicts, ban, what caught it, its cost to the coordinator."""
        owners = self.owners()
        checks: dict[str, Counter[str]] = {}
        for v in facts["hard"]:
            checks.setdefault(v["node"], Counter())[v["check"] or "lease"] += 1
        rows = []
        for c in facts["contributions"]:
            p = owners.get(c["key"])
            stats = self.cheat_stats(p) if p else {}
            rows.append(
                {
                    "name": p.name if p else c["key"][:12],
                    "role": p.role if p else "unknown",
                    "kind": p.kind if p else "unknown",
                    "key": c["key"],
                    "accepted": c["accepted"],
                    "verified_tokens": c["verified_tokens"],
                    "soft": c["soft_rejected"],
                    "hard": c["hard_rejected"],
                    "trained_groups": c["trained_groups"],
                    "probation": c["probation"],
                    "banned": c["banned"],
                    "ban_reason": c["ban_reason"],
                    "caught_by": dict(checks.get(c["key"], {})),
                    "cost": {k: c[k] for k in COSTS},
                    "rate_limited": c["rate_refusals"],
                    "cheat_counts": stats.get("counts", {}),
                    "restarts": max(0, p.starts - 1) if p else 0,
                }
            )
        return rows

    def judge(self, p: Proc, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Whether a cheating process was caught or bounded, how, and what it cost."""
        stats = self.cheat_stats(p)
        mine = [r for r in rows if r["key"] in set(stats.get("keys", [p.key]))]
        cost = {k: round(sum(r["cost"][k] for r in mine), 2) for k in COSTS}
        out = {"kind": p.kind, "expected": EXPECTED.get(p.kind, "banned"), "cost": cost}
        out["keys"] = {"used": len(stats.get("keys", [])), "admitted": len(mine)}
        out["keys"]["banned"] = sum(r["banned"] for r in mine)
        out["trained_groups"] = sum(r["trained_groups"] for r in mine)
        if not mine:
            return out | {"caught": False, "how": "never admitted"}
        caught, how = self.verdict_on(p.kind, stats, mine)
        return out | {"caught": caught, "how": how}

    def verdict_on(
        self, kind: str, stats: dict[str, Any], mine: list[dict[str, Any]]
    ) -> tuple[bool, str]:
        expected = EXPECTED.get(kind, "banned")
        if expected == "rate-limited":
            # The coordinator's tally (in its ledger, so across its restarts) is the verdict;
            # what the flooder saw is context: on a loaded machine its own replies can time out.
            refused = sum(r["cost"]["rate_refusals"] for r in mine)
            seen = stats.get("counts", {})
            return refused > 0, f"refused {refused} times for rate; it saw {seen}"
        if expected == "banned":
            # A key admitted after training stopped leasing, or whose answer came after the
            # last validation, was never judged; what it sent was not accepted either.
            worked = [r for r in mine if judged(r)]
            banned = [r for r in worked if r["banned"]]
            reason = banned[0]["ban_reason"] if banned else "not banned"
            if not worked:  # why it got no verdict: what the coordinator told it, in its stats
                reason += f"; its replies {stats.get('replies')}, states {stats.get('states')}, "
                reason += f"{stats.get('seconds')} s"
            caught = bool(worked) and len(banned) == len(worked)
            return caught, f"{len(banned)}/{len(worked)} keys judged banned: {reason}"
        if kind == "lease-hoarder":
            held = stats.get("max_held", 0)
            expired = sum(r["cost"]["leases_expired"] for r in mine)
            return held <= 1, f"held at most {held} lease(s) at once; {expired} expired"
        if kind == "seed-reroller":
            back = stats.get("prompts_back", 0)
            releases = sum(
                v for k, v in stats.get("counts", {}).items() if k.startswith("release:")
            )
            faults = sum(r["cost"]["soft_faults"] for r in mine)
            allowance = self.spec.get("admission", {}).get("release_allowance", 2)
            bounded = back == 0 and (releases <= allowance or faults > 0)
            return (
                bounded,
                f"{back} released prompts came back; {releases} releases, {faults} soft faults",
            )
        url = stats.get("relay_url")
        handed = stats.get("counts", {}).get("handed_out", 0) + (url in self.urls_handed_out)
        if not url:
            return False, "never advertised a relay"
        return handed == 0, f"relay {url} handed out {handed} times"

    def _report(
        self,
        finished: bool,
        facts: dict[str, Any],
        groups: list[dict[str, Any]],
        integrity: dict[str, int],
    ) -> dict[str, Any]:
        b = self.batch_prompts
        steps = facts["steps"]

        # Reward at the start and the end: every accepted group (flat ones too) of the first
        # and the last versions, taking versions until at least 2 batches' worth of groups.
        def mean_reward(pick: list[dict[str, Any]]) -> float | None:
            values = [x for g in pick for x in g["rewards"]]
            return round(sum(values) / len(values), 4) if values else None

        def window(newest: bool) -> list[dict[str, Any]]:
            versions = sorted({g["weight_version"] for g in groups}, reverse=newest)
            chosen: list[dict[str, Any]] = []
            for v in versions:
                chosen += [g for g in groups if g["weight_version"] == v]
                if len(chosen) >= 2 * b:
                    break
            return chosen

        start, end = window(False), window(True)
        by_version: dict[int, list[float]] = {}
        for g in groups:
            by_version.setdefault(g["weight_version"], []).extend(g["rewards"])

        nodes = self.node_rows(facts)
        cheaters = {p.name: self.judge(p, nodes) for p in self.procs if p.role == "byzantine"}
        cheats_trained = {
            name: c["trained_groups"]
            for name, c in cheaters.items()
            if c["kind"] in ALWAYS_CHEATS and c["trained_groups"]
        }
        honest_hard = sum(n["hard"] for n in nodes if n["role"] == "honest")
        honest_keys = {n["key"]: n["name"] for n in nodes if n["role"] == "honest"}
        honest_hard_details = [
            {"node": honest_keys[v["node"]], "reason": v["reason"]}
            for v in facts["hard"]
            if v["node"] in honest_keys
        ]

        # The ledger's promises: steps 1..N, one batch per step, every accepted group trained
        # once, dropped with a reason, or still pending; no group recorded twice; no accepted
        # submission missing groups; nothing seen before a crash missing after it.
        step_numbers = [s["step"] for s in steps]
        per_step = Counter(g["trained_step"] for g in groups if g["trained_step"] is not None)
        dup, missing = integrity["duplicate_groups"], integrity["missing_groups"]
        ids = {g["id"] for g in groups}
        lost_in_crash = sum(len(set(c["ledger_group_ids"]) - ids) for c in self.crash_checks)
        crash_ok = all(
            c["resumed_step"] == c["ledger_step"]
            and (c["resumed_version"] or 0) >= (c["versions_before"] or 0)
            and (c["api_groups_before"] or 0) <= len(c["ledger_group_ids"])
            for c in self.crash_checks
        )
        ledger_checks = {
            "steps_contiguous": step_numbers == list(range(1, len(step_numbers) + 1)),
            "one_batch_per_step": all(per_step.get(n, 0) == b for n in step_numbers),
            "trained_only_in_committed_steps": set(per_step) <= set(step_numbers),
            "trained_and_dropped": sum(
                1 for g in groups if g["trained_step"] is not None and g["dropped"]
            ),
            "duplicate_groups": dup,
            "groups_missing_from_accepted_submissions": missing,
            "groups_lost_across_crash": lost_in_crash,
            "crash_resumed_at_committed_step": crash_ok,
            "trained": sum(1 for g in groups if g["trained_step"] is not None),
            "dropped": dict(Counter(g["dropped"] for g in groups if g["dropped"])),
            "pending": sum(1 for g in groups if g["trained_step"] is None and not g["dropped"]),
            # groups differ in size under `sampling.max_group_size`: waste in samples too
            "trained_samples": sum(
                len(g["rewards"]) for g in groups if g["trained_step"] is not None
            ),
            "dropped_samples": sum(len(g["rewards"]) for g in groups if g["dropped"]),
        }
        ledger_ok = (
            ledger_checks["steps_contiguous"]
            and ledger_checks["one_batch_per_step"]
            and ledger_checks["trained_only_in_committed_steps"]
            and not ledger_checks["trained_and_dropped"]
            and not dup
            and not missing
            and not lost_in_crash
            and crash_ok
        )

        versions = facts["versions"]
        published = sum(v["bytes"] for v in versions)
        stale_mean = [s["metrics"].get("staleness_mean", 0.0) for s in steps]
        metrics_first = [s["metrics"]["reward_mean"] for s in steps[:3]]
        metrics_last = [s["metrics"]["reward_mean"] for s in steps[-3:]]
        reward_start, reward_end = mean_reward(start), mean_reward(end)
        report = {
            "finished": finished,
            "seconds": round(time.time() - self.t0, 1),
            "pool_id": self.pool_id,
            "model": self.model_name,
            "task": self.spec["task"],
            "settings": {
                k: self.spec[k]
                for k in ("sampling", "algorithm", "limits", "admission")
                if k in self.spec
            },
            "nodes_honest": self.args.nodes,
            "relays": self.args.relays,
            "steps": len(steps),
            "steps_target": self.args.steps,
            "version": max((v["version"] for v in versions), default=0),
            "reward": {
                "start": reward_start,
                "end": reward_end,
                "start_versions": sorted({g["weight_version"] for g in start}),
                "end_versions": sorted({g["weight_version"] for g in end}),
                "trainer_batch_first_steps": metrics_first,
                "trainer_batch_last_steps": metrics_last,
                "by_version": {v: round(sum(r) / len(r), 4) for v, r in sorted(by_version.items())},
            },
            "nodes": nodes,
            "cheaters": cheaters,
            "cheaters_never_started": self.never_started,
            "cheater_groups_trained": cheats_trained,
            "honest_hard_rejects": honest_hard,
            "honest_hard_reject_details": honest_hard_details[:20],
            "bytes": {
                "published": published,
                "published_full": sum(v["bytes"] for v in versions if v["kind"] == "full"),
                "published_delta": sum(v["bytes"] for v in versions if v["kind"] != "full"),
                "served_by_origin": self.served.get("origin"),
                "served_by_relays": self.served.get("relays"),
                "versions": len(versions),
            },
            "staleness": {
                "mean": round(sum(stale_mean) / len(stale_mean), 3) if stale_mean else None,
                "max": max((s["metrics"].get("staleness_max", 0.0) for s in steps), default=None),
                "dropped_stale_groups": ledger_checks["dropped"].get("stale", 0),
            },
            "waste": waste(ledger_checks),
            "startup_s": self.startup,
            "pace": pace(self.first_leases()),
            "submissions": dict(Counter(v["outcome"] or "pending" for v in facts["verdicts"])),
            "ledger": ledger_checks,
            "chaos": self.events,
            "crash_checks": [
                {k: v for k, v in c.items() if k != "ledger_group_ids"}
                | {"ledger_groups": len(c["ledger_group_ids"])}
                for c in self.crash_checks
            ],
        }
        rose = (
            reward_start is not None
            and reward_end is not None
            and reward_end - reward_start >= self.args.min_gain
        )
        report["checks"] = {
            "finished": finished,
            "reward_rose": rose,
            "every_cheater_caught": all(c["caught"] for c in cheaters.values()),
            "every_kind_ran": not self.never_started,
            "no_cheater_group_trained": not cheats_trained,
            "no_honest_hard_rejects": honest_hard == 0,
            "ledger_consistent": ledger_ok,
        }
        report["ok"] = all(report["checks"].values())
        return report


def waste(ledger_checks: dict[str, Any]) -> dict[str, Any]:
    """Accepted, validated groups that were never trained (all-equal rewards, stale, ...), as
    a share of the accepted groups that were decided (trained or dropped)."""
    dropped = sum(ledger_checks["dropped"].values())
    accepted = ledger_checks["trained"] + dropped
    samples = ledger_checks["trained_samples"] + ledger_checks["dropped_samples"]
    return {
        "accepted": accepted,
        "dropped": dropped,
        "share": round(dropped / accepted, 3) if accepted else 0.0,
        "by_reason": ledger_checks["dropped"],
        "samples": samples,
        "samples_share": round(ledger_checks["dropped_samples"] / samples, 3) if samples else 0.0,
    }


def pace(first_leases: list[tuple[float, float]]) -> dict[str, Any]:
    """How soon a new version was put to work: seconds from its publish to the first lease on
    it, over the versions some lease was on. A stall anywhere between the trainer and the
    nodes (the weights' way through the relays, the node's fetch and swap, the lease) shows
    here first: a departed member held every other version for 5 s while the run's other
    figures looked normal (docs/swarm.md, "Start-up and pace")."""
    lags = sorted(first - published for published, first in first_leases)
    if not lags:
        return {"versions": 0, "median_s": None, "max_s": None}
    return {
        "versions": len(lags),
        "median_s": round(statistics.median(lags), 2),
        "max_s": round(lags[-1], 2),
    }


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


MARKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"  # eighths of a block, low to high
ASCII_MARKS = "_.,-=+*#"


def sparkline(values: list[float], lo: float, hi: float, marks: str = MARKS) -> str:
    """One mark per value, its height in [lo, hi] (clamped) in as many steps as there are
    marks: a curve that fits on one line of the summary."""
    span = (hi - lo) or 1.0
    top = len(marks) - 1
    return "".join(marks[min(top, max(0, int((v - lo) / span * len(marks))))] for v in values)


def marks_for(encoding: str | None) -> str:
    """The block marks where the terminal can print them, ASCII ones where it cannot."""
    try:
        MARKS.encode(encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKS
    return MARKS


def reward_curve(by_version: dict[Any, float]) -> tuple[list[int], list[float]]:
    """(versions, mean rewards) in version order; JSON turns the report's int keys into str."""
    points = sorted((int(v), r) for v, r in by_version.items())
    return [v for v, _ in points], [r for _, r in points]


def reward_range(rewards: list[float]) -> tuple[float, float]:
    """The scale both pictures of the curve use: 0 to 1, widened for a task whose rewards
    leave it."""
    return min(0.0, *rewards), max(1.0, *rewards)


def plot_reward(r: dict[str, Any], path: Path) -> bool:
    """The reward curve as a PNG beside the report; False when there is no curve or matplotlib
    is not installed (it comes with the dev extra that setup installs)."""
    versions, rewards = reward_curve(r["reward"]["by_version"])
    if not versions:
        return False
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(versions, rewards, marker=".")
    w = r["waste"]
    ax.set_title(
        f"{r['model']} on {r['task']['name']}: {r['steps']} steps in {r['seconds']:.0f} s, "
        f"{w['share']:.0%} of accepted groups wasted",
        fontsize=10,
    )
    ax.set_xlabel("weight version the samples were generated with")
    ax.set_ylabel("mean reward of accepted samples")
    lo, hi = reward_range(rewards)
    ax.set_ylim(lo - 0.02, hi + 0.02)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def print_summary(r: dict[str, Any]) -> None:
    line = "-" * 100
    print(f"\n{line}\nswarm summary: {r['model']} on {r['task']['name']} "
          f"{r['task'].get('options', {})}, {r['steps']}/{r['steps_target']} steps "
          f"in {r['seconds']:.0f} s")  # fmt: skip
    rw = r["reward"]
    print(
        f"reward (all accepted samples): start {rw['start']} (v{rw['start_versions']}) -> "
        f"end {rw['end']} (v{rw['end_versions']})"
    )
    versions, rewards = reward_curve(rw["by_version"])
    if versions:
        lo, hi = reward_range(rewards)
        print(f"reward by version, v{versions[0]}-v{versions[-1]} ({lo:g} to {hi:g}): "
              f"{sparkline(rewards, lo, hi, marks_for(sys.stdout.encoding))}")  # fmt: skip
    print(f"{'node':<22}{'kind':<19}{'accepted':>9}{'soft':>6}{'hard':>6}  {'status / caught by'}")
    for n in r["nodes"]:
        if n["banned"]:
            state = f"BANNED ({', '.join(f'{k} x{v}' for k, v in n['caught_by'].items())})"
        elif n["rate_limited"]:
            state = f"rate limited x{n['rate_limited']}"
        else:
            state = "ok" if n["role"] == "honest" else "not banned"
        if n["restarts"]:
            state += f", restarted x{n['restarts']}"
        print(f"{n['name'][:21]:<22}{n['kind']:<19}{n['accepted']:>9}{n['soft']:>6}{n['hard']:>6}  "
              f"{state}")  # fmt: skip
    print(f"\n{'cheater':<24}{'expected':<13}{'result':<8}{'prefill s':>10}{'leases':>7}"
          f"{'expired':>8}{'released':>9}{'faults':>7}{'keys':>8}  how")  # fmt: skip
    for name, c in r["cheaters"].items():
        cost, keys = c["cost"], c["keys"]
        result = ("CAUGHT" if c["expected"] == "banned" else "BOUNDED") if c["caught"] else "NOT"
        print(f"{name[:23]:<24}{c['expected']:<13}{result:<8}{cost['validation_s']:>10.1f}"
              f"{cost['leases_issued']:>7}{cost['leases_expired']:>8}{cost['leases_released']:>9}"
              f"{cost['soft_faults']:>7}{keys['banned']:>4}/{keys['admitted']:<3}  "
              f"{c['how'][:70]}")  # fmt: skip
    b = r["bytes"]
    print(
        f"weights: {b['versions']} versions, {b['published'] / 1e6:.2f} MB published "
        f"({b['published_full'] / 1e6:.2f} full + {b['published_delta'] / 1e6:.2f} delta), "
        f"served by the origin {_mb(b['served_by_origin'])}, by relays {_mb(b['served_by_relays'])}"
    )
    s = r["staleness"]
    print(f"staleness: mean {s['mean']}, max {s['max']}, stale groups dropped "
          f"{s['dropped_stale_groups']}")  # fmt: skip
    print("start-up (s from launch): " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in
                                                r["startup_s"].items()))  # fmt: skip
    p = r["pace"]
    if p["versions"]:
        print(f"pace: a new version's first lease came {p['median_s']} s after its publish "
              f"(median over {p['versions']} versions; at most {p['max_s']} s)")  # fmt: skip
    w = r["waste"]
    print(f"wasted: {w['dropped']} of {w['accepted']} accepted groups ({w['share']:.0%}; "
          f"{w['samples_share']:.0%} of their {w['samples']} samples) were never trained: "
          f"{w['by_reason']}")  # fmt: skip
    led = r["ledger"]
    print(
        f"ledger: {led['trained']} groups trained, {led['pending']} pending, dropped "
        f"{led['dropped']}; duplicates {led['duplicate_groups']}, missing "
        f"{led['groups_missing_from_accepted_submissions']}, lost in crashes "
        f"{led['groups_lost_across_crash']}"
    )
    if r["chaos"]:
        chaos = [e for e in r["chaos"] if e["event"].startswith("chaos")]
        if chaos:
            print("chaos: " + "; ".join(f"{e['t']:.0f}s {e['event'][7:]}" for e in chaos))
    print("checks: " + ", ".join(f"{k} {'OK' if v else 'FAILED'}" for k, v in r["checks"].items()))
    print(line)


def cheater_slots(kinds: list[str]) -> int:
    """Cheaters run at once by default: 3, plus one per bounded kind asked for. A bounded kind
    is never banned, so it runs until the end (or `--cheat-s`): with 3 slots and `--byzantine
    all`, the five bounded kinds took every slot and the last kinds queued never started."""
    return 3 + sum(k in EXPECTED for k in kinds)


def parse_kinds(text: str) -> list[str]:
    if text in ("", "none"):
        return []
    if text == "all":
        return list(KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kind(s) {bad}; known: {', '.join(KINDS)}")
    return kinds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The swarm's settings from `argv` (`--help`), with the model's profile filled in; what
    `bench/adversary_cost.py` builds its pool from too, so that a new setting reaches it."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=3, help="honest nodes (default 3)")
    p.add_argument("--relays", type=int, default=1, help="SHARDCAST relays (default 1)")
    p.add_argument(
        "--byzantine",
        type=parse_kinds,
        default=["wrong-model"],
        help=f"cheating nodes, one per kind: {', '.join(KINDS)}; 'all' or 'none' "
        "(default: wrong-model)",
    )
    p.add_argument(
        "--model",
        default="tiny-digits",
        help="tiny-digits (default: the tiny preset's shape with a 20-token vocabulary), tiny, "
        "smollm2-135m, or an HF model folder",
    )
    p.add_argument("--task", help="task name (default: the model's profile)")
    p.add_argument("--steps", type=int, help="training steps (default: the model's profile)")
    p.add_argument(
        "--train-s",
        type=float,
        help="also end this many seconds after the coordinator is up (a wall-time budget, "
        "as bench/vs_trl.py gives every side)",
    )
    p.add_argument("--chaos", action="store_true", help="kill and restart processes while it runs")
    p.add_argument("--report", type=Path, help="JSON report (default: WORK/report.json)")
    p.add_argument("--dashboard-port", type=int, help="coordinator HTTP port (default: any free)")
    p.add_argument("--workdir", type=Path, help="folder for everything (default: a new temp one)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="pool spec override"
    )
    p.add_argument(
        "--cheaters-at-once",
        type=int,
        help="concurrent cheating nodes (default: 3, plus one for each kind asked for that is "
        "bounded rather than banned: those keep their slot to the end); past a quarter of the "
        "steps, the kinds still queued all start",
    )
    p.add_argument(
        "--cheat-s", type=float, default=240.0, help="a cheater still running after this is killed"
    )
    p.add_argument(
        "--timeout", type=float, help="give up after this many seconds (default 900; 1800 smollm2)"
    )
    p.add_argument("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument(
        "--spawn",
        choices=("fork", "exec"),
        default="fork",
        help="start processes forked from this one after it imported their modules (default: "
        "fast), or each as a fresh interpreter (exec)",
    )
    p.add_argument(
        "--min-gain", type=float, default=0.2, help="reward rise the check demands (default 0.2)"
    )
    args = p.parse_args(argv)
    if args.cheaters_at_once is None:
        args.cheaters_at_once = cheater_slots(args.byzantine)
    profile = PROFILES.get(args.model, PROFILES["tiny"])
    args.steps = args.steps or profile["steps"]
    args.timeout = args.timeout or profile.get("timeout", 900.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="swarmrl-swarm-"))
    work.mkdir(parents=True, exist_ok=True)
    swarm = Swarm(args, work.resolve())

    def on_signal(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough; let it finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        report = swarm.run()
    except KeyboardInterrupt:
        print("\ninterrupted: stopping every process", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        swarm.stop_all()
        return 130
    finally:
        for proc in swarm.procs:  # whatever happened, nothing this script started outlives it
            proc.kill()
    path = args.report or work / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    plot = path.with_name(path.stem + "-reward.png")
    plotted = plot_reward(report, plot)
    print(f"report: {path}   logs: {swarm.logs}" + (f"   reward curve: {plot}" if plotted else ""))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
