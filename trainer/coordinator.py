"""The coordinator of one pool: the place where its services are built and wired together.

    admission    who may join, quotas, validation order, bans     trainer/admission.py
    leases       issue, release, expiry                           trainer/leasing.py
    submissions  receive, queue by trust, validate, verdicts      trainer/submissions.py
    training     step, checkpoint, publish                        trainer/training.py
    relays       advertised weights sources, verified             trainer/relays.py
    view         what the API and dashboard may read              trainer/view.py

The services never reach into each other: what one needs of another is passed in here, as a
function. Everything runs in one trio event loop (the libp2p host's handlers, the SHARDCAST
origin, the HTTP API); validation and training run in worker threads. The ledger is the source
of truth: on start the coordinator resumes from the newest checkpoint the ledger committed,
re-queues submissions that were received but not decided, and re-publishes the current version
if the crash came before it was published.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocol import messages as msg
from protocol import poolspec
from protocol.discovery import PoolBook, refresh_record, serve_discovery
from protocol.envelope import Verified
from protocol.errors import SwarmError
from protocol.host import ErrorCode, Host, HostConfig, pool_topic
from protocol.identity import Identity, peer_id_of
from protocol.inflight import Share
from protocol.poolspec import PoolSpec
from shardcast.nat import HopLimits
from shardcast.origin import Origin
from shardcast.server import serve_app
from toploc.models import eos_token_ids
from toploc.sampling import SamplingParams
from trainer.admission import Admission
from trainer.algorithm import GroupAlgorithm
from trainer.config import TrainerConfig
from trainer.dashboard.generate import complete
from trainer.dashboard.series import ACCURACY_FUNCS
from trainer.evaluating import EvalService
from trainer.learner import build_learner, resolve_device
from trainer.leasing import LeaseService, in_flight_groups
from trainer.ledger import Ledger, LedgerError
from trainer.metrics import RunLog
from trainer.policy import PolicyStore
from trainer.pulse import Pulse
from trainer.refusals import RefusalTally, record_refusals_forever
from trainer.relays import (
    Checked,
    RelayDirectory,
    admitted_peer,
    check_relay,
    probe_client,
    relay_hop,
)
from trainer.sizing import check_fits
from trainer.submissions import SubmissionService
from trainer.tasks import Example, pool_task
from trainer.training import Trainer, TrainingService
from trainer.validator import Validator
from trainer.validator_pool import validator_pool
from trainer.view import Endpoints, PoolInfo, Progress, RelayStatus

if TYPE_CHECKING:  # the validators' port is built only when asked for (`_serve_validators`)
    from trainer.validator_remote import RemoteDesk

log = logging.getLogger("swarmrl.coordinator")

RELAY_PROBE_S = 10.0
"""Longest one check of an advertised relay may take (HTTP or stream source alike)."""


STRANGERS = Share("strangers", 32 << 20)


@dataclass
class RunOptions:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce: list[str] | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 0
    origin_port: int = 0
    operator_token: str | None = None
    validator_listen: tuple[str, int] | None = None
    """(host, port) where validators on other machines pull work; None: no remote ones."""
    validator_token: str | None = None
    wandb_project: str | None = None
    max_steps: int | None = None
    """Stop training after this many steps (the coordinator keeps serving)."""
    heartbeat_s: float = 10.0
    relay_recheck_s: float = 30.0


class Coordinator:
    def __init__(
        self,
        spec: PoolSpec,
        identity: Identity,
        options: RunOptions,
        config: TrainerConfig | None = None,
        learner: Trainer | None = None,
    ) -> None:
        """`learner`: rank 0's handle when the trainer runs as several ranks
        (trainer.distributed); by default a learner in this process."""
        if spec.coordinator.public_key != identity.public_key.hex():
            raise LedgerError(
                "the key given is not the coordinator key named in the pool spec "
                f"({spec.coordinator.public_key[:12]}...); use the key `coordinator init` made"
            )
        self.spec = spec
        self.config = config or TrainerConfig()
        if options.validator_listen is not None and not options.validator_token:
            raise SwarmError("validators on other machines need a token: --validator-token-file")
        if not self.config.trainer.local_validation and options.validator_listen is None:
            raise SwarmError(
                "local_validation = false leaves validation to remote validators: give "
                "--validator-listen HOST:PORT (and a token) too"
            )
        settings = self.config.algorithm
        self.identity = identity
        self.options = options
        self.pool_id = poolspec.pool_id(spec)
        data = Path(options.data_dir)
        # The task and the model load before the ledger is made: a spec that names a missing
        # model or dataset fails here and leaves nothing that blocks the next try.
        self.task = pool_task(spec)
        validator_device = resolve_device(
            self.config.trainer.validator_device, "--validator-device"
        )
        if learner is None:
            ranks = self.config.trainer.trainer_procs
            lora = self.config.trainer.lora.rank > 0
            check_fits(spec.model.name, self.config.trainer.device, ranks, lora)
            learner = build_learner(spec, self.config, data / "checkpoints")
        data.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(data / "ledger.sqlite")
        stored = self.ledger.get_meta("pool_id")
        if stored is not None and stored != self.pool_id:
            self.ledger.close()
            raise LedgerError(
                f"{data} holds pool {stored}, not {self.pool_id}: use another --data-dir"
            )
        self.ledger.set_meta("pool_id", self.pool_id)
        self.run_log = RunLog(data / "logs", options.wandb_project, spec.name)
        self.tokenizer = learner.tokenizer
        self.eos = tuple(eos_token_ids(learner.trainer.model, self.tokenizer))
        keep = spec.limits.max_staleness + 2
        self.policy = PolicyStore(
            data / "weights", spec.model.dtype, keep, keep, device=validator_device
        )
        self.origin = Origin(
            data / "shardcast",
            identity,
            self.pool_id,
            keep=keep,
            full_every=settings.full_every,
        )
        self.sampling = pool_sampling(spec, self.eos)
        self._prompt_ids: dict[int, list[int]] = {}
        self._host: Host | None = None
        self.refusals = RefusalTally()
        self.desk: RemoteDesk | None = None
        self.validator_url: str | None = None
        """Where validators on other machines pull work (`RunOptions.validator_listen`)."""
        self._probe_http: Any = None
        """The client relay checks use (`trainer.relays.probe_client`), while running."""
        self._hop: Any = None
        """The relay hop (`trainer.relays.relay_hop`), while running with one."""
        self.endpoints: Endpoints | None = None
        algorithm = GroupAlgorithm(settings.scale_rewards)

        # The services, each given only what it needs of the others.
        demand = Pulse()  # more work may be wanted: held lease requests look again
        self.admission = Admission(
            spec.admission,
            self.pool_id,
            self.ledger,
            lease_prompts=spec.limits.lease_prompts,
            in_flight_leases=in_flight_groups(spec, settings.batch_prompts)
            // spec.limits.lease_prompts,
        )
        self.training = TrainingService(
            spec,
            settings,
            self.ledger,
            learner,
            algorithm,
            self.policy,
            self.tokenizer,
            self.origin,
            self.run_log,
            data / "checkpoints",
            self._announce,
            options.max_steps,
            self.config.trainer.checkpoint_every,
            EvalService(
                self.task,
                self.tokenizer,
                self.policy,
                self.run_log,
                self.config.trainer.eval_every,
                self.config.trainer.eval_prompts,
                self.config.trainer.eval_k,
                self.sampling,
                spec.seed,
            ),
            on_progress=demand.fire,
        )
        progress = self.training.progress
        self.relays = RelayDirectory(list(spec.coordinator.relays), self._probe_relay)
        self.leases = LeaseService(
            spec,
            settings.batch_prompts,
            self.ledger,
            self.admission,
            len(self.task.train),
            self._prompt,
            _sampling_wire(self.sampling),
            progress,
            options.max_steps,
            full_reward=sum(r.weight for r in self.task.rewards),
            demand=demand,
        )
        validator = Validator(
            spec,
            self.task,
            self.tokenizer,
            self.policy.model,
            vocab_rows(learner.trainer.model),
            self.tokenizer.pad_token_id,
            backend=self.config.trainer.validator_backend,
        )
        self.submissions = SubmissionService(
            spec,
            self.ledger,
            self.admission,
            validator,
            algorithm,
            self.task,
            self.sampling,
            self.run_log,
            progress,
            on_verdict=partial(_verdict_recorded, self.training, demand),
            on_ban=self.relays.forget,
            pool=validator_pool(
                self.config.trainer.validators, validator, self.policy, self.sampling
            ),
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def training_done(self) -> trio.Event:
        return self.training.done

    async def run(
        self, *, task_status: trio.TaskStatus[Endpoints] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.training.restore()
        section = self.config.trainer
        config = HostConfig(
            requests_per_s=self.spec.limits.requests_per_s,
            connections_per_ip_s=section.connections_per_ip_s,
            connection_burst=section.connection_burst,
            connections_held_per_ip=section.connections_held_per_ip,
        )
        async with (
            Host.open(
                self.identity,
                self.pool_id,
                self.options.listen,
                config,
                announce=self.options.announce,
            ) as host,
            relay_hop(host.libp2p, self._hop_limits(), self.ledger.is_active) as hop,
            probe_client(hop, RELAY_PROBE_S) as self._probe_http,
            trio.open_nursery() as nursery,
        ):
            self._host, self._hop = host, hop
            host.on_refusal = self.on_refusal
            host.prefer(partial(admitted_peer, self.admission.is_trusted))
            self.run_log.watch_transport(host.stats)
            origin_url = await nursery.start(
                self.origin.serve, self.options.http_host, self.options.origin_port
            )
            await self.training.ensure_published(self.training.version)
            from trainer.api import create_api

            view = CoordinatorView(self)
            api = create_api(view, view, self.options.operator_token)
            api_url = await nursery.start(
                serve_app, api, self.options.http_host, self.options.http_port
            )
            book = PoolBook(self.pool_id)
            # Pool records expire: the coordinator keeps signing fresh ones.
            await nursery.start(partial(refresh_record, self.identity, self.spec, host, book))
            serve_discovery(host, book, share_of=self._stranger_share)
            self._serve(host)
            self.submissions.requeue_pending()
            self.leases.grant_outage_grace(time.time())
            if self.config.trainer.local_validation:
                nursery.start_soon(self.submissions.validate_forever)
            if self.options.validator_listen is not None:
                self.validator_url = await nursery.start(self._serve_validators)
            nursery.start_soon(self.training.train_forever)
            nursery.start_soon(self.leases.expire_forever)
            nursery.start_soon(record_refusals_forever, self.refusals, self.ledger)
            # Each round of relay checks re-signs the pool's peer list (shardcast/peerlist.py):
            # what swarm members, late joiners included, learn their first peers from.
            nursery.start_soon(
                self.relays.check_forever, lambda: self.training.version, self.origin.publish_peers
            )
            self.endpoints = Endpoints(self.pool_id, host.peer_id, host.addrs, api_url, origin_url)
            task_status.started(self.endpoints)

    async def _serve_validators(self, *, task_status: trio.TaskStatus[str]) -> None:
        """The port validators on other machines pull batches from (trainer.validator_remote)."""
        from trainer.validator_remote import RemoteDesk, create_validator_app

        section = self.config.trainer
        self.desk = RemoteDesk(
            self.submissions, section.remote_validators, section.remote_timeout_s
        )
        app = create_validator_app(self.desk, self.options.validator_token or "", self.spec)
        host, port = self.options.validator_listen
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.desk.expire_forever)
            task_status.started(await nursery.start(serve_app, app, host, port))

    def on_refusal(self, peer_id: str, code: str, detail: str) -> None:
        """The transport refused `peer_id` a request: rate refusals are tallied (what a flood
        cost us, per identity); a refusal that proves a fault costs the member (submissions)."""
        if code == ErrorCode.RATE_LIMITED:
            self.refusals.add(peer_id)
        self.submissions.on_refusal(peer_id, code, detail)

    def _serve(self, host: Host) -> None:
        member = self.ledger.is_active
        host.serve(
            msg.JOIN_PROTOCOL,
            self.on_join,
            msg.JoinRequest,
            msg.JoinReply,
            share_of=self._stranger_share,
        )
        host.serve(
            msg.LEASE_PROTOCOL,
            self.leases.on_lease,
            msg.LeaseRequest,
            msg.LeaseReply,
            allowed_signer=member,
        )
        # Only a node with work to hand in may send a (large) submission frame, and every node
        # on probation draws on one shared budget: bytes buffered are bounded by the leases
        # admission rations, not by how many keys joined.
        host.serve(
            msg.SUBMIT_PROTOCOL,
            self.submissions.on_submit,
            msg.Submission,
            msg.Receipt,
            allowed_signer=self._may_submit,
            share_of=self._submission_share,
            max_bytes=self.spec.limits.max_submission_bytes,
        )
        # Open to any key, as a join is: a node this ledger does not know is told so
        # (`not_joined`) and joins again, where a refusal unread left it deaf to the pool.
        host.serve(
            msg.HEARTBEAT_PROTOCOL,
            self.on_heartbeat,
            msg.Heartbeat,
            msg.HeartbeatReply,
            share_of=self._stranger_share,
        )
        host.serve(
            msg.RELEASE_PROTOCOL,
            self.leases.on_release,
            msg.ReleaseLease,
            msg.Receipt,
            allowed_signer=member,
        )

    def close(self) -> None:
        self.run_log.close()
        self.ledger.close()

    # ------------------------------------------------------------------ the small handlers

    async def on_join(self, v: Verified[msg.JoinRequest]) -> msg.JoinReply:
        req = v.message
        now = time.time()
        terms = self.admission.join_terms(v.signer, req.pow_nonce, now)
        if terms.code != "ok":
            return msg.JoinReply(
                accepted=False,
                code=terms.code,
                reason=terms.reason[:256],
                retry_after_s=terms.retry_after_s,
            )
        hardware = msgspec.to_builtins(req.hardware)
        if not self.ledger.join(v.signer, peer_id_of(v.signer), hardware, req.engine, now):
            return msg.JoinReply(accepted=False, code="banned", reason="banned")
        if req.fresh_start:
            self.leases.release_abandoned(v.signer, now)
        if req.relay_url:
            # a node gone since it sent the join is seen nowhere: "" names no address
            seen_at = (self._host.observed_ip(peer_id_of(v.signer)) or "") if self._host else None
            self.relays.advertise(v.signer, req.relay_url, seen_at)
        log.info("node %s joined (%s, %s)", v.signer.hex()[:12], req.engine, req.hardware.device)
        return msg.JoinReply(
            accepted=True,
            current_version=self.training.version,
            heartbeat_s=self.options.heartbeat_s,
            weights_urls=self.relays.weights_urls(self.origin.url),
        )

    async def on_heartbeat(self, v: Verified[msg.Heartbeat]) -> msg.HeartbeatReply:
        version = self.training.version
        node = self.ledger.node(v.signer)
        if node is None:
            return msg.HeartbeatReply(
                current_version=version, code="not_joined", reason="not joined; join first"
            )
        banned = node["banned_at"] is not None
        if not banned:
            self.ledger.heartbeat(v.signer, v.message.weight_version, time.time())
            self.relays.note_sources(v.signer, dict(v.message.weights_from))
        return msg.HeartbeatReply(
            current_version=version,
            accepted=node["accepted"],
            soft_rejected=node["soft_rejected"],
            hard_rejected=node["hard_rejected"],
            banned=banned,
            code="banned" if banned else "ok",
            reason=(node["ban_reason"] or "")[:256],
            relay_check=self.relays.check_of(v.signer, time.time()),
        )

    # ------------------------------------------------------------------ helpers

    def _may_submit(self, key: bytes) -> bool:
        """An active node holding an open lease, or one that answered lately (its retry after
        a lost receipt)."""
        since = time.time() - self.spec.limits.lease_timeout_s
        return self.ledger.is_active(key) and self.ledger.activity(key, since).has_work

    def _stranger_share(self, key: bytes) -> Share | None:
        """The budget keys that never joined send joins and discovery queries from: a flood
        of free keys' frames (a header alone reserves its length for `read_timeout_s`) holds
        at most this, never the bytes members' heartbeats and lease requests need."""
        return None if self.ledger.is_member(key) else STRANGERS

    def _submission_share(self, key: bytes) -> Share | None:
        """The budget every node on probation sends submissions from: what the probation
        leases can bring, one frame each. A key that answered a probation lease may resend for
        `lease_timeout_s`, so without it a few dozen fresh keys, each allowed the per-peer
        budget, held every byte the host may buffer and shut out even heartbeats."""
        if self.admission.is_trusted(key):
            return None
        frames = max(1, self.spec.admission.probation_leases)
        return Share("probation", frames * self.spec.limits.max_submission_bytes)

    async def _announce(self, version: int, base: int | None) -> None:
        if self._host is None:
            return
        announcement = msg.VersionAnnouncement(
            version=version, base=base, published_ms=int(time.time() * 1000)
        )
        try:
            await self._host.publish(pool_topic(self.pool_id, msg.VERSIONS_TOPIC), announcement)
        except Exception as e:  # gossip is best effort: nodes also learn versions by polling
            log.warning("could not announce v%d: %s", version, e)

    def _hop_limits(self) -> HopLimits | None:
        """The relay hop's limits, or None when the pool runs without one."""
        section = self.config.trainer
        if not section.relay_hop:
            return None
        return HopLimits(rate_bytes_s=section.relay_hop_mb_s * 1e6)

    async def _probe_relay(self, url: str, version: int) -> Checked:
        return await check_relay(
            url,
            version,
            public_key=self.identity.public_key,
            pool_id=self.pool_id,
            http=self._probe_http,
            hop=self._hop,
            timeout_s=RELAY_PROBE_S,
        )

    def _prompt(self, index: int) -> list[int]:
        if index not in self._prompt_ids:
            text = self.task.render(self.task.train[index], self.tokenizer)
            self._prompt_ids[index] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._prompt_ids[index]


