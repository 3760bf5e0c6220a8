"""Where the coordinator's numbers go: JSONL files always, Prometheus, and Weights & Biases when
installed and enabled. The dashboard reads the same numbers through the API."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily

from protocol.host import HostStats

log = logging.getLogger(__name__)

EVALS_FILE = "evals.jsonl"
"""In-run evaluations, one line per evaluated version (trainer/evaluating.py)."""

# In-run evaluation metrics exported as Prometheus gauges (metric -> gauge name, help).
EVAL_GAUGES = {
    "eval_accuracy": ("eval_accuracy", "greedy accuracy on held-out prompts"),
    "eval_pass@1": ("eval_pass_at_1", "pass@1 of sampled completions on held-out prompts"),
    "eval_pass@k": ("eval_pass_at_k", "pass@k of sampled completions on held-out prompts"),
    "eval_mean_reward": ("eval_mean_reward", "mean greedy reward on held-out prompts"),
    "eval_rewarded": ("eval_rewarded", "share of greedy games won (multi-turn tasks)"),
}

# Per-step metrics also exported as Prometheus gauges (name -> help).
STEP_GAUGES = {
    "reward_mean": "mean reward of the step's groups",
    "frac_reward_zero_std": "fraction of groups with equal rewards (dropped)",
    "policy_loss": "policy loss",
    "grad_norm": "gradient norm before clipping",
    "entropy": "mean token entropy",
    "tokens_per_s": "trainer tokens per second",
    "staleness_mean": "mean staleness of the step's groups, in versions",
    "staleness_max": "largest staleness of the step's groups",
    "completion_len_mean": "mean completion length in tokens",
}


class RunLog:
    """Appends samples and steps to JSONL files under `folder` and keeps Prometheus metrics."""

    def __init__(self, folder: Path, wandb_project: str | None = None, run_name: str = "") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self.gauges = {
            k: Gauge(f"swarmrl_{k}", h, registry=self.registry) for k, h in STEP_GAUGES.items()
        }
        self.step = Gauge("swarmrl_step", "trainer step", registry=self.registry)
        self.version = Gauge(
            "swarmrl_weight_version", "newest published version", registry=self.registry
        )
        self.verdicts = Counter(
            "swarmrl_submissions",
            "validated submissions",
            ["outcome", "check"],
            registry=self.registry,
        )
        self.validation_seconds = Gauge(
            "swarmrl_validation_seconds",
            "time to validate the last submission",
            registry=self.registry,
        )
        self.nodes = Gauge("swarmrl_nodes", "nodes by status", ["status"], registry=self.registry)
        self.eval_gauges = {
            k: Gauge(f"swarmrl_{name}", h, registry=self.registry)
            for k, (name, h) in EVAL_GAUGES.items()
        }
        self.eval_version = Gauge(
            "swarmrl_eval_version", "the version evaluated last", registry=self.registry
        )
        self._transport = TransportCollector(HostStats())
        self.registry.register(self._transport)
        self._last_step = 0
        self._wandb = _start_wandb(wandb_project, run_name, self.folder) if wandb_project else None

    def sample(self, record: dict[str, Any]) -> None:
        self._append("samples.jsonl", record)

    def verdict(self, outcome: str, check: str, seconds: float) -> None:
        self.verdicts.labels(outcome=outcome, check=check).inc()
        self.validation_seconds.set(seconds)

    def step_done(self, step: int, version: int, metrics: dict[str, float]) -> None:
        self._append(
            "steps.jsonl", {"step": step, "version": version, "time": time.time(), **metrics}
        )
        self.step.set(step)
        for k, g in self.gauges.items():
            if k in metrics:
                g.set(metrics[k])
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        self._last_step = step

    def evaluated(self, version: int, metrics: dict[str, float]) -> None:
        """An in-run evaluation of `version` (it finishes steps later than its version was
        made: logged with the version, and to W&B at the newest step, which only grows)."""
        self._append(EVALS_FILE, {"version": version, "time": time.time(), **metrics})
        self.eval_version.set(version)
        for k, g in self.eval_gauges.items():
            if k in metrics:
                g.set(metrics[k])
        if self._wandb is not None:
            self._wandb.log({**metrics, "eval_version": version}, step=self._last_step)

    def published(self, version: int) -> None:
        self.version.set(version)

    def watch_transport(self, stats: HostStats) -> None:
        """Export these counters of the coordinator's host (read at each scrape)."""
        self._transport.stats = stats

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def _append(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock, (self.folder / name).open("a") as f:
            f.write(line)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


class TransportCollector:
    """A Prometheus collector over `HostStats`: what the transport served, refused (by code),
    how often it cut off a peer that kept sending while refused, and the connections it closed
    unhandshaken."""

    def __init__(self, stats: HostStats) -> None:
        self.stats = stats

    def collect(self) -> Any:
        s = self.stats
        yield CounterMetricFamily("swarmrl_requests_served", "requests answered", s.served)
        refused = CounterMetricFamily(
            "swarmrl_requests_refused", "requests refused by the transport", labels=["code"]
        )
        for code, n in sorted(s.refused.items()):
            refused.add_metric([code], n)
        yield refused
        yield CounterMetricFamily("swarmrl_peer_cutoffs", "peers cut off", s.cutoffs)
        yield CounterMetricFamily(
            "swarmrl_streams_cut", "streams of cut-off peers reset unnegotiated", s.streams_cut
        )
        yield CounterMetricFamily(
            "swarmrl_connections_refused",
            "inbound connections closed before the handshake (address past its rate)",
            s.connections_refused,
        )
        yield CounterMetricFamily(
            "swarmrl_connections_over_held",
            "inbound connections closed for want of a slot (address at its share, host full)",
            s.connections_over_held,
        )
        yield CounterMetricFamily(
            "swarmrl_connections_evicted",
            "strangers' inbound connections closed to make room for a newcomer",
            s.connections_evicted,
        )
        yield CounterMetricFamily(
            "swarmrl_handshakes_cut",
            "inbound connections closed in their handshake to make room for newer ones",
            s.handshakes_cut,
        )
        yield CounterMetricFamily(
            "swarmrl_window_violations",
            "connections closed: their peer sent past a stream's receive window",
            s.window_violations,
        )
        yield CounterMetricFamily(
            "swarmrl_silent_connections_closed",
            "outbound connections closed: a stream negotiation on them met silence",
            s.silent_connections_closed,
        )


def _start_wandb(project: str, run_name: str, folder: Path) -> Any:
    try:
        import wandb
    except ImportError:
        log.warning("wandb logging was asked for but wandb is not installed (pip install wandb)")
        return None
    # Offline mode works without network; `wandb sync` uploads later.
    return wandb.init(project=project, name=run_name or None, dir=str(folder), resume="allow")
