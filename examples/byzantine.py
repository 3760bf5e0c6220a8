"""Cheating nodes for the simulated swarm: the real node with one behaviour changed.

    python examples/byzantine.py KIND --pool ID --bootstrap MULTIADDR --key FILE --data-dir DIR

Each kind is a `node.behaviour.Behaviour` subclass run by the real `node.worker.Worker`, so the
coordinator is tested against exactly what a cheater could do with the shipped node. The cheat
code lives here, not in the `node` command. Kinds and the check meant to catch them:

    wrong-model    another model (weights re-initialised)        TOPLOC
    perturbed      weights with 1% relative noise                 logprobs / sampling / TOPLOC
    tamper-tokens  edits completions after proving                TOPLOC / sampling
    cherry-pick    best of several samples (other seeds)          seeded-sampling replay
    fabricate      random text, honestly prefilled for proofs     seeded-sampling replay
    truncate       stops early, claims the length cap             termination
    stale          generates with v0 forever, claims the current  TOPLOC / logprobs
    fake-logprobs  reports made-up logprobs                       logprobs
    replay         resends an earlier submission                  lease's min version / TOPLOC
    forge          signs requests with another key                transport (signer != peer)
    garbage        random and oversized frames to every protocol  transport (framing, decoding)
    flood          requests far above the rate limit              rate limiter (not a ban)

Cheats on the pool's economics rather than on a result (what admission should do to them):

    sybil              tampers; banned, pays for a fresh key      ban per key on probation,
                       and does it again                          new keys rate-capped
    lease-hoarder      takes leases, never answers                quota (1 on probation)
    seed-reroller      releases unlucky leases to be dealt again  released prompts go elsewhere;
                                                                  releases over allowance: faults
    validation-flooder max-size junk that passes cheap checks     ban at the first prefill
    intermittent       tampers one lease in four                  sliding-window ban
    lying-relay        advertises a relay listing versions it     relay verified before it is
                       does not hold                              handed out
    trickling-relay    advertises a relay serving a byte every    verification deadline;
                       few seconds                                clients' minimum rate

Cheats on multi-turn rollouts (a pool whose task has an environment); each is caught by the
validator's replay of the environment:

    fake-observation   plays its turns against a lying environment     environment replay
                       (feedback inverted), so every later turn is
                       honestly sampled and proven for the fake
    skip-turn          stops after the first turn where the            environment replay
                       environment would answer (saves generation)
    edit-tool-result   edits the environment's replies after proving   environment replay

The process writes what it did (requests sent, replies by code, the keys it used) as JSON to
`--stats`, which `examples/swarm.py` folds into its report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
import trio

import toploc
from node.behaviour import Behaviour, NodeContext
from node.engine import Engine, HFEngine
from node.multiturn import TurnEngine, generate_turns
from node.worker import NodeError, Worker, WorkerOptions
from protocol import messages as msg
from protocol.discovery import DISCOVERY_PROTOCOL
from protocol.envelope import seal
from protocol.environments import Environment
from protocol.errors import RemoteError, SwarmError
from protocol.framing import encode_frame, read_frame_or_eof
from protocol.host import ErrorCode, ErrorReply, _StreamReader, public_key_of_peer
from protocol.identity import Identity
from toploc.proof import P as TOPLOC_P

log = logging.getLogger("swarmrl.byzantine")


class Cheat(Behaviour):
    """A behaviour that keeps counts of what it did, for the swarm's report."""

    name = "cheat"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.facts: dict[str, Any] = {}
        """What the swarm's report needs beyond counts (a relay's URL, the most leases held)."""
        self.ctx: NodeContext | None = None
        self.started = time.time()

    identities = 1
    """How many keys the process may use, one after another: a new one after each refusal."""

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx


def _params(engine: Engine) -> list[torch.nn.Parameter]:
    return list(engine.model.parameters())  # type: ignore[attr-defined]


class WrongModel(Cheat):
    """Serves another model: the same architecture with freshly drawn weights."""

    name = "wrong-model"

    def on_load(self, engine: Engine, version: int) -> None:
        g = torch.Generator().manual_seed(12345)
        with torch.no_grad():
            for p in _params(engine):
                if p.dim() >= 2:  # matrices redrawn; norms kept, so the model still runs
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p) * 0.02)
        self.count("reloaded")


