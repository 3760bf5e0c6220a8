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

The process writes what it did (requests sent, refusals by code) as JSON to `--stats`, which
`examples/swarm.py` folds into its report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import torch
import trio

from node.behaviour import Behaviour, NodeContext
from node.engine import Engine, HFEngine
from node.worker import NodeError, Worker, WorkerOptions
from protocol import messages as msg
from protocol.discovery import DISCOVERY_PROTOCOL
from protocol.envelope import seal
from protocol.errors import RemoteError, SwarmError
from protocol.framing import encode_frame, read_frame_or_eof
from protocol.host import ErrorReply, _StreamReader, public_key_of_peer
from protocol.identity import Identity

log = logging.getLogger("swarmrl.byzantine")


class Cheat(Behaviour):
    """A behaviour that keeps counts of what it did, for the swarm's report."""

    name = "cheat"

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.ctx: NodeContext | None = None
        self.started = time.time()

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


class TamperTokens(Cheat):
    """Edits the first token of every completion after the proofs were built."""

    name = "tamper-tokens"

    def submissions(self, submission: msg.Submission, lease: msg.Lease) -> list[msg.Submission]:
        eos = set(lease.sampling.eos_token_ids)
        vocab = self.ctx.engine.model.config.vocab_size  # type: ignore[union-attr]

        def edit(c: msg.Completion) -> msg.Completion:
            tokens = list(c.tokens)
            new = tokens[0]
            # another ordinary token of the vocabulary (ids 0-3 are the specials), so the
            # cheap structure check passes and only the proofs and the replay can tell
            while new == tokens[0] or new in eos or new < 4:
                new = 4 + (new - 3) % (vocab - 4)
            tokens[0] = new
            return msgspec.structs.replace(c, tokens=tokens)

        self.count("tampered")
        return [_replace_completions(submission, edit)]


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
    is the rate limiter, not a ban; after `flood_s` it stops and leaves."""

    name = "flood"
    burst = 100
    every_s = 1.0
    flood_s = 30.0

    async def alongside(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        end = trio.current_time() + self.flood_s
        while trio.current_time() < end:
            async with trio.open_nursery() as nursery:
                for _ in range(self.burst):
                    nursery.start_soon(self._one, ctx)
            await trio.sleep(self.every_s)
        ctx.stop()

    async def _one(self, ctx: NodeContext) -> None:
        beat = msg.Heartbeat(weight_version=max(ctx.engine.version, 0))
        try:
            await ctx.call(msg.HEARTBEAT_PROTOCOL, beat, msg.HeartbeatReply, 10.0)
            self.count("served")
        except RemoteError as e:
            self.count(e.code)
        except SwarmError as e:
            self.count(type(e).__name__)


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


def _write_stats(path: Path | None, cheat: Cheat, worker: Worker, outcome: str) -> None:
    if path is None:
        return
    record = {
        "kind": cheat.name,
        "outcome": outcome,
        "counts": cheat.counts,
        "leases": worker.stats.leases,
        "accepted": worker.stats.accepted,
        "hard_rejected": worker.stats.hard_rejected,
        "seconds": round(time.time() - cheat.started, 1),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


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
    identity, _ = Identity.load_or_create(args.key)
    cheat = KINDS[args.kind]()
    worker = Worker(
        identity,
        args.pool,
        HFEngine("cpu", None, args.max_batch),
        WorkerOptions(bootstrap=args.bootstrap, data_dir=args.data_dir, backoff_max_s=5.0),
        behaviour=cheat,
    )
    print(f"byzantine node ({args.kind}) {identity.peer_id()} joining pool {args.pool}", flush=True)

    async def run() -> str:
        async with trio.open_nursery() as nursery:

            async def stats_every() -> None:
                while True:
                    _write_stats(args.stats, cheat, worker, "running")
                    await trio.sleep(2.0)

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stats_every)
            nursery.start_soon(stop_on_signal)
            try:
                await worker.run()
                outcome = "stopped"
            except NodeError as e:  # banned or refused: what the swarm expects of a cheater
                outcome = f"refused: {e}"
            nursery.cancel_scope.cancel()
            return outcome

    outcome = trio.run(run) or "signalled"
    _write_stats(args.stats, cheat, worker, outcome)
    print(f"byzantine node ({args.kind}) ends: {outcome}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