class CoordinatorView:
    """The `trainer.view.PoolView` (and `Operator`) the API gets: reads, and a ban."""

    def __init__(self, coord: Coordinator) -> None:
        spec = coord.spec
        rewards = getattr(coord.task, "rewards", [])
        self.info = PoolInfo(
            pool_id=coord.pool_id,
            name=spec.name,
            model=spec.model.name,
            dtype=spec.model.dtype,
            task=spec.task.name,
            algorithm=coord.config.algorithm.loss_type,
            max_staleness=spec.limits.max_staleness,
            temperature=spec.sampling.temperature,
            top_k=spec.sampling.top_k,
            top_p=spec.sampling.top_p,
            has_accuracy=any(getattr(r, "name", "") in ACCURACY_FUNCS for r in rewards),
        )
        self.ledger = coord.ledger
        self.samples_path = coord.run_log.folder / "samples.jsonl"
        self._coord = coord

    def progress(self) -> Progress:
        return self._coord.training.progress()

    def endpoints(self) -> Endpoints | None:
        return self._coord.endpoints

    def weights_urls(self) -> list[str]:
        return self._coord.relays.weights_urls(self._coord.origin.url)

    def relays(self) -> list[RelayStatus]:
        return self._coord.relays.statuses()

    def weights_sources(self, node: bytes) -> dict[str, int]:
        return self._coord.relays.sources(node)

    def origin_listing(self) -> tuple[str | None, list[int]]:
        origin = self._coord.origin
        return origin.url, sorted(origin.store.versions)

    def served(self, clients: bool) -> dict[str, Any] | None:
        return self._coord.origin.app.state.served.snapshot(clients=clients)

    def prometheus(self) -> str:
        return self._coord.run_log.prometheus()

    def complete(
        self, prompt: str, max_tokens: int, sample: bool, template: bool
    ) -> dict[str, Any] | None:
        c = self._coord
        latest = c.policy.latest_model()
        if latest is None:
            return None
        version, model = latest

        def render(text: str) -> str:
            return c.task.render(Example(text, {}), c.tokenizer)

        return complete(
            model,
            c.tokenizer,
            version,
            prompt,
            max_tokens=max_tokens,
            sample=sample,
            render=render if template else None,
            temperature=self.info.temperature,
            top_k=self.info.top_k,
            top_p=self.info.top_p,
            eos_token_ids=c.eos,
        ).to_json()

    def ban(self, key: bytes, reason: str) -> list[int]:
        revoked = self._coord.ledger.ban(key, reason, None, time.time())
        self._coord.relays.forget(key)
        self._coord.leases.give_back(revoked)
        return revoked


