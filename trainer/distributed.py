"""Several trainer ranks under torch.distributed, with FSDP2.

`coordinator run --trainer-procs N` re-executes itself under torchrun (torch.distributed.run,
standalone, no restarts): every rank loads the model and shards it with `fully_shard` (each
transformer block, then the whole model). Rank 0 is the coordinator: it keeps every network
service and sends each learner call (the step with its batch, checkpoints, restores, gathering
weights to publish) to the other ranks over a gloo group before running it itself; the others
only `follow`. When any rank dies, torchrun stops the others and exits non-zero; a restart
resumes from the last checkpoint the ledger committed.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from protocol.errors import SwarmError
from trainer.checkpoint import CheckpointInfo
from trainer.grpo import StepResult, TrainGroup
from trainer.learner import Learner

# Rank 0 may wait long for validated work between steps; the followers wait in a broadcast
# meanwhile, and a dead peer is caught by torchrun, not by this timeout.
_IDLE = timedelta(days=30)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    control: dist.ProcessGroup
    """Rank 0's calls to the others (gloo, also next to NCCL)."""
    checkpoints: dist.ProcessGroup
    """DCP's background writes: their own group, so they never interleave with training's."""


def join_ranks(device_type: str) -> Ranks:
    """Join the torchrun job this process was started in."""
    _die_with_parent()
    # DCP's async save needs a CPU backend even when training runs on NCCL.
    dist.init_process_group("cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo")
    control = dist.new_group(backend="gloo", timeout=_IDLE)
    checkpoints = dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), control, checkpoints)


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 on `device`: each transformer block is its own unit (gathered only while it
    computes), then the rest (embeddings, final norm, head) as the root. `fully_shard` moves
    each unit to the mesh's device as it shards it, so a model loaded on the CPU reaches a GPU
    one block at a time and no GPU ever holds it whole (a model that fits only sharded can
    start); the mesh is explicit because FSDP2's default takes CUDA whenever it is present,
    even for a trainer asked to run on the CPU.

    A LoRA (peft) model is sharded the same way, frozen base and adapters alike: the frozen
    base is nearly all of its memory, so sharding it is what lets a model too large for one
    device train adapters on several; FSDP2 reduce-scatters gradients of the adapters only (the
    base has none) and the optimizer holds their shards. Replicating the base on every rank
    (DDP-style, reducing only adapter gradients) would be simpler but needs the whole base on
    each device, and a second code path beside full training's."""
    blocks = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if not blocks:
        raise SwarmError(
            f"{type(model).__name__} has no *DecoderLayer blocks to shard: use --trainer-procs 1"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


class RankGroup:
    """Rank 0's learner: the same calls as `Learner`, each mirrored on every rank."""

    def __init__(self, learner: Learner, control: dist.ProcessGroup) -> None:
        self.learner = learner
        self.trainer = learner.trainer
        self.tokenizer = learner.tokenizer
        self.control = control

    def step(self, groups: list[TrainGroup], version: int) -> StepResult:
        return self._call("step", groups, version)

    def set_lr(self, lr: float) -> None:
        self._call("set_lr", lr)

    def start_checkpoint(self, step: int, version: int) -> None:
        self._call("start_checkpoint", step, version)

    def finish_checkpoint(self) -> int | None:
        # Local: the other ranks wait for their own writes before their next checkpoint.
        return self.learner.finish_checkpoint()

    def restore(self, ckpt: CheckpointInfo) -> None:
        self._call("restore", ckpt)

    def publishable(self) -> Any:
        return self._call("publishable")

    def stop(self) -> None:
        dist.broadcast_object_list(["stop", ()], src=0, group=self.control)

    def _call(self, name: str, *args: Any) -> Any:
        dist.broadcast_object_list([name, args], src=0, group=self.control)
        return getattr(self.learner, name)(*args)


def follow(learner: Learner, control: dist.ProcessGroup) -> None:
    """A rank > 0: run rank 0's calls until it says stop."""
    while True:
        box: list[Any] = [None, None]
        dist.broadcast_object_list(box, src=0, group=control)
        name, args = box
        if name == "stop":
            learner.finish_checkpoint()
            return
        getattr(learner, name)(*args)


def leave_ranks() -> None:
    """Tear down this rank's process groups before the interpreter exits. Left to exit, a
    gloo group's C++ threads were still running while the runtime was torn down, and about
    half the runs of two CPU ranks ended in `terminate called without an active exception`
    (SIGABRT) after all their work was done."""
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_argv(procs: int, argv: list[str]) -> list[str]:
    """This command again, as `procs` ranks under torchrun (which stops all when one dies)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "--max-restarts=0",
        "-m",
        "trainer",
        *argv,
    ]


def _die_with_parent() -> None:
    """A rank whose torchrun agent is killed (SIGKILL skips its clean-up) dies with it rather
    than wait forever in a collective."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
