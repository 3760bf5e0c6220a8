"""A LoRA pool end to end on the tiny model: the coordinator publishes the base once and then
adapter-only versions through SHARDCAST; a node fetches them and loads them with the same
weights the validators use, and what it generates passes validation."""

from pathlib import Path

import torch
import trio

from node.engine import HFEngine, offline_lease
from protocol import poolspec
from protocol.identity import Identity
from shardcast.client import Client
from shardcast.manifest import REQUIRES_FILE
from toploc.models import eos_token_ids
from toploc.versions import (
    ADAPTER_FILE,
    META_FILE,
)
from trainer.config import from_dict
from trainer.coordinator import Coordinator, RunOptions
from trainer.grpo import Sample, TrainGroup

RANK = 4


def lora_coordinator(tmp_path: Path, max_staleness: int = 2, full_every: int = 10) -> Coordinator:
    key = Identity.generate()
    spec = poolspec.from_dict(
        {
            "name": "lora",
            "coordinator": {"public_key": key.public_key.hex()},
            "model": {"name": "tiny", "dtype": "float32"},
            "task": {"name": "copy", "options": {"digits": 2}},
            "sampling": {"group_size": 4, "max_new_tokens": 8},
            "limits": {"max_staleness": max_staleness},
        }
    )
    config = from_dict(
        {
            "algorithm": {"lr": 1e-2, "micro_batch": 8, "full_every": full_every},
            "trainer": {"device": "cpu", "lora": {"rank": RANK, "target_modules": ["q_proj"]}},
        }
    )
    return Coordinator(spec, key, RunOptions(data_dir=tmp_path / "coord", max_steps=0), config)


def lease_for(coord: Coordinator, seed: int):
    tok = coord.tokenizer
    prompts = [
        tok(coord.task.render(coord.task.train[i], tok), add_special_tokens=False)["input_ids"]
        for i in range(2)
    ]
    eos = eos_token_ids(coord.training.learner.trainer.model, tok)
    return offline_lease(
        prompts, group_size=4, max_new_tokens=8, eos_token_ids=eos, first_seed=seed
    )


def train_groups(lease, results, version: int) -> list[TrainGroup]:
    """Groups with made-up rewards: the test is about what versions carry, not learning."""
    groups = []
    for task, result in zip(lease.tasks, results, strict=True):
        samples = [
            Sample(list(task.prompt_ids), c.tokens, c.logprobs, c.finish_reason == "length")
            for c in result.completions
        ]
        rewards = [1.0, 0.0, 1.0, 0.0]
        groups.append(TrainGroup(samples, rewards, [0.5, -0.5, 0.5, -0.5], version))
    return groups


def fetch(coord: Coordinator, versions: list[int | str], dest: Path, keep: int = 10) -> Client:
    """A node's SHARDCAST client that fetched `versions` from the coordinator's origin."""
    holder: list[Client] = []

    async def main():
        async with trio.open_nursery() as nursery:
            url = await nursery.start(coord.origin.serve)
            key = coord.identity.public_key
            client = Client([url], dest, public_key=key, pool_id=coord.pool_id, keep=keep)
            for v in versions:
                await client.fetch(v)
            await client.aclose()
            holder.append(client)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return holder[0]


def test_a_lora_pool_publishes_adapters_that_nodes_load_as_validators_do(tmp_path, validate):
    coord = lora_coordinator(tmp_path)
    try:
        trio.run(coord.training.ensure_published, 0)
        engine = HFEngine("cpu")
        engine.load(coord.policy.folder(0), 0)
        for version in (1, 2):
            lease = lease_for(coord, seed=10 * version)
            groups = train_groups(lease, engine.generate(lease), version - 1)
            coord.training.learner.step(groups, version)
            trio.run(coord.training.ensure_published, version)
    finally:
        coord.close()

    # Versions after the base carry the adapters (and their binding to the base) only.
    base_files = {p.name for p in coord.policy.folder(0).iterdir()}
    assert "model.safetensors" in base_files
    adapter_files = {p.name for p in coord.policy.folder(2).iterdir()}
    assert adapter_files == {ADAPTER_FILE, META_FILE, "adapter_config.json", REQUIRES_FILE}
    full_bytes = sum(p.stat().st_size for p in coord.policy.folder(0).iterdir())
    adapter_bytes = sum(p.stat().st_size for p in coord.policy.folder(2).iterdir())
    assert adapter_bytes < 0.1 * full_bytes

    # A node fetches the base and the newest adapter version through SHARDCAST.
    node_dir = tmp_path / "node"
    client = fetch(coord, [0, 2], node_dir)
    assert {0, 2} <= set(client.local_versions())  # v1 too when v2 is a delta on it
    engine = HFEngine("cpu")
    engine.load(client.path_of(0), 0)
    engine.load(client.path_of(2), 2)

    validator_model = coord.policy.model(2)
    node_state, validator_state = engine.model.state_dict(), validator_model.state_dict()
    assert node_state.keys() == validator_state.keys()
    assert all(torch.equal(node_state[k], validator_state[k]) for k in node_state)
    base_model = coord.policy.model(0)
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        node_logits = engine.model(ids).logits
        assert torch.equal(node_logits, validator_model(ids).logits)
        assert not torch.equal(node_logits, base_model(ids).logits)  # the adapters did train

    # What the node generates from the adapter version passes validation.
    lease = lease_for(coord, seed=99)
    results = engine.generate(lease)
    verdict = validate(validator_model, coord.tokenizer, coord.task, lease, results, 2)
    assert verdict.outcome == "accept", verdict.reason


def test_a_node_that_joins_after_keep_versions_still_loads_an_adapter_version(tmp_path):
    """The origin keeps max_staleness + 2 versions and the client fewer; the base must
    outlive both, or a node that joins late cannot load anything (`BaseMissingError`)."""
    coord = lora_coordinator(tmp_path, max_staleness=0, full_every=1)  # no delta chain
    try:
        for version in range(5):
            trio.run(coord.training.ensure_published, version)
    finally:
        coord.close()
    assert set(coord.origin.store.versions) == {0, 3, 4}

    client = fetch(coord, ["latest"], tmp_path / "node", keep=1)
    assert client.local_versions() == [0, 4]
    engine = HFEngine("cpu")
    engine.load(client.path_of(4), 4)
    ids = torch.tensor([[1, 5, 9, 13, 7]])
    with torch.no_grad():
        assert torch.equal(engine.model(ids).logits, coord.policy.model(4)(ids).logits)