class Perturbed(Cheat):
    """The right model with 1% relative noise on every weight (a cheaper quantisation, say)."""

    name = "perturbed"

    def on_load(self, engine: Engine, version: int) -> None:
        g = torch.Generator().manual_seed(version)
        with torch.no_grad():
            for p in _params(engine):
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p)
                p.mul_(1 + 0.01 * noise)
        self.count("perturbed")


def _replace_completions(sub: msg.Submission, edit) -> msg.Submission:
    results = [
        msgspec.structs.replace(r, completions=[edit(c) for c in r.completions])
        for r in sub.results
    ]
    return msgspec.structs.replace(sub, results=results)


def tamper(submission: msg.Submission, lease: msg.Lease, vocab: int) -> msg.Submission:
    """The submission with the first token of every completion changed after proving."""
    eos = set(lease.sampling.eos_token_ids)

    def edit(c: msg.Completion) -> msg.Completion:
        tokens = list(c.tokens)
        new = tokens[0]
        # another ordinary token of the vocabulary (ids 0-3 are the specials), so the
        # cheap structure check passes and only the proofs and the replay can tell
        while new == tokens[0] or new in eos or new < 4:
            new = 4 + (new - 3) % (vocab - 4)
        tokens[0] = new
        return msgspec.structs.replace(c, tokens=tokens)

    return _replace_completions(submission, edit)


def _vocab(engine: Engine) -> int:
    return engine.model.config.vocab_size  # type: ignore[attr-defined]


class TamperTokens(Cheat):
    """Edits the first token of every completion after the proofs were built."""

    name = "tamper-tokens"

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        self.count("tampered")
        return [tamper(submission, lease, _vocab(self.ctx.engine))]  # type: ignore[union-attr]


class FakeLogprobs(Cheat):
    """Reports logprobs it did not compute (here: twice as confident as the truth)."""

    name = "fake-logprobs"

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        def edit(c: msg.Completion) -> msg.Completion:
            return msgspec.structs.replace(c, logprobs=[x / 2 for x in c.logprobs])

        self.count("faked")
        return [_replace_completions(submission, edit)]


