"""The trainer as each rank runs it: the GRPO step, checkpoints, the weights to publish.

One process (rank 0, the coordinator) or N torch.distributed ranks (trainer.distributed) run
the same `Learner`; under FSDP2 each rank holds a shard of every weight and of the optimizer,
DCP writes and reads the shards, and the trainable weights are gathered once, on rank 0, when a
version is published: every weight, or with LoRA only the adapters (rank 0's publishing copy
holds the frozen base from the start), which it publishes as one process does.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from transformers import PreTrainedModel

from protocol.errors import SwarmError
from protocol.poolspec import PoolSpec
from toploc.models import load_model, resolve_dtype
from trainer.checkpoint import Checkpointer, CheckpointInfo, PendingCheckpoint
from trainer.config import TrainerConfig
from trainer.grpo import GRPOTrainer, StepResult, TrainGroup
from trainer.lora import add_adapters

# Frozen weights (a LoRA base) are in the pool's published base, not in checkpoints.
_STATE = StateDictOptions(ignore_frozen_params=True)
# Restoring sets the trainable weights only; the frozen base stays as loaded. (DCP has already
# filled every key of the live trainable state, or failed, so nothing trainable is skipped.)
_RESTORE = StateDictOptions(ignore_frozen_params=True, strict=False)
# Publishing gathers the trainable weights only: frozen ones (a LoRA base) never change, so
# rank 0's shell already holds them, and a LoRA version gathers just the adapters.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


class Learner:
    def __init__(
        self,
        trainer: GRPOTrainer,
        checkpointer: Checkpointer,
        tokenizer: Any,
        sharded: bool = False,
        shell: PreTrainedModel | None = None,
    ) -> None:
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.tokenizer = tokenizer
        self.rank = checkpointer.rank
        self.sharded = sharded
        self._shell = shell
        """Rank 0's unsharded copy that gathered weights are loaded into (FSDP2 only)."""
        self._pending: PendingCheckpoint | None = None

    def step(self, groups: list[TrainGroup], version: int) -> StepResult:
        return self.trainer.step(groups, version)

    def set_lr(self, lr: float) -> None:
        self.trainer.set_lr(lr)

    def start_checkpoint(self, step: int, version: int) -> None:
        """Stage the state and write it in the background (waits for the previous write
        first: one checkpoint in flight bounds the memory it holds)."""
        self.finish_checkpoint()
        self._pending = self.checkpointer.start(
            step, version, self._state(), self.trainer.scheduler
        )

    def writing(self) -> bool:
        """Whether a checkpoint's write is still going."""
        return self._pending is not None and not self._pending.future.done()

    def finish_checkpoint(self) -> int | None:
        """Wait for the write in flight, if any; the step it covers."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        self.checkpointer.finish(pending)
        return pending.step

    def restore(self, ckpt: CheckpointInfo) -> None:
        state = self._state()
        self.checkpointer.load(ckpt, state, self.trainer.scheduler)
        set_state_dict(
            self.trainer.model,
            self.trainer.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=_RESTORE,
        )

    def publishable(self) -> PreTrainedModel | None:
        """On rank 0, a model holding the current weights (gathered from every rank under
        FSDP2: a collective, so every rank calls it); None on the others."""
        if not self.sharded:
            return self.trainer.model
        trained = get_model_state_dict(self.trainer.model, options=_GATHER)
        if self._shell is None:
            return None
        _load_trained(self._shell, trained)
        return self._shell

    def _state(self) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(
            self.trainer.model, self.trainer.optimizer, options=_STATE
        )
        return {"model": model_state, "optim": optim_state}


def _load_trained(shell: torch.nn.Module, trained: dict[str, torch.Tensor]) -> None:
    """Copy gathered trainable weights into `shell`, which must take every one of them and
    have no trainable weight left out (else it would publish a stale one)."""
    result = shell.load_state_dict(trained, strict=False)
    trainable = {n for n, p in shell.named_parameters() if p.requires_grad}
    stale = sorted(trainable & set(result.missing_keys))
    if stale or result.unexpected_keys:
        raise SwarmError(
            f"the gathered weights do not match the publishing copy: missing {stale[:3]}, "
            f"unexpected {sorted(result.unexpected_keys)[:3]}"
        )


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """`auto`, `cpu` or `cuda`; a CUDA request on a machine without it is refused, naming
    `flag` (the option that asked for it)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
        raise SwarmError(
            f"{flag} cuda: CUDA is not available here ({why}); use {flag} cpu, or install "
            "a CUDA build of torch on a machine with a GPU"
        )
    return torch.device(name)


def build_learner(
    spec: PoolSpec,
    config: TrainerConfig,
    checkpoints: Path,
    rank: int = 0,
    world: int = 1,
    checkpoint_group: dist.ProcessGroup | None = None,
) -> Learner:
    """This rank's learner: the pool's model in fp32 master weights on the
    configured device, sharded with FSDP2 when there are several ranks."""
    from trainer.distributed import shard

    lora = config.trainer.lora
    device = resolve_device(config.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    model, tokenizer = load_model(spec.model.name, "float32", spec.model.init_seed)
    if lora.rank > 0:
        # Only the adapters train; versions after the base carry only them (trainer/policy.py).
        model = add_adapters(model, lora, spec.model.init_seed)
    shell = None
    if world > 1:
        if rank == 0:
            shell = copy.deepcopy(model).to(resolve_dtype(spec.model.dtype))
        model = shard(model, device)  # moved to the device block by block, as it shards
    else:
        model = model.to(device)
    settings = config.algorithm
    ref = None
    if settings.beta > 0:
        ref = load_model(spec.model.name, spec.model.dtype, spec.model.init_seed)[0].to(device)
    # On a GPU the forward and backward run in bf16 (fp32 master weights and optimizer state);
    # on a CPU in the pool's dtype, as the nodes do.
    compute = torch.bfloat16 if device.type == "cuda" else resolve_dtype(spec.model.dtype)
    trainer = GRPOTrainer(
        model,
        settings,
        spec.sampling.temperature,
        spec.sampling.max_new_tokens,
        compute_dtype=compute,
        pad_token_id=tokenizer.pad_token_id,
        ref_model=ref,
    )
    keep = config.trainer.checkpoint_keep
    checkpointer = Checkpointer(checkpoints, keep, rank, checkpoint_group)
    return Learner(trainer, checkpointer, tokenizer, world > 1, shell)
