"""The coordinator's own training settings: not part of the pool spec, not part of the pool id.

Nodes must agree with the coordinator on the model, the task, sampling, verification, limits
and admission (the hashed pool spec). How the coordinator optimises (the loss, the learning
rate, batch sizes, the publishing cadence) is its own business, so it lives here: in the
`[algorithm]` table of the pool file (which `coordinator init` writes), overridden by any
`--config FILE` given to `coordinator run`, then by `--set algorithm.KEY=VALUE`. Changing one
and restarting keeps the pool id, the data dir and the ledger; the optimizer resumes from its
checkpoint with the new values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from protocol.config import apply_overrides
from protocol.errors import PoolSpecError
from protocol.poolspec import UNHASHED_TABLES, Count, Positive, Section, read_tables


class AlgorithmSection(Section):
    loss_type: Literal["dapo", "grpo", "dr_grpo", "gspo"] = "dapo"
    """Normalisation: dapo (token-level over the batch), grpo (per sequence), dr_grpo
    (by the length cap), gspo (sequence-level ratio)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Divide advantages by the group std, the batch std, or not at all (Dr. GRPO)."""
    epsilon_low: float = 0.2
    """Lower clip of the ratio (1 - epsilon_low)."""
    epsilon_high: float = 0.28
    """Upper clip of the ratio (1 + epsilon_high; DAPO clip-higher)."""
    delta: float = 4.0
    """Upper cap of the ratio for negative advantages (two-sided clipping)."""
    beta: float = 0.0
    """KL coefficient to the frozen reference; 0 turns the reference off."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    is_cap: float = 4.0
    """behaviour: the trust band: tokens whose ratio pi_theta / pi_behaviour leaves
    [1/is_cap, is_cap] are masked out of the loss (stale or mismatched samples); 0 disables."""
    off_policy: Literal["behaviour", "decoupled"] = "behaviour"
    """How samples from older weights are corrected: behaviour (the ratio is taken against the
    node's logprobs, with the is_cap band) or decoupled (the ratio against the trainer's own
    policy at the step's start, times the truncated weight pi_prox / pi_behaviour)."""
    tis_cap: float = 2.0
    """decoupled: truncation of the weight pi_prox / pi_behaviour; 0 leaves it untruncated."""
    icepop_low: float = 0.5
    """decoupled: tokens whose pi_prox / pi_behaviour is below this are masked; 0 disables."""
    icepop_high: float = 5.0
    """decoupled: tokens whose pi_prox / pi_behaviour is above this are masked; 0 disables."""
    mask_truncated: bool = False
    """Leave completions cut by the length cap out of the loss (DAPO)."""
    lr: Positive = 1e-5
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip; 0 turns it off."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    """The learning rate after the warm-up: constant, or decaying (linearly, or along a half
    cosine) to `min_lr_ratio` x lr at step `decay_steps`, and held there (TRL's
    `lr_scheduler_type`; trainer.schedule)."""
    decay_steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    """The optimizer step at which a decay reaches its floor (warm-up included): a run's planned
    length. Needed, and past the warm-up, when `lr_decay` is not constant."""
    min_lr_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    """The floor of a decay, as a share of lr."""
    batch_prompts: Count = 8
    """B: validated groups (prompts) per optimizer step."""
    micro_batch: Count = 8
    """Sequences per forward/backward pass (gradient accumulation)."""
    publish_every: Count = 1
    """Publish new weights every N optimizer steps."""
    full_every: Count = 10
    """Publish a full checkpoint every N versions; deltas in between."""

    def __post_init__(self) -> None:
        if self.lr_decay != "constant" and self.decay_steps <= self.warmup_steps:
            raise ValueError(
                f"algorithm.lr_decay = {self.lr_decay!r} needs algorithm.decay_steps (the step "
                f"at which the decay ends) past algorithm.warmup_steps ({self.warmup_steps}), "
                f"not {self.decay_steps}"
            )


class LoraSection(Section):
    rank: int = 0
    """LoRA rank r; 0 trains every weight (no adapters)."""
    alpha: float = 16.0
    """LoRA alpha: adapters are scaled by alpha / rank."""
    target_modules: list[str] = msgspec.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Names of the linear layers that get adapters (peft's target_modules)."""