class Truncate(Cheat):
    """Generates only half the allowed tokens (at least one), then ends each completion with
    an EOS it did not sample, so the work looks finished. Proofs and logprobs come from an
    honest prefill of that text, so only the sampler replay can tell."""

    name = "truncate"

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        cap = lease.sampling.max_new_tokens
        short = msgspec.structs.replace(
            lease, sampling=msgspec.structs.replace(lease.sampling, max_new_tokens=max(1, cap // 2))
        )
        eos = lease.sampling.eos_token_ids[0]
        texts = [[*c.tokens[:-1], eos] for r in engine.generate(short) for c in r.completions]
        self.count("truncated")
        return prove(engine, lease, texts, "stop")


class Stale(Cheat):
    """Keeps generating with the first weights it loaded and claims whatever it was told to
    use, so its work never costs it a download or a reload."""

    name = "stale"

    def __init__(self) -> None:
        super().__init__()
        self.first: dict[str, torch.Tensor] | None = None

    def on_load(self, engine: Engine, version: int) -> None:
        model = engine.model  # type: ignore[attr-defined]
        if self.first is None:
            self.first = {k: v.clone() for k, v in model.state_dict().items()}
            return
        model.load_state_dict(self.first)
        self.count("kept_old_weights")


class CherryPick(Cheat):
    """Samples each prompt several times with seeds of its own and submits, for every slot of
    the group, the best sample by a locally computed reward."""

    name = "cherry-pick"
    tries = 4

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        from trainer.rewards import score
        from trainer.tasks import make_task

        spec = self.ctx.spec  # type: ignore[union-attr]
        task = make_task(spec.task.name, spec.seed, dict(spec.task.options), spec.task.limit)
        tokenizer = _tokenizer(engine)
        candidates: list[list[msg.TaskResult]] = [engine.generate(lease)]
        for k in range(1, self.tries):
            other = msgspec.structs.replace(
                lease,
                tasks=[
                    msgspec.structs.replace(t, seed=(t.seed + 7919 * k) % 2**63)
                    for t in lease.tasks
                ],
            )
            candidates.append(engine.generate(other))
        out = []
        for t, task_spec in enumerate(lease.tasks):
            example = task.train[task_spec.prompt_index]
            pool = [c for cand in candidates for c in cand[t].completions]
            texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in pool]
            rewards, _ = score(
                task.rewards,
                [example.prompt] * len(pool),
                texts,
                {k: [v] * len(pool) for k, v in example.columns.items()},
            )
            ranked = sorted(range(len(pool)), key=lambda i: -rewards[i])
            out.append(
                msg.TaskResult(
                    task_index=t,
                    completions=[pool[i] for i in ranked[: task_spec.group_size]],
                )
            )
        self.count("picked")
        return out


def prove(
    engine: Engine, lease: msg.Lease, texts: list[list[int]], finish: str
) -> list[msg.TaskResult]:
    """Honest TOPLOC proofs and logprobs for completions the node did not sample: one prefill
    with the real weights over the given text (what TOPLOC alone cannot tell from honest work)."""
    import toploc
    from toploc import capture_hf

    model = engine.model  # type: ignore[attr-defined]
    prompts = [task.prompt_ids for task in lease.tasks for _ in range(task.group_size)]
    with torch.no_grad():
        pre = capture_hf.prefill(model, prompts, texts, pad_token_id=engine.pad_token_id)  # type: ignore[attr-defined]
    done = [
        msg.Completion(
            tokens=tokens,
            logprobs=toploc.token_logprobs(
                p.logits, torch.tensor(tokens), lease.sampling.temperature
            ).tolist(),
            finish_reason=finish,
            proofs=toploc.build_proofs(p.hidden),
        )
        for tokens, p in zip(texts, pre, strict=True)
    ]
    out, i = [], 0
    for t, task in enumerate(lease.tasks):
        out.append(msg.TaskResult(task_index=t, completions=done[i : i + task.group_size]))
        i += task.group_size
    return out


class Fabricate(Cheat):
    """Writes completions without sampling (random tokens of the full length), then proves
    them honestly (`prove`), so the TOPLOC proofs and the logprobs are genuine for that text."""

    name = "fabricate"

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        vocab = engine.model.config.vocab_size  # type: ignore[attr-defined]
        eos = set(lease.sampling.eos_token_ids)
        ok = [i for i in range(4, vocab) if i not in eos] or list(range(vocab))
        rng = random.Random(lease.lease_id)
        cap = lease.sampling.max_new_tokens
        texts = [
            [rng.choice(ok) for _ in range(cap)]
            for task in lease.tasks
            for _ in range(task.group_size)
        ]
        self.count("fabricated")
        return prove(engine, lease, texts, "length")


class Replay(Cheat):
    """Answers a new lease with the content of an earlier submission, and sends the earlier
    submission again for its (answered) lease."""

    name = "replay"

    def __init__(self) -> None:
        super().__init__()
        self.previous: msg.Submission | None = None

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        if self.previous is None:
            self.previous = submission
            return [submission]  # one honest answer first, to have something to replay
        old = self.previous
        self.count("replayed", 2)
        return [msgspec.structs.replace(old, lease_id=lease.lease_id), old]


# ---------------------------------------------------------------------- transport-level cheats


async def raw_request(ctx: NodeContext, protocol_id: str, frame: bytes) -> str:
    """Write `frame` as is on a new stream to the coordinator; return the refusal code, "ok"
    for an answer, or "closed" when the stream ended without one."""
    host = ctx.host  # the real libp2p host: cheaters are allowed to misuse it
    peer_id = await host.connect(ctx.coordinator_addrs()[0])
    stream = await host._open_stream(peer_id, protocol_id)
    try:
        with trio.fail_after(10):
            # the server may refuse and close before reading it all; its answer still counts
            with contextlib.suppress(Exception):
                await stream.write(frame)
            data = await read_frame_or_eof(_StreamReader(stream).receive, 1 << 20)
    except Exception as e:  # a reset stream is an answer too, for a cheater
        return f"closed ({type(e).__name__})"
    finally:
        with contextlib.suppress(Exception):
            await stream.reset()
    if data is None:
        return "closed"
    try:
        return host.verifier.open(data, ErrorReply, signer=public_key_of_peer(peer_id)).message.code
    except SwarmError:
        return "ok"


PROTOCOLS = [
    msg.JOIN_PROTOCOL,
    msg.LEASE_PROTOCOL,
    msg.SUBMIT_PROTOCOL,
    msg.HEARTBEAT_PROTOCOL,
    msg.RELEASE_PROTOCOL,
    DISCOVERY_PROTOCOL,
]


class Forge(Cheat):
    """Honest work, plus requests signed with another node's key sent on its own connection
    (e.g. a release of someone else's lease, or a heartbeat in another's name)."""

    name = "forge"
    every_s = 0.3  # faster than it earns credit with its honest work

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        victim = Identity.generate()  # the key whose name it signs in
        forged: list[tuple[str, msg.Message]] = [
            (msg.HEARTBEAT_PROTOCOL, msg.Heartbeat(weight_version=0)),
            (msg.RELEASE_PROTOCOL, msg.ReleaseLease(lease_id=1)),
            (msg.LEASE_PROTOCOL, msg.LeaseRequest(weight_version=0)),
        ]
        i = 0
        while True:
            await trio.sleep(self.every_s)
            protocol_id, message = forged[i % len(forged)]
            i += 1
            frame = encode_frame(seal(victim, ctx.pool_id, message))
            try:
                code = await raw_request(ctx, protocol_id, frame)
            except SwarmError as e:
                code = f"error ({type(e).__name__})"
            self.count(f"forged:{code}")


class Garbage(Cheat):
    """Honest work, plus random and oversized frames to every protocol the coordinator serves."""

    name = "garbage"
    every_s = 0.5

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        rng = random.Random(os.getpid())
        i = 0
        while True:
            await trio.sleep(self.every_s)
            # 6 protocols and 3 shapes: the first 6 frames cover every protocol and shape
            protocol_id = PROTOCOLS[i % len(PROTOCOLS)]
            shape = ("random", "oversized", "noise")[i % 3]
            i += 1
            if shape == "random":  # a well-formed frame of random bytes
                frame = encode_frame(rng.randbytes(rng.randint(1, 2048)))
            elif shape == "oversized":  # a header declaring ~2 GiB
                frame = (2**31 - 1).to_bytes(4, "big") + rng.randbytes(64)
            else:  # no framing at all
                frame = rng.randbytes(rng.randint(5, 512))
            try:
                code = await raw_request(ctx, protocol_id, frame)
            except SwarmError as e:
                code = f"error ({type(e).__name__})"
            self.count(f"{shape}:{code}")


class Flood(Cheat):
    """Honest work, plus bursts of valid requests far above the pool's rate limit. The remedy
    is the rate limiter, not a ban. It floods for `flood_s`, and on past that (to `max_flood_s`)
    until the limiter has refused it: in CI, with the coordinator SIGKILLed mid-flood, every
    request of a 30 s flood once timed out or met a dead connection before reaching the limiter,
    and the run could not say whether the limiter worked."""

    name = "flood"
    burst = 100
    every_s = 1.0
    flood_s = 30.0
    max_flood_s = 120.0

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        # Not while its own process loads the first weights: on a loaded 2-core machine that
        # left its requests unsent until they timed out, and they never met the limiter.
        while ctx.engine.version < 0:
            await trio.sleep(0.5)
        start = trio.current_time()
        while not self._flooded_enough(trio.current_time() - start):
            failed_before = self.counts.get("TransportError", 0)
            async with trio.open_nursery() as nursery:
                for _ in range(self.burst):
                    nursery.start_soon(self._one, ctx)
            if self.counts.get("TransportError", 0) - failed_before == self.burst:
                await self._reconnect(ctx)
            await trio.sleep(self.every_s)
        ctx.stop()

    async def _reconnect(self, ctx: NodeContext) -> None:
        """After a burst that met only transport errors, dial afresh, as a real flooder
        would: in CI a connection made as the coordinator came back from a SIGKILL stayed
        half-open on this side for a minute, every stream timing out unanswered, and the pool
        finished before the flood reached the limiter."""
        from shardcast.nat import peer_of

        for addr in ctx.coordinator_addrs():
            await ctx.host.disconnect(peer_of(addr))

    def _flooded_enough(self, elapsed: float) -> bool:
        limited = self.counts.get(ErrorCode.RATE_LIMITED, 0) > 0
        return elapsed >= self.max_flood_s or (elapsed >= self.flood_s and limited)

    async def _one(self, ctx: NodeContext) -> None:
        beat = msg.Heartbeat(weight_version=max(ctx.engine.version, 0))
        try:
            await ctx.call(msg.HEARTBEAT_PROTOCOL, beat, msg.HeartbeatReply, 10.0)
            self.count("served")
        except RemoteError as e:
            self.count(e.code)
        except SwarmError as e:
            self.count(type(e).__name__)


# ---------------------------------------------------------------------- open-pool economics
# Cheats that cost the coordinator time, leases or trust rather than forge a result. Each is
# meant to be caught (banned) or bounded (what it can take stays small) by admission.


class Sybil(Cheat):
    """Cheats (tampered tokens) under a key; once that key is banned, pays for a fresh one
    and cheats again. Admission should ban each key at its first proven cheat (probation) and
    cap how fast new keys get in."""

    name = "sybil"
    identities = 8

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        self.count("tampered")
        return [tamper(submission, lease, _vocab(self.ctx.engine))]  # type: ignore[union-attr]


class LeaseHoarder(Cheat):
    """Takes every lease it can get and never answers: should hold at most its quota (one
    lease on probation), which its expiries keep small, and never starve honest nodes."""

    name = "lease-hoarder"

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: list[float] = []
        self.facts["max_held"] = 0

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        now = time.time()
        self.deadlines = [d for d in self.deadlines if d > now] + [lease.deadline_ms / 1000]
        self.facts["max_held"] = max(self.facts["max_held"], len(self.deadlines))
        self.count("hoarded")
        return []  # no work done

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        return []  # never answered: the lease runs to its deadline


def lease_rewards(spec: Any, engine: Engine, lease: msg.Lease, results: list) -> list[float]:
    """Every sample's reward, scored locally with the pool's own reward functions."""
    from trainer.rewards import score
    from trainer.tasks import make_task

    task = make_task(spec.task.name, spec.seed, dict(spec.task.options), spec.task.limit)
    tokenizer = _tokenizer(engine)
    out: list[float] = []
    for r in results:
        example = task.train[lease.tasks[r.task_index].prompt_index]
        texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in r.completions]
        rewards, _ = score(
            task.rewards,
            [example.prompt] * len(texts),
            texts,
            {k: [v] * len(texts) for k, v in example.columns.items()},
        )
        out += rewards
    return out


