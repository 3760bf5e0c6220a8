"""Scale measurements: checkpoints off the critical path, FSDP2 against one process, bytes per
LoRA version against a full one, peak training memory.

    python bench/scale.py --quick --json bench/results/scale-quick.json    # CPU, a few minutes

Fields: fsdp_matches_single (2 gloo ranks vs one process, tiny model, 4 steps),
fsdp_max_diff, lora_version_bytes / full_version_bytes (SmolLM2-135M, rank 8, the pool dtype
bf16), checkpoint_blocking_s / step_s (SmolLM2-135M, full fine-tuning in fp32, 16 sequences of
~66 tokens, a checkpoint after every step: the time a step waits on checkpointing, and the
step), peak_rss_gib, validations_per_s (not measured yet: null).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import poolspec
from toploc.models import SMOLLM2, TINY, load_model
from trainer.algorithm import GroupAlgorithm
from trainer.config import LoraSection, from_dict
from trainer.grpo import Sample, TrainGroup
from trainer.learner import build_learner
from trainer.lora import add_adapters, save_adapters
from trainer.policy import PolicyStore

FSDP_STEPS = 4
FSDP_ATOL = 2e-5


def _spec(model: str, dtype: str) -> poolspec.PoolSpec:
    return poolspec.from_dict(
        {
            "name": "bench",
            "coordinator": {"public_key": "ab" * 32},
            "model": {"name": model, "dtype": dtype},
        }
    )


def _batch(step: int, prompts: int, group: int, length: int, vocab: int) -> list[TrainGroup]:
    g = torch.Generator().manual_seed(step)
    out = []
    for gid in range(prompts):
        rewards = [float(x) for x in torch.rand(group, generator=g)]
        samples = [
            Sample(
                [int(t) for t in torch.randint(4, vocab, (length // 2,), generator=g)],
                [int(t) for t in torch.randint(4, vocab, (length // 2 + i,), generator=g)],
                [-3.0] * (length // 2 + i),
                False,
            )
            for i in range(group)
        ]
        advantages = GroupAlgorithm("group").score(rewards).advantages
        out.append(TrainGroup(samples, rewards, advantages, 0, gid))
    return out


def checkpoint_cost(model: str, dtype: str, steps: int, device: str) -> dict[str, float]:
    """Steps with a checkpoint after each; blocking = staging + waiting for the previous write."""
    config = from_dict({"algorithm": {"lr": 1e-5, "micro_batch": 8}, "trainer": {"device": device}})
    with tempfile.TemporaryDirectory() as tmp:
        learner = build_learner(_spec(model, dtype), config, Path(tmp))
        vocab = learner.trainer.model.config.vocab_size
        blocking, step_s = [], []
        for n in range(1, steps + 1):
            t0 = time.perf_counter()
            learner.step(_batch(n, 4, 4, 64, vocab), n)
            step_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            learner.start_checkpoint(n, n)
            blocking.append(time.perf_counter() - t0)
        learner.finish_checkpoint()
    # The first step warms up allocators and kernels: leave it out of both.
    return {
        "checkpoint_blocking_s": sum(blocking[1:]) / (steps - 1),
        "step_s": sum(step_s[1:]) / (steps - 1),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def version_bytes(model: str, dtype: str, rank: int) -> dict[str, int]:
    """A full version (the HF folder nodes load) against a LoRA version (adapters only)."""
    base, tok = load_model(model, "float32")
    with tempfile.TemporaryDirectory() as tmp:
        full = PolicyStore(Path(tmp) / "full", dtype, 1, 0).export(base, tok, 1)
        full_bytes = sum(f.stat().st_size for f in full.iterdir())
        peft_model = add_adapters(base, LoraSection(rank=rank))
        lora_bytes = save_adapters(peft_model, Path(tmp) / "lora", torch.bfloat16)
    return {"full_version_bytes": full_bytes, "lora_version_bytes": lora_bytes}


def fsdp_matches_single(tmp: Path) -> tuple[bool, float]:
    """2 gloo ranks under torchrun against one process, same batches, tiny model."""
    config = from_dict({"algorithm": {"lr": 1e-3, "is_cap": 0, "micro_batch": 2}})
    single = build_learner(_spec(TINY, "float32"), config, tmp / "single")
    vocab = single.trainer.model.config.vocab_size
    for n in range(1, FSDP_STEPS + 1):
        single.step(_batch(n, 3, 3, 8, vocab), n)
    expected = single.publishable().state_dict()
    out = tmp / "ranks.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    subprocess.run([*cmd, __file__, "--rank-program", str(out)], env=env, check=True, timeout=300)
    got = load_file(out)
    diff = max(float((got[k] - v.float()).abs().max()) for k, v in expected.items())
    return diff <= FSDP_ATOL, diff


def _rank_program(out: Path) -> None:
    from trainer.distributed import RankGroup, follow, join_ranks

    config = from_dict({"algorithm": {"lr": 1e-3, "is_cap": 0, "micro_batch": 2}})
    ranks = join_ranks("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        learner = build_learner(
            _spec(TINY, "float32"), config, Path(tmp), ranks.rank, ranks.world, ranks.checkpoints
        )
        if ranks.rank != 0:
            follow(learner, ranks.control)
            return
        group = RankGroup(learner, ranks.control)
        vocab = learner.trainer.model.config.vocab_size
        for n in range(1, FSDP_STEPS + 1):
            group.step(_batch(n, 3, 3, 8, vocab), n)
        model = group.publishable()
        save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, out)
        group.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CPU run (a few minutes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rank-program", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_program:
        _rank_program(args.rank_program)
        return
    torch.manual_seed(0)
    results: dict[str, object] = {"device": args.device}
    with tempfile.TemporaryDirectory() as tmp:
        ok, diff = fsdp_matches_single(Path(tmp))
    results.update(fsdp_matches_single=ok, fsdp_max_diff=diff)
    results.update(version_bytes(SMOLLM2, "bfloat16", rank=8))
    # fp32 compute: bf16 autocast on a CPU without bf16 units (AMD EPYC here) is ~12x slower
    # than fp32, which would hide the checkpoint's share; the checkpoint is fp32 either way.
    results.update(checkpoint_cost(SMOLLM2, "float32", 3 if args.quick else 6, args.device))
    results["validations_per_s"] = None
    results["lora_fraction"] = results["lora_version_bytes"] / results["full_version_bytes"]
    for k, v in results.items():
        print(f"{k:24} {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
