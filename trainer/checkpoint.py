"""Trainer checkpoints with torch.distributed.checkpoint (DCP), written in the background.

`Checkpointer.start` stages the trainer's state to CPU memory (the only part that blocks a
step) and hands the write to DCP's async save; `finish` waits for it, then makes it visible: a
checkpoint is a folder `step-00000042/` written under `.step-00000042.tmp` and renamed into place
after every file is fsynced, so a crash leaves either the whole checkpoint or none of it. The
same code saves one process's state and a sharded FSDP2 state (each rank writes its shards; DCP
reshards on load).

The ledger commits a step only once a checkpoint covering it is on disk (trainer.training), so
on restart the newest checkpoint at or before the ledger's last step is the one to load; a newer
one (the process died between writing and committing) is an orphan and is deleted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from protocol.errors import SwarmError

PREFIX = "step-"
META = "meta.json"
HOST_STATE = "host.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    version: int
    extra: dict[str, Any]


@dataclass
class PendingCheckpoint:
    step: int
    version: int
    tmp: Path
    future: Future
    host: dict[str, Any]
    """Scheduler and RNG state at `start`, written by rank 0 beside the shards."""
    extra: dict[str, Any]


class Checkpointer:
    def __init__(
        self,
        root: Path,
        keep: int = 2,
        rank: int = 0,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.process_group = process_group
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        step: int,
        version: int,
        state: dict[str, Any],
        scheduler: Any,
        extra: dict[str, Any] | None = None,
    ) -> PendingCheckpoint:
        """Stage `state` (DCP state dicts) and start writing it; every rank calls this."""
        tmp = self.root / f".{PREFIX}{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crash at the same step
        self._barrier()
        future = dcp.async_save(
            state, checkpoint_id=tmp, process_group=self.process_group, no_dist=_alone()
        )
        host = {
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }
        return PendingCheckpoint(step, version, tmp, future, host, extra or {})

    def finish(self, pending: PendingCheckpoint) -> Path:
        """Wait for the write; rank 0 then renames it into place and prunes old ones."""
        pending.future.result()
        final = self.root / f"{PREFIX}{pending.step:08d}"
        if self.rank == 0:
            torch.save(pending.host, pending.tmp / HOST_STATE)
            meta = {"step": pending.step, "version": pending.version, "extra": pending.extra}
            (pending.tmp / META).write_text(json.dumps(meta))
            for f in pending.tmp.iterdir():
                _fsync(f)
            if final.exists():  # an orphan of the same step from before a crash
                shutil.rmtree(final)
            pending.tmp.rename(final)
            _fsync(self.root)
            for old in list_checkpoints(self.root)[: -self.keep]:
                shutil.rmtree(old.path, ignore_errors=True)
        return final

    def load(self, ckpt: CheckpointInfo, state: dict[str, Any], scheduler: Any) -> None:
        """Fill `state` (DCP state dicts of the live trainer) in place from `ckpt`."""
        dcp.load(state, checkpoint_id=ckpt.path, process_group=self.process_group, no_dist=_alone())
        host = torch.load(ckpt.path / HOST_STATE, weights_only=False)
        scheduler.load_state_dict(host["scheduler"])
        torch.set_rng_state(host["torch_rng"])
        random.setstate(host["python_rng"])

    def _barrier(self) -> None:
        # Rank 0 clears the temporary folder before any rank writes into it.
        if not _alone():
            dist.barrier(group=self.process_group)


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under `root`, oldest first."""
    found = []
    for path in sorted(Path(root).glob(f"{PREFIX}*")):
        try:
            meta = json.loads((path / META).read_text())
            found.append(
                CheckpointInfo(path, int(meta["step"]), int(meta["version"]), meta["extra"])
            )
        except (OSError, ValueError, KeyError):
            continue  # not a complete checkpoint
    return sorted(found, key=lambda c: c.step)


def latest_committed(root: Path, committed_step: int) -> CheckpointInfo | None:
    """The newest checkpoint at or before `committed_step`; newer (orphan) ones and unfinished
    temporary folders are deleted."""
    for tmp in Path(root).glob(f".{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
    best = None
    for ckpt in list_checkpoints(root):
        if ckpt.step > committed_step:
            shutil.rmtree(ckpt.path, ignore_errors=True)
        else:
            best = ckpt
    if committed_step > 0 and (best is None or best.step != committed_step):
        raise SwarmError(
            f"the ledger has committed step {committed_step} but the newest checkpoint under "
            f"{root} is {best.step if best else 'none'}: the data dir is inconsistent "
            "(were files deleted by hand?)"
        )
    return best


def _alone() -> bool:
    return not dist.is_initialized()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