def _verdict_recorded(training: TrainingService, demand: Pulse) -> None:
    """A verdict brings trainable groups (the trainer looks) or fewer coming (so may leases)."""
    training.wake()
    demand.fire()


def vocab_rows(model: Any) -> int:
    """Token ids a node may sample: every row of the output layer, and of the input
    embeddings, which take each sampled token back in. Real models pad both past the
    tokenizer (Qwen2.5: 151,936 rows for 151,665 tokens), and the seeded sampler draws over all
    of them, so bounding by the tokenizer would hard-reject honest nodes; bounding by it where
    it is the longer (tokens added, embeddings not resized) let one id past the embeddings
    make the prefill raise instead of giving a verdict."""
    rows = (model.get_input_embeddings(), model.get_output_embeddings())
    return min(int(m.weight.shape[0]) for m in rows)


def pool_sampling(spec: PoolSpec, eos: Sequence[int]) -> SamplingParams:
    """The sampling every node uses and every validator replays: the spec's, with the model's
    end-of-sequence ids."""
    return SamplingParams(
        temperature=spec.sampling.temperature,
        top_k=spec.sampling.top_k,
        top_p=spec.sampling.top_p,
        max_tokens=spec.sampling.max_new_tokens,
        eos_token_ids=tuple(eos),
    )


def _sampling_wire(p: SamplingParams) -> msg.SamplingWire:
    return msg.SamplingWire(
        temperature=p.temperature,
        top_k=p.top_k,
        top_p=p.top_p,
        max_new_tokens=p.max_tokens,
        eos_token_ids=list(p.eos_token_ids),
    )