class SeedReroller(Cheat):
    """Generates honestly, scores its own samples, and releases the lease unless they look
    lucky (better than its running mean), hoping to be dealt the prompt again with better
    seeds. Released prompts must not come back to it inside the pool's window, and releases
    beyond a small allowance count as soft faults."""

    name = "seed-reroller"

    def __init__(self) -> None:
        super().__init__()
        self.released: dict[int, float] = {}  # prompt index -> when it was given back
        self.seen: list[float] = []
        self.keep: set[int] = set()
        self.facts["prompts_back"] = 0

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        ctx = self.ctx
        assert ctx is not None
        now = time.time()
        window = ctx.spec.admission.window_s
        back = [t for t in lease.tasks if now - self.released.get(t.prompt_index, -1e18) < window]
        self.facts["prompts_back"] += len(back)
        results = engine.generate(lease)
        rewards = lease_rewards(ctx.spec, engine, lease, results)
        mean = sum(rewards) / len(rewards)
        lucky = not self.seen or mean > sum(self.seen) / len(self.seen)
        self.seen.append(mean)
        if lucky:
            self.keep.add(lease.lease_id)
            return results
        # from this worker thread into the node's event loop: give the lease back now
        try:
            code = trio.from_thread.run(ctx.release, lease.lease_id)
        except SwarmError as e:  # unanswered: the lease still closes at its deadline
            code = f"error ({type(e).__name__})"
        self.count(f"release:{code}")
        # Only a release the coordinator acknowledged bars the prompts from now; an unanswered
        # one leaves the lease open (its prompts may be dealt to us again while it is) until it
        # expires, when the coordinator bars them instead.
        if code == "released":
            for t in lease.tasks:
                self.released[t.prompt_index] = now
        return results

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        if lease.lease_id in self.keep:
            self.count("kept")
            return [submission]
        return []


