"""The coordinator of one pool: hands out leases, validates submissions, trains, publishes.

Everything runs in one trio event loop: the libp2p host's handlers, the SHARDCAST origin and the
HTTP API. Validation and training are CPU-heavy and run in worker threads, so the loop stays
responsive. The ledger is the source of truth: on start the coordinator resumes from the newest
checkpoint the ledger has committed, re-validates submissions that were received but not
decided, and re-publishes the current version if the crash came before it was published.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
import trio

from protocol import messages as msg
from protocol import poolspec
from protocol.discovery import PoolBook, make_pool_record, serve_discovery
from protocol.envelope import Envelope, Verified
from protocol.host import Host, HostConfig, pool_topic, public_key_of_peer
from protocol.identity import Identity, peer_id_of
from protocol.poolspec import PoolSpec
from protocol.wire import decode
from shardcast.origin import Origin
from shardcast.server import serve_app
from toploc.models import eos_token_ids, load_model, resolve_dtype
from toploc.sampling import SamplingParams
from trainer.advantages import group_advantages
from trainer.checkpoint import latest_committed, load_checkpoint, save_checkpoint
from trainer.grpo import GRPOTrainer, Sample, TrainGroup
from trainer.leases import LeaseBook
from trainer.ledger import Decision, LeaseAnswered, LeaseClosed, Ledger, LedgerError
from trainer.metrics import RunLog
from trainer.policy import PolicyStore
from trainer.rewards import parse_rewards
from trainer.tasks import make_task
from trainer.validator import GroupPayload, LeaseView, Validator, Verdict

log = logging.getLogger("swarmrl.coordinator")

# Reputation: credit for good work is capped in the ledger; cheating costs more than it earns.
ACCEPT_CREDIT = 1.0
HARD_PENALTY = -3.0
# A request the transport refused (forged, malformed, oversized, replayed) costs less than a
# proven cheat: an honest node can hit one through a clock skew or a retried stream.
TRANSPORT_PENALTY = -1.0


@dataclass
class RunOptions:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce: list[str] | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 0
    origin_port: int = 0
    operator_token: str | None = None
    wandb_project: str | None = None
    max_steps: int | None = None
    """Stop training after this many steps (the coordinator keeps serving)."""
    heartbeat_s: float = 10.0


@dataclass(frozen=True)
class Endpoints:
    pool_id: str
    peer_id: str
    addrs: list[str]
    api_url: str
    origin_url: str


class Coordinator:
    def __init__(self, spec: PoolSpec, identity: Identity, options: RunOptions) -> None:
        if spec.coordinator.public_key != identity.public_key.hex():
            raise LedgerError(
                "the key given is not the coordinator key named in the pool spec "
                f"({spec.coordinator.public_key[:12]}...); use the key `coordinator init` made"
            )
        self.spec = spec
        self.identity = identity
        self.options = options
        self.pool_id = poolspec.pool_id(spec)
        data = Path(options.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(data / "ledger.sqlite")
        stored = self.ledger.get_meta("pool_id")
        if stored is not None and stored != self.pool_id:
            raise LedgerError(
                f"{data} holds pool {stored}, not {self.pool_id}: use another --data-dir"
            )
        self.ledger.set_meta("pool_id", self.pool_id)
        self.run_log = RunLog(data / "logs", options.wandb_project, spec.name)
        self.task = make_task(
            spec.task.name,
            spec.seed,
            dict(spec.task.options),
            spec.task.limit,
            parse_rewards(spec.task.rewards, spec.sampling.max_new_tokens),
        )
        self.model, self.tokenizer = load_model(spec.model.name, "float32", spec.model.init_seed)
        self.eos = tuple(eos_token_ids(self.model, self.tokenizer))
        keep = spec.limits.max_staleness + 2
        self.policy = PolicyStore(data / "weights", spec.model.dtype, keep, keep)
        self.origin = Origin(
            data / "shardcast",
            identity,
            self.pool_id,
            keep=keep,
            full_every=spec.algorithm.full_every,
        )
        self.trainer = GRPOTrainer(
            self.model,
            spec.algorithm,
            spec.sampling.temperature,
            spec.sampling.max_new_tokens,
            compute_dtype=resolve_dtype(spec.model.dtype),
            pad_token_id=self.tokenizer.pad_token_id,
            ref_model=load_model(spec.model.name, spec.model.dtype, spec.model.init_seed)[0]
            if spec.algorithm.beta > 0
            else None,
        )
        self.sampling = SamplingParams(
            temperature=spec.sampling.temperature,
            top_k=spec.sampling.top_k,
            top_p=spec.sampling.top_p,
            max_tokens=spec.sampling.max_new_tokens,
            eos_token_ids=self.eos,
        )
        self.lease_book = LeaseBook(spec.seed, len(self.task.train), spec.limits.lease_prompts)
        self.validator = Validator(
            spec,
            self.task,
            self.tokenizer,
            self.policy.model,
            len(self.tokenizer),
            self.tokenizer.pad_token_id,
        )
        self.step, self.version = self.ledger.last_step()
        # Where this process picked up from the ledger: the API reports it so that anyone can
        # check a restart resumed at the committed step, even after training moved on.
        self.resumed_from = {"step": self.step, "version": self.version}
        self._prompt_ids: dict[int, list[int]] = {}
        self._relays: dict[bytes, str] = {}
        self._weights_from: dict[bytes, dict[str, int]] = {}
        self._submitted, self._to_validate = trio.open_memory_channel[int](math.inf)
        self._work = trio.Event()
        self._flat_since_step = 0
        self._host: Host | None = None
        self.endpoints: Endpoints | None = None
        self.training_done = trio.Event()

    # ------------------------------------------------------------------ lifecycle

    def restore(self) -> None:
        """Resume the model and optimizer from the checkpoint the ledger committed last."""
        ckpt = latest_committed(Path(self.options.data_dir) / "checkpoints", self.step)
        if ckpt is not None:
            load_checkpoint(ckpt, self.model, self.trainer.optimizer, self.trainer.scheduler)
            log.info("resumed at step %d (version %d) from %s", self.step, self.version, ckpt.path)

    async def run(
        self, *, task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.restore()
        config = HostConfig(requests_per_s=self.spec.limits.requests_per_s)
        async with (
            Host.open(
                self.identity,
                self.pool_id,
                self.options.listen,
                config,
                announce=self.options.announce,
            ) as host,
            trio.open_nursery() as nursery,
        ):
            self._host = host
            host.on_refusal = self._on_refusal
            origin_url = await nursery.start(
                self.origin.serve, self.options.http_host, self.options.origin_port
            )
            await self._ensure_published(self.version)
            from trainer.api import create_api

            api_url = await nursery.start(
                serve_app, create_api(self), self.options.http_host, self.options.http_port
            )
            book = PoolBook(self.pool_id)
            book.learn(make_pool_record(self.identity, self.spec, host.addrs))
            serve_discovery(host, book)
            active = self.ledger.is_active
            host.serve(msg.JOIN_PROTOCOL, self._on_join, msg.JoinRequest, msg.JoinReply)
            host.serve(
                msg.LEASE_PROTOCOL,
                self._on_lease,
                msg.LeaseRequest,
                msg.LeaseReply,
                allowed_signer=active,
            )
            host.serve(
                msg.SUBMIT_PROTOCOL,
                self._on_submit,
                msg.Submission,
                msg.Receipt,
                allowed_signer=active,
            )
            host.serve(
                msg.HEARTBEAT_PROTOCOL, self._on_heartbeat, msg.Heartbeat, msg.HeartbeatReply
            )
            host.serve(
                msg.RELEASE_PROTOCOL,
                self._on_release,
                msg.ReleaseLease,
                msg.Receipt,
                allowed_signer=active,
            )
            for sid in self.ledger.pending_submissions():
                self._submitted.send_nowait(sid)
            nursery.start_soon(self._validation_loop)
            nursery.start_soon(self._training_loop)
            nursery.start_soon(self._expiry_loop)
            self.endpoints = Endpoints(self.pool_id, host.peer_id, host.addrs, api_url, origin_url)
            task_status.started(self.endpoints)

    def close(self) -> None:
        self.run_log.close()
        self.ledger.close()

    # ------------------------------------------------------------------ handlers

    def relaying_nodes(self) -> dict[bytes, str]:
        """Nodes that announced a relay (`node join --relay`): key -> URL."""
        return dict(self._relays)

    def weights_sources(self, node: bytes) -> dict[str, int]:
        """Bytes `node` says it fetched from each weights URL (its latest heartbeat)."""
        return dict(self._weights_from.get(node, {}))

    def weights_urls(self) -> list[str]:
        urls = [self.origin.url] if self.origin.url else []
        return urls + list(self.spec.coordinator.relays) + list(self._relays.values())

    async def _on_join(self, v: Verified[msg.JoinRequest]) -> msg.JoinReply:
        req = v.message
        ok = self.ledger.join(
            v.signer,
            peer_id_of(v.signer),
            msgspec.to_builtins(req.hardware),
            req.engine,
            time.time(),
        )
        if not ok:
            node = self.ledger.node(v.signer)
            return msg.JoinReply(accepted=False, reason=f"banned: {node['ban_reason']}"[:256])
        if req.relay_url:
            self._relays[v.signer] = req.relay_url
        log.info("node %s joined (%s, %s)", v.signer.hex()[:12], req.engine, req.hardware.device)
        return msg.JoinReply(
            accepted=True,
            current_version=self.version,
            heartbeat_s=self.options.heartbeat_s,
            weights_urls=self.weights_urls()[:32],
        )

    async def _on_lease(self, v: Verified[msg.LeaseRequest]) -> msg.LeaseReply:
        held = min(v.message.weight_version, self.version)
        min_version = max(0, self.version - self.spec.limits.max_staleness)
        if held < min_version:
            return msg.LeaseReply(
                retry_after_s=1.0,
                reason=f"weights v{held} are too old; fetch v{self.version} first",
            )
        if self.options.max_steps is not None and self.step >= self.options.max_steps:
            return msg.LeaseReply(retry_after_s=5.0, reason="training has finished")
        if self._enough_work():
            return msg.LeaseReply(retry_after_s=0.5, reason="enough work in flight; try shortly")
        now = time.time()
        deadline = now + self.spec.limits.lease_timeout_s
        sampling = msg.SamplingWire(
            temperature=self.sampling.temperature,
            top_k=self.sampling.top_k,
            top_p=self.sampling.top_p,
            max_new_tokens=self.sampling.max_tokens,
            eos_token_ids=list(self.eos),
        )

        def build(lease_id: int, counter: int) -> tuple[list[dict[str, Any]], bytes]:
            tasks = [
                {
                    "prompt_index": t.prompt_index,
                    "prompt_ids": self._prompt(t.prompt_index),
                    "seed": t.seed,
                    "group_size": self.spec.sampling.group_size,
                }
                for t in self.lease_book.plan(v.signer, counter)
            ]
            lease = msg.Lease(
                lease_id=lease_id,
                node=v.signer,
                counter=counter,
                weight_version=held,
                min_version=min_version,
                tasks=[msg.LeaseTask(**t) for t in tasks],
                sampling=sampling,
                deadline_ms=int(deadline * 1000),
            )
            return tasks, msgspec.msgpack.encode(lease)

        _, _, _, body = self.ledger.issue_lease(v.signer, now, deadline, held, build)
        return msg.LeaseReply(lease=msgspec.msgpack.decode(body, type=msg.Lease))

    async def _on_submit(self, v: Verified[msg.Submission]) -> msg.Receipt:
        lease_id = v.message.lease_id
        if len(v.raw) > self.spec.limits.max_submission_bytes:
            return msg.Receipt(
                lease_id=lease_id,
                queued=False,
                reason=f"submission of {len(v.raw)} bytes is over the pool's limit",
            )
        now = time.time()
        try:
            sid = self.ledger.record_submission(lease_id, v.signer, v.raw, now)
        except LeaseAnswered as e:
            repeat = self._same_answer(lease_id, v.raw)
            if repeat is not None:
                # The node's retry after a lost receipt (a timeout, our restart): the same
                # content, counted once, so an honest node is never punished for the network.
                return msg.Receipt(lease_id=lease_id, queued=True, submission_id=repeat)
            return self._refuse_submission(v, e, now)
        except LedgerError as e:
            return self._refuse_submission(v, e, now)
        self._submitted.send_nowait(sid)
        return msg.Receipt(lease_id=lease_id, queued=True, submission_id=sid)

    def _same_answer(self, lease_id: int, raw: bytes) -> int | None:
        """The id of the lease's recorded answer when it signed exactly the body `raw` signs."""
        prior = self.ledger.answer_of(lease_id)
        if prior is None:
            return None

        def body(envelope: bytes) -> bytes:
            return decode(envelope, Envelope, max_bytes=len(envelope)).body

        return prior[0] if body(prior[1]) == body(raw) else None

    def _refuse_submission(
        self, v: Verified[msg.Submission], e: LedgerError, now: float
    ) -> msg.Receipt:
        lease_id = v.message.lease_id
        # Late or revoked: the work is simply not used. Anything else (a lease that does
        # not exist, is someone else's, or was answered already) is a lie or a replay.
        soft = isinstance(e, LeaseClosed)
        outcome = "soft" if soft else "hard"
        decision = Decision(outcome, str(e), {"lease_id": lease_id}, 0.0 if soft else HARD_PENALTY)
        _, banned = self.ledger.record_rejected(
            v.signer, v.raw, decision, self.spec.limits.ban_threshold, now
        )
        self.run_log.verdict(outcome, "lease", 0.0)
        self._note_ban(v.signer, banned)
        return msg.Receipt(lease_id=lease_id, queued=False, reason=str(e)[:256])

    async def _on_heartbeat(self, v: Verified[msg.Heartbeat]) -> msg.HeartbeatReply:
        node = self.ledger.node(v.signer)
        if node is None:
            return msg.HeartbeatReply(current_version=self.version, reason="not joined; join first")
        self.ledger.heartbeat(v.signer, v.message.weight_version, time.time())
        self._weights_from[v.signer] = dict(v.message.weights_from)
        return msg.HeartbeatReply(
            current_version=self.version,
            accepted=node["accepted"],
            soft_rejected=node["soft_rejected"],
            hard_rejected=node["hard_rejected"],
            banned=node["banned_at"] is not None,
            reason=(node["ban_reason"] or "")[:256],
        )

    async def _on_release(self, v: Verified[msg.ReleaseLease]) -> msg.Receipt:
        lease_id = v.message.lease_id
        if not self.ledger.release_lease(lease_id, v.signer):
            return msg.Receipt(
                lease_id=lease_id, queued=False, reason="no such open lease of yours"
            )
        self._return_prompts([lease_id])
        return msg.Receipt(lease_id=lease_id, queued=False, reason="released")

    def _on_refusal(self, peer_id: str, code: str, detail: str) -> None:
        if code not in ("bad_request", "too_large"):
            return  # rate limiting is the remedy for floods; timeouts are not proof of anything
        key = public_key_of_peer(peer_id)
        if self.ledger.node(key) is None:
            return  # not a member: nothing to take away
        reason = f"refused by the transport ({code}): {detail}"
        decision = Decision("hard", reason[:512], {"code": code}, TRANSPORT_PENALTY)
        _, banned = self.ledger.record_rejected(
            key, detail.encode()[:4096], decision, self.spec.limits.ban_threshold, time.time()
        )
        self.run_log.verdict("hard", "transport", 0.0)
        self._note_ban(key, banned)

    # ------------------------------------------------------------------ loops

    async def _expiry_loop(self) -> None:
        while True:
            expired = self.ledger.expire_leases(time.time())
            if expired:
                log.info("leases %s expired; their prompts go to other nodes", expired)
                self._return_prompts(expired)
            await trio.sleep(1.0)

    async def _validation_loop(self) -> None:
        async for sid in self._to_validate:
            row = self.ledger.submission(sid)
            if row is None or row["outcome"] is not None:
                continue
            t0 = time.perf_counter()
            verdict, submission = await trio.to_thread.run_sync(self._validate, row, self.version)
            seconds = time.perf_counter() - t0
            groups = [
                (
                    g.task_index,
                    g.prompt_index,
                    g.weight_version,
                    g.rewards,
                    msgspec.msgpack.encode(g.payload),
                )
                for g in verdict.groups
            ]
            delta = {"accept": ACCEPT_CREDIT, "soft": 0.0, "hard": HARD_PENALTY}[verdict.outcome]
            details = {**verdict.details, "check": verdict.check, "seconds": round(seconds, 3)}
            decision = Decision(verdict.outcome, verdict.reason, details, delta, groups)
            banned = self.ledger.decide(sid, decision, self.spec.limits.ban_threshold, time.time())
            self.run_log.verdict(verdict.outcome, verdict.check, seconds)
            self._log_samples(row, verdict, submission)
            self._note_ban(row["node"], banned)
            if verdict.outcome == "accept":
                self._work.set()

    def _validate(self, row: dict[str, Any], current: int) -> tuple[Verdict, msg.Submission | None]:
        env = decode(row["raw"], Envelope, max_bytes=len(row["raw"]))
        submission = decode(env.body, msg.Submission)
        lease = self.ledger.lease(row["lease_id"])
        signed = msgspec.msgpack.decode(lease["body"], type=msg.Lease)  # what the node was sent
        view = LeaseView(
            tasks=lease["tasks"], min_version=signed.min_version, sampling=self.sampling
        )
        with torch.no_grad():
            return self.validator.validate(submission, view, current), submission

    async def _training_loop(self) -> None:
        b = self.spec.algorithm.batch_prompts
        while self.options.max_steps is None or self.step < self.options.max_steps:
            n = self.step + 1
            min_version = n - self.spec.limits.max_staleness
            stale = self.ledger.drop_stale(min_version)
            if stale:
                log.info("dropped %d stale groups (older than v%d)", stale, min_version)
            candidates = self.ledger.trainable_groups(min_version, 4 * b)
            # Groups whose rewards are all equal carry no signal: drop them now (DAPO's dynamic
            # sampling), so they neither block the queue nor dilute a batch.
            flat = {
                g.id: "zero reward variance" for g in candidates if max(g.rewards) == min(g.rewards)
            }
            if flat:
                self.ledger.drop_groups(flat)
                self._flat_since_step += len(flat)
            informative = [g for g in candidates if g.id not in flat]
            if len(informative) < b:
                if not flat:
                    self._work = trio.Event()
                    with trio.move_on_after(1.0):
                        await self._work.wait()
                continue
            chosen = informative[:b]
            batch = [self._train_group(g) for g in chosen]
            result = await trio.to_thread.run_sync(self.trainer.step, batch, n)
            zero = self._flat_since_step / (self._flat_since_step + len(chosen))
            self._flat_since_step = 0
            metrics = {
                **result.metrics,
                "frac_reward_zero_std": zero,
                "dropped_stale": float(stale),
            }
            await trio.to_thread.run_sync(self._checkpoint, n)
            self.ledger.commit_step(n, n, result.trained, metrics, time.time(), result.dropped)
            self.step = n
            self.run_log.step_done(n, n, metrics)
            log.info(
                "step %d: reward %.3f, %d groups, %.1fs",
                n,
                metrics["reward_mean"],
                len(chosen),
                metrics["step_time_s"],
            )
            if n % self.spec.algorithm.publish_every == 0:
                await self._ensure_published(n)
        self.training_done.set()

    # ------------------------------------------------------------------ helpers

    def _checkpoint(self, step: int) -> None:
        save_checkpoint(
            Path(self.options.data_dir) / "checkpoints",
            step,
            step,
            self.model,
            self.trainer.optimizer,
            self.trainer.scheduler,
        )

    async def _ensure_published(self, version: int) -> None:
        """Export `version` (the trainer's current weights) and publish it, if not done yet."""
        if version in self.origin.store.versions:
            self.version = max(self.version, version)
            return
        folder = await trio.to_thread.run_sync(
            self.policy.export, self.model, self.tokenizer, version
        )
        manifest = await self.origin.publish(folder, version, delta=True)
        kind = "full" if manifest.base is None else "delta"
        self.ledger.record_version(
            version, kind, manifest.base, manifest.payload_bytes, time.time()
        )
        self.version = version
        self.run_log.published(version)
        if self._host is not None:
            announcement = msg.VersionAnnouncement(
                version=version, base=manifest.base, published_ms=int(time.time() * 1000)
            )
            try:
                await self._host.publish(pool_topic(self.pool_id, msg.VERSIONS_TOPIC), announcement)
            except Exception as e:  # gossip is best effort: nodes also learn versions by polling
                log.warning("could not announce v%d: %s", version, e)

    def _train_group(self, g: Any) -> TrainGroup:
        p = msgspec.msgpack.decode(g.payload, type=GroupPayload)
        samples = [
            Sample(p.prompt_ids, t, lp, tr)
            for t, lp, tr in zip(p.tokens, p.logprobs, p.truncated, strict=True)
        ]
        return TrainGroup(samples, g.rewards, g.weight_version, g.id)

    def _prompt(self, index: int) -> list[int]:
        if index not in self._prompt_ids:
            text = self.task.render(self.task.train[index], self.tokenizer)
            self._prompt_ids[index] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompt_ids[index]

    def _return_prompts(self, lease_ids: list[int]) -> None:
        for lease_id in lease_ids:
            lease = self.ledger.lease(lease_id)
            if lease is not None:
                self.lease_book.return_prompts([t["prompt_index"] for t in lease["tasks"]])

    def _enough_work(self) -> bool:
        """Whether another lease would only produce groups that go stale before training.

        Two bounds, in groups. Done work (accepted and trainable, or submitted and not yet
        validated) waits for the trainer: past one batch of it, the trainer is the bottleneck
        and more would wait its staleness away. Done plus leased work (what nodes are still
        generating) stays within the batches the staleness window can train. Measured on the
        default swarm (docs/swarm.md): a single bound of 6 batches on both dropped 61% of the
        accepted groups as stale; these two drop ~15% and finish sooner.
        """
        b = self.spec.algorithm.batch_prompts
        per_lease = self.spec.limits.lease_prompts
        done = self.ledger.count_trainable(self.step + 1 - self.spec.limits.max_staleness)
        done += self.ledger.pending_count() * per_lease
        leased = self.ledger.open_lease_count() * per_lease
        return done >= b or done + leased >= max(1, self.spec.limits.max_staleness) * b

    def _note_ban(self, node: bytes, banned: bool) -> None:
        if banned:
            self._relays.pop(node, None)
            self._weights_from.pop(node, None)
            log.warning(
                "node %s banned: %s",
                node.hex()[:12],
                (self.ledger.node(node) or {}).get("ban_reason"),
            )

    def _log_samples(
        self, row: dict[str, Any], verdict: Verdict, submission: msg.Submission | None
    ) -> None:
        base = {
            "submission": row["id"],
            "node": row["node"].hex()[:12],
            "verdict": verdict.outcome,
            "reason": verdict.reason,
            "check": verdict.check,
            "trainer_step": self.step,
        }
        if verdict.outcome != "accept":
            self.run_log.sample(
                {**base, "version": submission.weight_version if submission else None}
            )
            return
        for g in verdict.groups:
            rewards = torch.tensor([g.rewards])
            adv = (
                group_advantages(
                    rewards, "none" if self.spec.algorithm.scale_rewards == "none" else "group"
                )[0][0]
                if len(g.rewards) > 1
                else torch.zeros(1)
            )
            example = self.task.train[g.prompt_index]
            for j, text in enumerate(g.completions):
                self.run_log.sample(
                    {
                        **base,
                        "version": g.weight_version,
                        "staleness": self.version - g.weight_version,
                        "prompt_index": g.prompt_index,
                        "prompt": example.prompt,
                        "completion": text,
                        "reward": g.rewards[j],
                        "rewards": {k: v[j] for k, v in g.per_func.items()},
                        "advantage": round(float(adv[j]), 4),
                    }
                )
