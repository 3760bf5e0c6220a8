"""Admission: who may join, how much work and prefill a node may cost us, and when it is banned.

One policy, in one file (docs/security.md gives the arithmetic). The principle: an identity is
a free key, so trust is earned. What the coordinator spends on a node (leases held, prefill
seconds) stays proportional to the useful work the node has delivered, plus a small allowance
for newcomers that all newcomers SHARE, so a thousand new keys cost what one costs.

- Join: an optional proof of work (`join_pow_bits`) and a pool-wide cap on new identities per
  minute. A banned key stays banned.
- Probation: a new identity gets one-prompt leases, one at a time, from a small pool of lease
  slots all newcomers share; its submissions are validated from a shared budget of prefill
  seconds per minute, after the trusted nodes' work; one proven cheat bans it.
  `probation_accepts` accepted submissions end probation. A soft fault pauses its leasing:
  with k faults in the window, for 60 s x 4^(k-1) from the latest, at most the window.
- Quota: a trusted node's open leases are capped by what it answered lately (1 + answered / 2,
  at most `max_leases_per_node` and half the pool's in-flight budget), minus its soft faults in
  the window: expiries, and releases beyond `release_allowance`.
- Validation order: trusted work first; a node whose prefill seconds exceed
  `validation_allowance_s + validation_ratio x` the seconds of its accepted work waits for the
  shared budget, like a newcomer.
- Ban: the strikes among a node's last `ban_window` verdicts reach `ban_strikes` (a proven
  cheat is 1; a transport refusal, or a submission that keeps killing validator workers, 0.5).
  Accepted work does not repay a strike; it only pushes it out of the window, so cheating one
  lease in four is banned within eight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from protocol import pow
from protocol.messages import JoinCode, LeaseCode
from protocol.poolspec import AdmissionSection
from trainer.ledger import Activity, Decision, Ledger, Standing

PROVEN_CHEAT = 1.0
"""Strikes of a hard verdict: content that fails a check, a lie about a lease."""
TRANSPORT_REFUSAL = 0.5
"""Strikes of a request the transport refused (forged, malformed, oversized, replayed): an
honest node can hit one through a clock skew or a retried stream, so it costs less."""
LOST_WORKERS = 0.5
"""Strikes of a submission that, validated alone, cost a validator worker `MAX_LOSSES` times
(trainer/submissions.py): most likely built to crash or stall validation, though a machine
fault can meet an honest one, so it costs what a transport refusal does."""
QUOTA_RETRY_S = 5.0
BUSY_REASON = "enough work in flight; try shortly"
PROBATION_PAUSE_S = 60.0
"""A newcomer's leasing pauses this long after its latest soft fault while that is its only
one in the window, four times as long with two, and the whole window with three or more. One
fault used to end it for the window (600 s), so an honest newcomer killed once, or with one
slow first lease, sat out ten minutes. A lease hoarder now holds a shared probation slot a
little over half the time (a 300 s term in each 540 s cycle, at the defaults) instead of a
third; fresh identities at the newcomer rate could already hold every slot."""
VERDICT_RETRY_S = 1.0
"""A newcomer that has answered and awaits only its verdict asks again this soon: verdicts
take well under a second when validation keeps up, and waiting `QUOTA_RETRY_S` made every
newcomer's first leases (and so the pool's first step) 5 s apart. A lease request costs the
coordinator two indexed queries, and the per-peer rate limit bounds them anyway."""

Tier = Literal[0, 1]
"""Validation order: 0 trusted, 1 on probation or over its prefill budget."""


@dataclass(frozen=True)
class JoinTerms:
    code: JoinCode
    reason: str = ""
    retry_after_s: float = 0.0


@dataclass(frozen=True)
class LeaseTerms:
    code: LeaseCode
    prompts: int = 0
    """Prompts the lease may carry (when `code` is ok)."""
    reason: str = ""
    retry_after_s: float = 0.0
    for_demand: bool = False
    """Refused only because trusted work in flight fills what the trainer can use: the answer
    may change as soon as the trainer takes a batch, so the request may be held until then."""


class TokenBucket:
    """`rate` per second, bursts of `burst`; refills with the clock it is given."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = burst, now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def wait(self, now: float) -> float:
        """0 while any budget is left (it may then be overdrawn by `charge`), else the seconds
        until it is positive again."""
        self._refill(now)
        return 0.0 if self.tokens > 0 else -self.tokens / self.rate + 1e-3

    def charge(self, amount: float, now: float) -> None:
        self._refill(now)
        self.tokens -= amount