def junk_proof(rng: random.Random) -> bytes:
    """A TOPLOC proof that decodes (modulus and coefficients in range) but proves nothing."""
    words = [rng.randint(1, TOPLOC_P)] + [rng.randrange(TOPLOC_P) for _ in range(toploc.TOPK)]
    return struct.pack(f">{len(words)}H", *words)


def junk_results(lease: msg.Lease, vocab: int, rng: random.Random) -> list[msg.TaskResult]:
    """An answer to `lease` that passes every cheap check at the largest size allowed: the
    full token budget of in-vocabulary tokens, finite negative logprobs, and one well-formed
    proof per chunk. Only a prefill can tell it is junk."""
    eos = set(lease.sampling.eos_token_ids)
    ok = [i for i in range(4, vocab) if i not in eos]
    n = lease.sampling.max_new_tokens
    chunks = -(-n // toploc.CHUNK_SIZE)

    def junk() -> msg.Completion:
        return msg.Completion(
            tokens=[rng.choice(ok) for _ in range(n)],
            logprobs=[-rng.uniform(0.05, 4.0) for _ in range(n)],
            finish_reason="length",
            proofs=[junk_proof(rng) for _ in range(chunks)],
        )

    return [
        msg.TaskResult(task_index=i, completions=[junk() for _ in range(t.group_size)])
        for i, t in enumerate(lease.tasks)
    ]


class ValidationFlooder(Cheat):
    """Answers every lease with `junk_results`, so each answer costs the coordinator the most
    validation it can; probation should ban it at the first."""

    name = "validation-flooder"

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        self.count("junk")
        return junk_results(lease, _vocab(engine), random.Random(lease.lease_id))


class Intermittent(Cheat):
    """Honest three leases in four; tampers with the fourth. Probation lets the first honest
    ones through, so the sliding window of its verdicts has to catch it."""

    name = "intermittent"
    every = 4

    def __init__(self) -> None:
        super().__init__()
        self.answered = 0

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        self.answered += 1
        if self.answered % self.every:
            self.count("honest")
            return [submission]
        self.count("tampered")
        return [tamper(submission, lease, _vocab(self.ctx.engine))]  # type: ignore[union-attr]


Handler = Callable[[str, trio.SocketStream], Awaitable[None]]


async def serve_http(handler: Handler, *, task_status: trio.TaskStatus[str]) -> None:
    """A minimal HTTP/1.1 server on 127.0.0.1, one request per connection: enough to pose
    as a SHARDCAST relay."""

    async def one(stream: trio.SocketStream) -> None:
        try:
            head = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in head and len(head) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            await handler(head.split(b" ", 2)[1].decode(errors="replace"), stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client gave up on us: what a bad relay is for
        except IndexError:
            pass  # not HTTP
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(f"http://127.0.0.1:{port}")
    await trio.serve_listeners(one, listeners)


async def respond(
    stream: trio.SocketStream, status: int, body: bytes, byte_every_s: float = 0.0
) -> None:
    """Send a whole response; with `byte_every_s`, the body one byte at a time."""
    head = (
        f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
        "content-type: application/octet-stream\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode())
    if not byte_every_s:
        await stream.send_all(body)
        return
    for i in range(len(body)):
        await stream.send_all(body[i : i + 1])
        await trio.sleep(byte_every_s)


class BadRelay(Cheat):
    """Honest work, plus a relay URL advertised at join that serves the weights badly (the
    subclasses say how). The coordinator should verify it before handing it to anyone, so
    it should never appear among the sources it gives out."""

    name = "bad-relay"
    recheck_s = 15.0

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        upstreams = (await ctx.rejoin("")).weights_urls  # where the real weights are
        self.upstreams = [u for u in upstreams if u]
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve_http, self.serve)
            self.facts["relay_url"] = url
            while True:
                reply = await ctx.rejoin(url)  # joining is idempotent: this advertises it
                self.count("advertised")
                if url in reply.weights_urls:
                    self.count("handed_out")
                await trio.sleep(self.recheck_s)

    async def serve(self, path: str, stream: trio.SocketStream) -> None:
        """Answer one HTTP request for `path`: what the relay lies with (each kind below
        overrides it; this base class is never run on its own)."""
        raise NotImplementedError


class LyingRelay(BadRelay):
    """Lists versions it does not hold (the current one and a thousand newer) and answers
    404 for every one of them."""

    name = "lying-relay"

    async def serve(self, path: str, stream: trio.SocketStream) -> None:
        self.count("http:" + path.split("?")[0].split("/")[1])
        if path.startswith("/versions") or path.startswith("/health"):
            current = self.ctx.stats.coordinator_version  # type: ignore[union-attr]
            claimed = [current, current + 1000]
            listing = {
                "latest": claimed[-1],
                "versions": [{"version": v, "base": None, "complete": True} for v in claimed],
            }
            await respond(stream, 200, json.dumps(listing).encode())
        else:
            await respond(stream, 404, b"not held here")


class TricklingRelay(BadRelay):
    """Serves the real weights (fetched from the real sources), but a byte every few seconds:
    the listing comes at once, so only a transfer deadline tells it from a good relay."""

    name = "trickling-relay"
    byte_every_s = 3.0

    async def serve(self, path: str, stream: trio.SocketStream) -> None:
        import httpx

        self.count("http:" + path.split("?")[0].split("/")[1])
        async with httpx.AsyncClient(timeout=30) as http:
            for upstream in self.upstreams:
                try:
                    r = await http.get(upstream + path)
                except httpx.HTTPError:
                    continue
                slow = 0.0 if path.startswith("/versions") else self.byte_every_s
                await respond(stream, r.status_code, r.content, slow)
                return
        await respond(stream, 503, b"no upstream")


class _OtherGame:
    """An environment that answers with another game's reply (the next seed's) where the real
    one would answer: plausible text, not what the environment said."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.limits = env.limits

    def reply(self, seed: int, prompt: str, turns: Sequence[str]) -> str | None:
        real = self.env.reply(seed, prompt, turns)
        if real is None:
            return None
        return self.env.reply(seed + 1, prompt, turns) or real


class _OneTurn:
    """An environment that ends every rollout after the model's first turn."""

    def __init__(self, env: Environment) -> None:
        self.limits = env.limits

    def reply(self, seed: int, prompt: str, turns: Sequence[str]) -> str | None:
        return None


class MultiTurnCheat(Cheat):
    """Plays against `stand_in(the pool's environment)` instead of the environment itself; on
    a single-turn pool it works honestly."""

    stand_in: Callable[[Environment], Environment]

    def generate(self, engine: Engine, lease: msg.Lease) -> list[msg.TaskResult]:
        if not isinstance(engine, TurnEngine):
            self.count("single-turn pool")
            return engine.generate(lease)
        self.count(self.name)
        fake = type(self).stand_in(engine.env)
        return generate_turns(engine.engine, fake, engine.tokenizer(), lease)


class FakeObservation(MultiTurnCheat):
    """Generates every turn after the first against made-up environment feedback (another
    game's), sampled and proven honestly for that fake context."""

    name = "fake-observation"
    stand_in = _OtherGame


class SkipTurn(MultiTurnCheat):
    """Stops each rollout after the model's first turn although the environment would answer
    it: less generation, a transcript that looks finished."""

    name = "skip-turn"
    stand_in = _OneTurn


def edit_replies(submission: msg.Submission, vocab: int) -> msg.Submission:
    """The submission with the first token of every environment reply changed (another
    ordinary token), the model's tokens, logprobs and proofs untouched."""

    def edit(c: msg.Completion) -> msg.Completion:
        tokens, start = list(c.tokens), 0
        for i, n in enumerate(c.segments):
            if i % 2:  # an environment reply
                tokens[start] = 4 + (tokens[start] - 3) % (vocab - 4)
            start += n
        return msgspec.structs.replace(c, tokens=tokens)

    return _replace_completions(submission, edit)


class EditToolResult(Cheat):
    """Plays honestly, then edits what the environment answered (a tool result that suits the
    node better) in the transcript it submits. A group in which the environment never answered
    (every first turn ended the game) has nothing to edit: it is not submitted, so everything
    this node gets accepted is an edited transcript."""

    name = "edit-tool-result"

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        edited = edit_replies(submission, _vocab(self.ctx.engine))  # type: ignore[union-attr]
        if edited == submission:
            self.count("nothing to edit")
            return []
        self.count("edited")
        return [edited]


KINDS: dict[str, type[Cheat]] = {
    c.name: c
    for c in (
        WrongModel,
        Perturbed,
        TamperTokens,
        CherryPick,
        Fabricate,
        Truncate,
        Stale,
        FakeLogprobs,
        Replay,
        Forge,
        Garbage,
        Flood,
        Sybil,
        LeaseHoarder,
        SeedReroller,
        ValidationFlooder,
        Intermittent,
        LyingRelay,
        TricklingRelay,
        FakeObservation,
        SkipTurn,
        EditToolResult,
    )
}


def _tokenizer(engine: Engine) -> Any:
    from transformers import AutoTokenizer

    cached = getattr(engine, "_cheat_tokenizer", None)
    if cached is None:
        folder = engine.model.name_or_path  # type: ignore[attr-defined]
        cached = AutoTokenizer.from_pretrained(folder)
        engine._cheat_tokenizer = cached  # type: ignore[attr-defined]
    return cached


@dataclass
class Run:
    """One cheating process: its behaviour and the workers it ran (one per key)."""

    cheat: Cheat
    workers: list[Worker] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    banned_keys: list[str] = field(default_factory=list)

    def record(self, outcome: str) -> dict[str, Any]:
        replies: Counter[str] = Counter()
        for w in self.workers:
            replies.update(w.stats.replies)
        return {
            "kind": self.cheat.name,
            "outcome": outcome,
            "counts": self.cheat.counts,
            "replies": dict(replies),
            "keys": self.keys,
            "refused_keys": self.banned_keys,
            **self.cheat.facts,
            "leases": sum(w.stats.leases for w in self.workers),
            "accepted": sum(w.stats.accepted for w in self.workers),
            "hard_rejected": sum(w.stats.hard_rejected for w in self.workers),
            "seconds": round(time.time() - self.cheat.started, 1),
            "states": [w.stats.state for w in self.workers],
        }


def _write_stats(path: Path | None, run: Run, outcome: str) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.record(outcome)))
    tmp.replace(path)


