"""FSDP2 across real gloo ranks (torchrun): the same weights as one process (every weight, or
LoRA adapters on a frozen base with the adapter versions rank 0 publishes), and a resume after a
rank is SIGKILLed. Run as a script, this file is the rank program torchrun starts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from protocol import poolspec
from shardcast.manifest import REQUIRES_FILE
from toploc.versions import ADAPTER_FILE, META_FILE
from trainer.algorithm import GroupAlgorithm
from trainer.checkpoint import latest_committed
from trainer.config import from_dict
from trainer.grpo import Sample, TrainGroup
from trainer.learner import build_learner
from trainer.policy import PolicyStore

STEPS = 4
CHECKPOINT_AT = 2
# fp32 on both sides; only the order of gradient sums differs (a reduce-scatter over 2 ranks
# against one backward), amplified a little by Adam over the steps.
ATOL = 2e-5
WEIGHTS = "weights.safetensors"


def _spec() -> poolspec.PoolSpec:
    return poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})


def _config(device: str = "cpu", lora_rank: int = 0):
    return from_dict(
        {
            "algorithm": {"lr": 1e-3, "is_cap": 0, "micro_batch": 2},
            "trainer": {"device": device, "lora": {"rank": lora_rank}},
        }
    )


def _batch(step: int) -> list[TrainGroup]:
    """Deterministic groups, 9 samples of uneven lengths: one rank gets fewer (and makes a
    weightless pass to stay in step)."""
    g = torch.Generator().manual_seed(step)
    groups = []
    for gid in range(3):
        n = 3
        rewards = [float(x) for x in torch.rand(n, generator=g)]
        samples = [
            Sample(
                [4, 5 + gid, 6],
                [int(t) for t in torch.randint(4, 40, (3 + i,), generator=g)],
                [-3.0] * (3 + i),
                False,
            )
            for i in range(n)
        ]
        groups.append(
            TrainGroup(samples, rewards, GroupAlgorithm("group").score(rewards).advantages, 0, gid)
        )
    return groups


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}


def _publish(model: torch.nn.Module, tokenizer, out: Path, version: int = STEPS) -> None:
    """What the tests compare: every weight, and for LoRA the base and adapter versions the
    policy store writes (as `coordinator run` publishes them)."""
    out.mkdir(parents=True)
    save_file(_weights(model), out / WEIGHTS)
    if isinstance(model, PeftModel):
        store = PolicyStore(out / "versions", "float32", keep=2, cache_models=0)
        store.export(model, tokenizer, 0)
        store.export(model, tokenizer, version)


def _rank_program(a: argparse.Namespace) -> None:
    """Train `a.steps` steps on torchrun's ranks and publish; rank 0 also writes each step's
    time to `step_times.json` (docs/scale.md's 1 vs 2 ranks figures)."""
    from trainer.distributed import RankGroup, follow, join_ranks, leave_ranks

    ranks = join_ranks(a.device)
    config = _config(a.device, a.lora_rank)
    learner = build_learner(
        _spec(), config, a.checkpoints, ranks.rank, ranks.world, ranks.checkpoints
    )
    die_at = a.die_at
    if ranks.rank != 0:
        if die_at is not None:
            step = learner.step

            def step_or_die(groups: list[TrainGroup], version: int):
                if version == die_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return step(groups, version)

            learner.step = step_or_die
        follow(learner, ranks.control)
        leave_ranks()
        return
    group = RankGroup(learner, ranks.control)
    first = 1
    if a.resume:
        ckpt = latest_committed(a.checkpoints, CHECKPOINT_AT)
        group.restore(ckpt)
        first = ckpt.step + 1
    times = []
    for step in range(first, a.steps + 1):
        times.append(group.step(_batch(step), step).metrics["step_time_s"])
        if step == CHECKPOINT_AT:
            group.start_checkpoint(step, step)
            group.finish_checkpoint()
    _publish(group.publishable(), group.tokenizer, a.out, a.steps)
    (a.out / "step_times.json").write_text(json.dumps(times))
    group.stop()
    leave_ranks()


def _torchrun(tmp: Path, *args: str, procs: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        "--max-restarts=0",
        __file__,
        "--out",
        str(tmp / "ranks"),
        "--checkpoints",
        str(tmp / "ckpt"),
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=170)


def _single(tmp: Path, device: str = "cpu", lora_rank: int = 0) -> Path:
    """One process's run of the same steps, published to `tmp/single`."""
    learner = build_learner(_spec(), _config(device, lora_rank), tmp / "single-ckpt")
    for step in range(1, STEPS + 1):
        learner.step(_batch(step), step)
    _publish(learner.publishable(), learner.tokenizer, tmp / "single")
    return tmp / "single"


def _ranks_match(tmp: Path, single: Path, lora_rank: int = 0, atol: float = ATOL) -> None:
    """The ranks published (`tmp/ranks`) what one process did (`single`)."""
    _assert_close(load_file(tmp / "ranks" / WEIGHTS), load_file(single / WEIGHTS), atol)
    if lora_rank > 0:
        _adapter_version_matches(tmp, single, atol)


def _assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = ATOL
) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].cpu() - b[k].cpu()).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst}"


def _adapter_version_matches(tmp: Path, single: Path, atol: float = ATOL) -> None:
    """Rank 0 published the adapter version one process does: the same files, the adapters
    within `atol`, the same base binding and SHARDCAST requirement byte for byte."""
    name = f"v{STEPS:08d}"
    mine, theirs = tmp / "ranks" / "versions" / name, single / "versions" / name
    files = sorted(p.name for p in theirs.iterdir())
    assert {ADAPTER_FILE, META_FILE, REQUIRES_FILE} <= set(files)
    assert sorted(p.name for p in mine.iterdir()) == files
    _assert_close(load_file(mine / ADAPTER_FILE), load_file(theirs / ADAPTER_FILE), atol)
    for f in set(files) - {ADAPTER_FILE}:
        assert (mine / f).read_bytes() == (theirs / f).read_bytes(), f


def _ranks_match_one_process_and_resume(tmp: Path, lora_rank: int = 0) -> None:
    single = _single(tmp, lora_rank=lora_rank)
    lora = ("--lora-rank", str(lora_rank))
    run = _torchrun(tmp, *lora)
    assert run.returncode == 0, run.stderr[-3000:]
    _ranks_match(tmp, single, lora_rank)
    expected = load_file(single / WEIGHTS)
    start = _weights(build_learner(_spec(), _config("cpu", lora_rank), tmp / "x").trainer.model)
    moved = max(float((expected[k] - v).abs().max()) for k, v in start.items())
    assert moved > 100 * ATOL, "the steps must change the weights"

    shutil.rmtree(tmp / "ranks")
    shutil.rmtree(tmp / "ckpt")
    # Rank 1 is SIGKILLed during step 3: torchrun stops rank 0 too, and nothing is published.
    died = _torchrun(tmp, "--die-at", "3", *lora)
    assert died.returncode != 0 and not (tmp / "ranks").exists()
    # The restart loads step 2's checkpoint and trains steps 3 and 4 again.
    resumed = _torchrun(tmp, "--resume", *lora)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _ranks_match(tmp, single, lora_rank)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_gloo_ranks_publish_what_one_process_does_and_resume_after_sigkill(tmp_path):
    _ranks_match_one_process_and_resume(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_gloo_lora_ranks_publish_the_adapter_version_one_process_does_and_resume(tmp_path):
    _ranks_match_one_process_and_resume(tmp_path, lora_rank=4)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoints", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    _rank_program(parser.parse_args())
