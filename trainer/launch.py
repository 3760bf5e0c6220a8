"""How `coordinator run` starts its trainer: in this process, or as torchrun ranks.

The run flags `--device`, `--validator-device` and `--trainer-procs` are the `[trainer]`
table's settings given on the command line. With more than one trainer process the
command re-executes itself under torchrun; there rank 0 goes on to run the coordinator and the
other ranks follow its calls until it stops.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only by the commands that train, not by the parser
    from protocol.poolspec import PoolSpec
    from trainer.config import TrainerConfig
    from trainer.training import Trainer

FLAGS = ("device", "validator_device", "trainer_procs")


def add_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        help="trainer device (default: the config's [trainer] device, auto = CUDA if present)",
    )
    run.add_argument(
        "--validator-device",
        choices=["auto", "cpu", "cuda"],
        help="where validators prefill (default: the config's [trainer] validator_device)",
    )
    run.add_argument(
        "--trainer-procs",
        type=int,
        metavar="N",
        help="trainer ranks: N processes under torchrun, sharded with FSDP2",
    )


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The flags given, as `--set trainer.KEY=VALUE` overrides (they win over config files)."""
    out = []
    for key in FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            out.append(f"trainer.{key}={value}")
    return out


def start_trainer(spec: PoolSpec, config: TrainerConfig, data_dir: Path) -> Trainer | None:
    """This process's trainer handle for the coordinator, or None on a rank > 0 once rank 0
    has stopped. Re-executes under torchrun (does not return) when several ranks are asked for
    and this is not one of them yet."""
    from trainer.distributed import RankGroup, follow, join_ranks, leave_ranks, torchrun_argv
    from trainer.learner import build_learner, resolve_device
    from trainer.sizing import check_fits

    section = config.trainer
    device = resolve_device(section.device)  # refuse a wrong --device before any loading
    resolve_device(section.validator_device, "--validator-device")
    checkpoints = Path(data_dir) / "checkpoints"
    ranked = "LOCAL_RANK" in os.environ
    if not ranked:  # once, before any rank loads weights (the ranks were checked before start)
        check_fits(spec.model.name, section.device, section.trainer_procs, section.lora.rank > 0)
    if section.trainer_procs == 1:
        return build_learner(spec, config, checkpoints)
    if not ranked:
        sys.stdout.flush()
        os.execv(sys.executable, torchrun_argv(section.trainer_procs, sys.argv[1:]))
    ranks = join_ranks(device.type)
    learner = build_learner(spec, config, checkpoints, ranks.rank, ranks.world, ranks.checkpoints)
    if ranks.rank == 0:
        return RankGroup(learner, ranks.control)
    follow(learner, ranks.control)
    leave_ranks()
    return None


def stop_trainer(trainer: Trainer) -> None:
    """Release the other ranks (they exit once rank 0's last checkpoint is written)."""
    from trainer.distributed import RankGroup, leave_ranks
    from trainer.learner import Learner

    if isinstance(trainer, RankGroup):
        trainer.stop()
        leave_ranks()
    elif isinstance(trainer, Learner):
        trainer.finish_checkpoint()