class TrainerSection(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the trainer computes: auto picks CUDA when this machine has it."""
    trainer_procs: Count = 1
    """Trainer ranks (torch.distributed, FSDP2): one process per rank."""
    checkpoint_every: Annotated[int, msgspec.Meta(ge=0)] = 1
    """Write a checkpoint (asynchronously) every N steps; steps after it are committed to the
    ledger only once it is on disk, so a crash re-queues their groups. 0: as often as keeps
    checkpoints within 10% of the steps' time (trainer/checkpoint_pace.py; for GPUs, where a
    step is far shorter than writing its checkpoint)."""
    checkpoint_keep: Count = 2
    """Checkpoints kept on disk."""
    validator_device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where validators (and in-run evaluation) load published versions and prefill: auto
    picks CUDA when this machine has it. Every validator worker holds its own copies there."""
    validator_backend: Literal["hf", "vllm"] = "hf"
    """What validators prefill with: hf (transformers) or vllm (vLLM's prefill, the logits from
    the version's own LM head: toploc/prefill_vllm.py; needs vLLM installed)."""
    validators: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    """Validator worker processes (trainer.validator_pool); 0 or 1 validates in a thread of the
    coordinator."""
    remote_validators: Annotated[int, msgspec.Meta(ge=1, le=256)] = 8
    """Batches handed to validators on other machines at once (`coordinator run
    --validator-listen`; trainer.validator_remote): one per remote validator that works."""
    remote_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 180.0
    """A batch a remote validator has not answered in this long goes back in the queue (it
    may have died holding it); the time covers fetching a version it lacks."""
    local_validation: bool = True
    """Validate here too (a thread, or `validators` processes); false leaves every batch to
    remote validators (`--validator-listen` then required)."""
    eval_every: Annotated[int, msgspec.Meta(ge=0)] = 0
    """Evaluate every N published versions, in a worker thread, on the held-out split:
    greedy accuracy, pass@1 and pass@k into the run log; 0 turns it off."""
    eval_prompts: Count = 32
    """Held-out prompts per in-run evaluation (the first N, the same ones every time)."""
    eval_k: Count = 4
    """Samples per prompt for the in-run pass@k (1: greedy accuracy only)."""
    lora: LoraSection = LoraSection()
    relay_hop: bool = True
    """Run a circuit-relay hop on the coordinator's libp2p host, for admitted nodes only, so
    nodes behind NAT re-serve weights to the pool (bounded by `shardcast.nat.HopLimits`;
    its cost is in docs/security.md, "NAT traversal"). `--set trainer.relay_hop=false`."""
    relay_hop_mb_s: Annotated[float, msgspec.Meta(ge=0)] = 4.0
    """Megabytes per second the hop forwards, all circuits together (0: no cap). Each
    relayed byte is re-encrypted in the coordinator's process, so this bounds the CPU
    relaying can take from validation and training (docs/security.md, "NAT traversal")."""
    connections_per_ip_s: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """New libp2p connections a second from one address (an IPv6 /64 as one), in bursts of
    `connection_burst`; past them closed before the Noise handshake (`HostConfig`). A pool
    whose nodes share an address (carrier-grade NAT, a campus) raises both."""
    connection_burst: Annotated[float, msgspec.Meta(ge=1)] = 32.0
    connections_held_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 32
    """libp2p connections one address may hold open at once (`HostConfig`); such a pool
    raises this too."""


class TrainerConfig(Section):
    algorithm: AlgorithmSection = AlgorithmSection()
    trainer: TrainerSection = TrainerSection()


def from_dict(data: dict[str, Any]) -> TrainerConfig:
    try:
        return msgspec.convert(data, TrainerConfig)
    except msgspec.ValidationError as e:
        raise PoolSpecError(f"invalid trainer config: {e}") from None


def unhashed_part(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tree.items() if k in UNHASHED_TABLES}


def load(pool_file: Path, files: list[Path] = (), overrides: list[str] = ()) -> TrainerConfig:
    """The pool file's unhashed tables, then each of `files` on top, then `overrides`."""
    tree = unhashed_part(read_tables(pool_file))
    for f in files:
        tree = _merge(tree, read_tables(f))
    return from_dict(apply_overrides(tree, list(overrides)))


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