class Admission:
    """The admission policy of one pool (implements `trainer.ledger.Rules`)."""

    def __init__(
        self,
        config: AdmissionSection,
        pool_id: str,
        ledger: Ledger,
        *,
        lease_prompts: int,
        in_flight_leases: int,
        now: float | None = None,
    ) -> None:
        self.config = config
        self.pool_id = pool_id
        self.ledger = ledger
        self.lease_prompts = lease_prompts
        # One node never holds more than half of the pool's in-flight budget.
        self.max_open = max(1, min(config.max_leases_per_node, in_flight_leases // 2))
        now = time.time() if now is None else now
        per_min = config.new_identities_per_min
        self._newcomers = TokenBucket(per_min / 60.0, max(1.0, per_min), now)
        budget = config.probation_validation_s
        self._probation_seconds = TokenBucket(budget / 60.0, budget / 6.0, now)

    # ------------------------------------------------------------------ rules (ledger)

    @property
    def ban_window(self) -> int:
        return self.config.ban_window

    @property
    def probation_accepts(self) -> int:
        return self.config.probation_accepts

    def ban_reason(self, standing: Standing, decision: Decision) -> str | None:
        if standing.probation and decision.strikes >= PROVEN_CHEAT:
            return f"a proven cheat on probation: {decision.reason}"
        if standing.window_strikes >= self.config.ban_strikes:
            return (
                f"reputation: {standing.window_strikes:g} strikes in its last "
                f"{self.config.ban_window} verdicts, the latest: {decision.reason}"
            )
        return None

    # ------------------------------------------------------------------ joining

    def join_terms(self, key: bytes, pow_nonce: int, now: float) -> JoinTerms:
        """Whether `key` may join now. Members re-join freely (a banned one never); a new
        identity pays the proof of work and takes a token from the pool-wide newcomer bucket."""
        node = self.ledger.node(key)
        if node is not None:
            if node["banned_at"] is not None:
                return JoinTerms("banned", f"banned: {node['ban_reason']}")
            return JoinTerms("ok")
        bits = self.config.join_pow_bits
        if not pow.check(self.pool_id, key, pow_nonce, bits):
            return JoinTerms("bad_pow", f"the join needs a {bits}-bit proof of work")
        wait = self._newcomers.take(now)
        if wait > 0:
            return JoinTerms("busy", "the pool admits no more new identities now", wait)
        return JoinTerms("ok")

    # ------------------------------------------------------------------ leases

    def lease_terms(self, key: bytes, now: float, pool_busy: bool) -> LeaseTerms:
        """What lease `key` may have now. `pool_busy`: trusted work in flight already fills
        what the trainer can use before it goes stale (newcomers' leases are not counted
        there: they have their own shared slots)."""
        node = self.ledger.node(key)
        if node is None or node["banned_at"] is not None:
            return LeaseTerms("banned", reason="not a member, or banned")
        seen = self.ledger.activity(key, now - self.config.window_s)
        if node["probation"]:
            pause = self._probation_pause(seen, now)
            return self._probation_terms(seen.open, self.ledger.pending_count(key), pause)
        quota = min(self.max_open, 1 + seen.answered // 2) - self._faults(seen)
        if seen.open >= max(quota, 0):
            return LeaseTerms(
                "quota",
                reason=f"this node holds {seen.open} of the {max(quota, 0)} leases it may hold",
                retry_after_s=QUOTA_RETRY_S,
            )
        if pool_busy:
            return LeaseTerms(
                "busy",
                reason=BUSY_REASON,
                retry_after_s=0.5,
                for_demand=True,
            )
        return LeaseTerms("ok", prompts=self.lease_prompts)

    def _faults(self, seen: Activity) -> int:
        """Expiries and releases beyond the allowance: a node's soft faults in the window."""
        return seen.expired + max(0, seen.released - self.config.release_allowance)

    def _probation_pause(self, seen: Activity, now: float) -> float:
        """Seconds a newcomer's leasing stays paused after its latest soft fault."""
        faults = self._faults(seen)
        if not faults:
            return 0.0
        releases_faulted = seen.released > self.config.release_allowance
        last = max(seen.last_expired_at, seen.last_released_at if releases_faulted else 0.0)
        pause = min(self.config.window_s, PROBATION_PAUSE_S * 4.0 ** (faults - 1))
        return max(0.0, last + pause - now)

    def _probation_terms(self, open_leases: int, pending: int, pause: float) -> LeaseTerms:
        # One lease at a time, and the next only once the last answer has its verdict: a
        # newcomer cannot queue up work we have not judged yet.
        if pause > 0:
            return LeaseTerms(
                "quota",
                reason=f"a soft fault in the window pauses leasing for {pause:.0f} s more",
                retry_after_s=pause,
            )
        if open_leases or pending:
            # Its own lease still open: it is working; only a verdict to come: soon.
            wait = QUOTA_RETRY_S if open_leases else VERDICT_RETRY_S
            return LeaseTerms(
                "quota", reason="one lease at a time on probation", retry_after_s=wait
            )
        if self.ledger.open_lease_count(probation=True) >= self.config.probation_leases:
            return LeaseTerms(
                "busy", reason="newcomers' lease slots are taken; try shortly", retry_after_s=2.0
            )
        return LeaseTerms("ok", prompts=1)

    def release_is_fault(self, key: bytes, now: float) -> bool:
        """Whether one more release by `key` goes beyond its allowance (a soft fault)."""
        seen = self.ledger.activity(key, now - self.config.window_s)
        return seen.released >= self.config.release_allowance

    # ------------------------------------------------------------------ validation

    def is_trusted(self, key: bytes) -> bool:
        """Joined, not banned, past probation: a node whose connection the coordinator keeps
        when strangers' would fill its host (`Host.prefer`). Probation is what a free identity
        cannot skip; joining alone is not."""
        node = self.ledger.node(key)
        return node is not None and node["banned_at"] is None and not node["probation"]

    def tier(self, key: bytes) -> Tier:
        """Validation order of `key`'s submissions."""
        node = self.ledger.node(key)
        if node is None or node["probation"]:
            return 1
        budget = (
            self.config.validation_allowance_s
            + self.config.validation_ratio * node["accepted_validation_s"]
        )
        return 1 if node["validation_s"] > budget else 0

    def probation_check_wait(self, now: float) -> float:
        """0 when the newcomers' shared prefill budget has seconds left, else how long until
        it has (charge what the prefill took with `charge_probation`)."""
        return self._probation_seconds.wait(now)

    def charge_probation(self, seconds: float, now: float) -> None:
        self._probation_seconds.charge(seconds, now)
