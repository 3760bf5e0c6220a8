"""Trainer checkpoints: model, optimizer, scheduler, RNG and position, written atomically.

A checkpoint is a folder `step-00000042/` made under a temporary name and renamed into place
after every file is fsynced, so a crash leaves either the whole checkpoint or none of it. On
restart the coordinator loads the newest checkpoint whose step the ledger has committed; a newer
one (the process died between saving and committing) is an orphan and is deleted, so no step is
counted twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from protocol.errors import SwarmError

PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    step: int
    version: int
    extra: dict[str, Any]


def save_checkpoint(
    root: Path,
    step: int,
    version: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    extra: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(_untie(state), tmp / "model.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            tmp / "trainer.pt",
        )
        (tmp / "meta.json").write_text(
            json.dumps({"step": step, "version": version, "extra": extra or {}})
        )
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # a leftover orphan of the same step: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints under `root`, oldest first."""
    found = []
    for path in sorted(Path(root).glob(f"{PREFIX}*")):
        try:
            meta = json.loads((path / "meta.json").read_text())
            found.append(
                CheckpointInfo(path, int(meta["step"]), int(meta["version"]), meta["extra"])
            )
        except (OSError, ValueError, KeyError):
            continue  # not a complete checkpoint
    return sorted(found, key=lambda c: c.step)


def latest_committed(root: Path, committed_step: int) -> CheckpointInfo | None:
    """The newest checkpoint at or before `committed_step`; newer (orphan) ones are deleted."""
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


def load_checkpoint(
    ckpt: CheckpointInfo, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> None:
    state = load_file(ckpt.path / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights are saved once; anything else missing means a different model.
    if unexpected or any(not _is_tied(model, k) for k in missing):
        raise SwarmError(
            f"checkpoint {ckpt.path} does not fit the model (missing {missing}, "
            f"unexpected {unexpected})"
        )
    blob = torch.load(ckpt.path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["torch_rng"])
    random.setstate(blob["python_rng"])


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep the first."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v
    return out


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or []
    return key in tied or key.endswith("lm_head.weight")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