async def run_keys(args: argparse.Namespace, run: Run, engine: Engine) -> str:
    """Run the real worker under the key file's identity, then (for a cheat that may use
    several) under a fresh key after each refusal."""
    outcome = "stopped"
    for n in range(run.cheat.identities):
        identity = Identity.load_or_create(args.key)[0] if n == 0 else Identity.generate()
        worker = Worker(
            identity,
            args.pool,
            engine,
            # Loopback like the honest nodes: listening on 0.0.0.0, the dial-back check calls a
            # node private, and its seeder is then served through the coordinator's relay hop
            # (the NAT path has its own tests; here it made the coordinator relay cheaters'
            # weights to honest nodes, and every node lagged).
            WorkerOptions(
                bootstrap=args.bootstrap,
                data_dir=args.data_dir,
                listen=["/ip4/127.0.0.1/tcp/0"],
                backoff_max_s=5.0,
            ),
            behaviour=run.cheat,
        )
        run.workers.append(worker)
        run.keys.append(identity.public_key.hex())
        print(f"byzantine node ({args.kind}) {identity.peer_id()} joining", flush=True)
        try:
            await worker.run()
            return "stopped"
        except NodeError as e:  # banned or refused: what the swarm expects of a cheater
            outcome = f"refused: {e}"
            run.banned_keys.append(identity.public_key.hex())
            log.info("key %d refused: %s", n + 1, e)
    return outcome


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", choices=sorted(KINDS))
    p.add_argument("--pool", required=True, help="pool id")
    p.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR")
    p.add_argument("--key", type=Path, required=True, help="ed25519 key file (created if absent)")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--stats", type=Path, help="write what the cheat did here (JSON)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run = Run(KINDS[args.kind]())
    engine = HFEngine("cpu", None, args.max_batch)

    async def main_task() -> str:
        async with trio.open_nursery() as nursery:

            async def stats_every() -> None:
                while True:
                    _write_stats(args.stats, run, "running")
                    await trio.sleep(2.0)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stats_every)
            nursery.start_soon(stop_on_signal)
            outcome = await run_keys(args, run, engine)
            nursery.cancel_scope.cancel()
            return outcome

    outcome = trio.run(main_task) or "signalled"
    _write_stats(args.stats, run, outcome)
    print(f"byzantine node ({args.kind}) ends: {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
