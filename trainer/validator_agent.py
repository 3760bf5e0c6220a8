"""A validator on another machine: `coordinator validator URL --token-file F`.

It reads the pool spec from the coordinator's validator port and builds the coordinator's
`Validator` from it alone (task, rewards, tokenizer, sampling). It fetches the published
versions its batches claim over SHARDCAST into its own folder (signed manifests, every shard
hashed, as a node does), and loops: pull a batch from the coordinator's validator port
(trainer.validator_remote), fetch what it needs, validate, answer.

A version it cannot fetch in time gives the batch back rather than judging it: a missing
version would otherwise read as the node's fault. The coordinator must trust it (it holds the
validator token): its verdicts decide accepts and bans as the coordinator's own do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import torch
import trio

from protocol import messages as msg
from protocol.envelope import Envelope
from protocol.poolspec import PoolSpec, pool_id
from protocol.wire import decode
from shardcast.client import Client
from shardcast.errors import FetchError
from shardcast.fetcher import FetchPolicy
from toploc.models import eos_token_ids, load_model
from trainer.coordinator import pool_sampling, vocab_rows
from trainer.policy import PolicyStore
from trainer.tasks import pool_task
from trainer.validator import Backend, Checked, Validator
from trainer.validator_remote import MSGPACK, PULL_WAIT_S, Answer, Work

log = logging.getLogger("swarmrl.validator_agent")

RETRY_S = 2.0
"""Wait before asking again after the coordinator could not be reached or was busy."""
FETCH_DEADLINE_S = 120.0
"""Longest a batch waits for a version to arrive before it is given back."""


class FetchedVersions(PolicyStore):
    """A `PolicyStore` over a SHARDCAST client's folder (`v{N}`, not the coordinator's
    zero-padded names), read only: the client prunes."""

    def __init__(self, root: Path, dtype: str, cache_models: int, device: str) -> None:
        super().__init__(root, dtype, keep=0, cache_models=cache_models, device=device)

    def folder(self, version: int) -> Path:
        return self.root / f"v{version}"


@dataclass
class AgentOptions:
    url: str
    """The coordinator's validator port, e.g. http://10.0.0.1:8700."""
    token: str
    data_dir: Path
    name: str = "validator"
    sources: tuple[str, ...] = ()
    """SHARDCAST sources (origin, relays); none: the spec's origin and relays."""
    device: str = "cpu"
    backend: Backend = "hf"
    cache_models: int = 2


async def fetch_spec(url: str, token: str) -> PoolSpec:
    """The spec the coordinator at `url` runs; PermissionError for a refused token."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        r = await http.get("/validate/spec", headers={"authorization": f"Bearer {token}"})
    if r.status_code in (401, 403):
        raise PermissionError(f"the coordinator refused the validator token: {r.text[:200]}")
    r.raise_for_status()
    return msgspec.convert(msgspec.msgpack.decode(r.content), PoolSpec)


class ValidatorAgent:
    def __init__(self, spec: PoolSpec, options: AgentOptions) -> None:
        self.spec = spec
        self.options = options
        self.task = pool_task(spec)
        model, tokenizer = load_model(spec.model.name, spec.model.dtype, spec.model.init_seed)
        rows, eos = vocab_rows(model), eos_token_ids(model, tokenizer)
        del model  # only its shape and EOS ids were needed: versions load from the store
        weights = Path(options.data_dir) / "weights" / pool_id(spec)
        self.store = FetchedVersions(
            weights, spec.model.dtype, options.cache_models, options.device
        )
        self.sampling = pool_sampling(spec, eos)
        self.validator = Validator(
            spec,
            self.task,
            tokenizer,
            self.store.model,
            rows,
            tokenizer.pad_token_id,
            backend=options.backend,
        )
        sources = list(options.sources) or [spec.coordinator.origin, *spec.coordinator.relays]
        self.client = Client(
            [s for s in sources if s],
            weights,
            public_key=bytes.fromhex(spec.coordinator.public_key),
            pool_id=pool_id(spec),
            keep=spec.limits.max_staleness + 2,
            policy=FetchPolicy(deadline=FETCH_DEADLINE_S),
        )
        self.validated = 0

    async def run(self) -> None:
        """Pull, validate and answer until cancelled."""
        headers = {"authorization": f"Bearer {self.options.token}", "content-type": MSGPACK}
        timeout = httpx.Timeout(30.0, read=PULL_WAIT_S + 30.0)
        async with httpx.AsyncClient(
            base_url=self.options.url, headers=headers, timeout=timeout
        ) as http:
            try:
                while True:
                    work = await self._pull(http)
                    if work is not None:
                        await self._post(http, await self._answer(work))
            finally:
                await self.client.aclose()

    async def _pull(self, http: httpx.AsyncClient) -> Work | None:
        try:
            r = await http.post("/validate/pull", params={"name": self.options.name})
        except httpx.HTTPError as e:
            log.warning("coordinator not reached (%s); again in %.0f s", e, RETRY_S)
            await trio.sleep(RETRY_S)
            return None
        if r.status_code == 204:
            return None
        if r.status_code in (401, 403):
            raise PermissionError(f"the coordinator refused the validator token: {r.text[:200]}")
        if r.status_code != 200:
            log.warning("pull answered %d: %s", r.status_code, r.text[:200])
            await trio.sleep(RETRY_S)
            return None
        return msgspec.msgpack.decode(r.content, type=Work)

    async def _answer(self, work: Work) -> Answer:
        try:
            await self._fetch_claimed(work)
        except FetchError as e:
            return Answer(work.ticket, error=f"versions not fetched: {e}"[:1000])
        checked = await trio.to_thread.run_sync(self._validate, work)
        self.validated += len(checked)
        return Answer(work.ticket, checked)

    def _validate(self, work: Work) -> list[Checked]:
        with torch.no_grad():
            return self.validator.validate_jobs(work.jobs, self.sampling, work.current_version)

    async def _fetch_claimed(self, work: Work) -> None:
        """Every version the batch's submissions claim that validation can still use (older
        ones are judged stale without weights)."""
        oldest = self.spec.limits.oldest_trainable(work.current_version)
        self.client.trust_version(work.current_version)
        for version in sorted({_claimed(job.raw) for job in work.jobs}):
            if oldest <= version <= work.current_version and version not in self.store.versions():
                await self.client.fetch(version)

    async def _post(self, http: httpx.AsyncClient, answer: Answer) -> None:
        """Send an answer once. Lost or refused (the ticket expired meanwhile, or the
        coordinator restarted), the batch is back in the coordinator's queue either way."""
        try:
            r = await http.post("/validate/answer", content=msgspec.msgpack.encode(answer))
        except httpx.HTTPError as e:
            log.warning("answer to ticket %d not delivered: %s", answer.ticket, e)
            return
        if r.status_code != 200:
            log.warning(
                "answer to ticket %d refused (%d): %s", answer.ticket, r.status_code, r.text[:200]
            )


def _claimed(raw: bytes) -> int:
    """The weight version a signed submission claims (-1 when it does not decode: the
    validator's own checks reject it)."""
    try:
        envelope = decode(raw, Envelope, max_bytes=len(raw))
        return decode(envelope.body, msg.Submission).weight_version
    except Exception:  # any malformed input: validation says why, not this peek
        return -1
