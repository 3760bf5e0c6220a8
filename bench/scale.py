"""Scale measurements: checkpoints off the critical path, FSDP2 against one process, bytes per
LoRA version against a full one, peak training memory, validation throughput.

    python bench/scale.py --quick --json bench/results/scale-quick.json    # CPU, a few minutes
    python bench/scale.py --quick --only validation --json bench/results/scale-validation-quick.json
    python bench/scale.py --only lora --json bench/results/scale-lora.json    # ~15 s
    python bench/scale.py --device cuda --only validation --only checkpoint --model FOLDER

Fields: fsdp_matches_single (2 gloo ranks vs one process, tiny model, 4 steps),
fsdp_max_diff, lora_version_bytes / full_version_bytes and lora_fraction (SmolLM2-135M, rank 8
on q/k/v/o, the pool dtype bf16: the SHARDCAST payload of each version as published),
checkpoint_blocking_s / step_s (--model, default SmolLM2-135M, full fine-tuning with fp32
weights and Adam, 16 sequences of ~66 tokens, a checkpoint after every step: the time a step
waits on checkpointing, and the step; checkpoint_staging_s and checkpoint_waiting_s split the
first, checkpoint_last_write_s is one write), peak_rss_gib, peak_gpu_gib on CUDA and sizing_gib
(trainer.sizing's estimate); with --auto-steps N, N more steps paced by checkpoint_every = 0:
the steps checkpointed after (auto_checkpoints), each one's blocking, and the share of the
steps' time checkpoints blocked, overall and per interval between checkpoints;
validations_per_s {"1": in-process, "2": 2 worker processes} (submissions/s, 16 submissions
of 8 rollouts of up to 32 tokens, batches of --validation-batch (4), fp32 on the CPU and bf16
on CUDA; --model, else the tiny model with --quick and SmolLM2-135M without),
with validation_serial_per_s (one submission per prefill),
generation_s_per_rollout (the hf engine, batched), validation_s_per_rollout and
generation_to_validation (how many rollouts one validator checks in the time one is
generated).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import msgspec
import torch
import trio
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine import HFEngine, offline_lease, sampling_params
from protocol import messages as msg
from protocol import poolspec
from protocol.envelope import seal
from protocol.identity import Identity
from shardcast.origin import Origin
from toploc.models import SMOLLM2, TINY, eos_token_ids, load_model
from trainer.algorithm import GroupAlgorithm
from trainer.checkpoint_pace import CheckpointPace
from trainer.config import LoraSection, from_dict
from trainer.grpo import Sample, TrainGroup
from trainer.learner import Learner, build_learner
from trainer.lora import add_adapters
from trainer.policy import PolicyStore
from trainer.sizing import training_bytes
from trainer.tasks import make_task
from trainer.validator import Job, Validator
from trainer.validator_pool import ValidatorPool, worker_setup

FSDP_STEPS = 4
FSDP_ATOL = 2e-5
SUBMISSIONS, GROUP, NEW_TOKENS, REPEATS = 16, 8, 32, 5


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


def _sync(device: str) -> None:
    """Wait for queued CUDA kernels, so a clock read after it counts them."""
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(run: Callable[[], object], device: str) -> float:
    """Seconds `run` took, its CUDA kernels included."""
    t0 = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - t0


def _warm_mean(xs: list[float]) -> float:
    """The mean without the first: it warms up allocators and kernels."""
    return sum(xs[1:]) / (len(xs) - 1)


def checkpoint_cost(
    model: str, dtype: str, steps: int, device: str, auto_steps: int = 0
) -> dict[str, object]:
    """Steps with a checkpoint after each (blocking = staging + waiting for the previous
    write), then `auto_steps` more paced automatically (`auto_pace`)."""
    config = from_dict({"algorithm": {"lr": 1e-5, "micro_batch": 8}, "trainer": {"device": device}})
    with tempfile.TemporaryDirectory() as tmp:
        learner = build_learner(_spec(model, dtype), config, Path(tmp))
        vocab = learner.trainer.model.config.vocab_size
        params = sum(p.numel() for p in learner.trainer.model.parameters())
        waiting, staging, step_s = [], [], []
        for n in range(1, steps + 1):
            step_s.append(_timed(lambda n=n: learner.step(_batch(n, 4, 4, 64, vocab), n), device))
            waiting.append(_timed(learner.finish_checkpoint, device))  # the previous write
            staging.append(_timed(lambda n=n: learner.start_checkpoint(n, n), device))
        last_write_s = _timed(learner.finish_checkpoint, device)
        auto = auto_pace(learner, vocab, auto_steps, device) if auto_steps else {}
    out = {
        "checkpoint_model": model,
        "checkpoint_params": params,
        # What a step waits with a checkpoint after every step: staging the state, plus the
        # previous write where it is still going (with checkpoint_every k, only staging
        # remains once k steps outlast a write).
        "checkpoint_blocking_s": _warm_mean(waiting) + _warm_mean(staging),
        "checkpoint_staging_s": _warm_mean(staging),
        "checkpoint_waiting_s": _warm_mean(waiting),
        "checkpoint_last_write_s": last_write_s,
        "step_s": _warm_mean(step_s),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        # What trainer.sizing reckons a step holds (weights, gradients, Adam; no activations).
        "sizing_gib": training_bytes(params, device, 1) / 2**30,
        **auto,
    }
    if device == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def auto_pace(learner: Learner, vocab: int, steps: int, device: str) -> dict[str, object]:
    """`steps` steps with checkpoints paced as `checkpoint_every = 0` paces them (the first
    after the first step): how many were taken, what each blocked, and what share of the time
    they blocked, over the whole run and over the intervals between checkpoints (what the
    pace bounds; the first checkpoint, its buffers allocated, blocks longer)."""
    pace = CheckpointPace(0)
    step_s: list[float] = []
    blocks: list[tuple[int, float]] = []  # (after step, seconds blocked)
    for n in range(1, steps + 1):
        step_s.append(_timed(lambda n=n: learner.step(_batch(n, 4, 4, 64, vocab), n), device))
        pace.stepped(step_s[-1])
        if pace.due(n, learner.writing()):
            blocks.append((n, _timed(lambda n=n: learner.start_checkpoint(n, n), device)))
            pace.checkpointed(blocks[-1][1])
    learner.finish_checkpoint()
    blocked = sum(b for _, b in blocks)
    # Each checkpoint but the last with the steps up to the next: complete intervals.
    intervals = [b / (b + sum(step_s[n:m])) for (n, b), (m, _) in pairwise(blocks)]
    return {
        "auto_steps": steps,
        "auto_checkpoints": [n for n, _ in blocks],
        "auto_blocked_s": [round(b, 3) for _, b in blocks],
        "auto_blocking_share": blocked / (blocked + sum(step_s)),
        "auto_interval_shares": [round(x, 4) for x in intervals],
        "auto_step_s": sum(step_s) / steps,
    }


def version_bytes(model: str, dtype: str, rank: int) -> dict[str, int]:
    """SHARDCAST payload bytes of a full version against an adapter version (LoRA at `rank` on
    trainer.lora's default targets), each exported by the policy store and published by an
    origin as `coordinator run` does: the full version first, the adapter version after it."""
    base, tok = load_model(model, "float32")

    async def publish(tmp: Path) -> dict[str, int]:
        origin = Origin(tmp / "origin", Identity.generate(), "bench", keep=4)
        full = PolicyStore(tmp / "full", dtype, 4, 0).export(base, tok, 0)
        full_bytes = (await origin.publish(full, 0, delta=True)).payload_bytes
        lora = PolicyStore(tmp / "lora", dtype, 4, 0)
        wrapped = add_adapters(base, LoraSection(rank=rank))
        lora.export(wrapped, tok, 0)  # the pool's base, published once (the version above)
        with torch.no_grad():  # as after a step: B leaves zero
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-3)
        adapters = lora.export(wrapped, tok, 1)
        lora_bytes = (await origin.publish(adapters, 1, delta=True)).payload_bytes
        return {"full_version_bytes": full_bytes, "lora_version_bytes": lora_bytes}

    with tempfile.TemporaryDirectory() as tmp:
        return trio.run(publish, Path(tmp))


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
    from trainer.distributed import RankGroup, follow, join_ranks, leave_ranks

    config = from_dict({"algorithm": {"lr": 1e-3, "is_cap": 0, "micro_batch": 2}})
    ranks = join_ranks("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        learner = build_learner(
            _spec(TINY, "float32"), config, Path(tmp), ranks.rank, ranks.world, ranks.checkpoints
        )
        if ranks.rank != 0:
            follow(learner, ranks.control)
            leave_ranks()
            return
        group = RankGroup(learner, ranks.control)
        vocab = learner.trainer.model.config.vocab_size
        for n in range(1, FSDP_STEPS + 1):
            group.step(_batch(n, 3, 3, 8, vocab), n)
        model = group.publishable()
        save_file({k: v.float().contiguous() for k, v in model.state_dict().items()}, out)
        group.stop()
        leave_ranks()


def validation_cost(
    model: str, dtype: str, device: str = "cpu", batch: int = 4, profile: Path | None = None
) -> dict[str, object]:
    """Generation against validation of the same rollouts: the hf engine answers SUBMISSIONS
    one-prompt leases of GROUP samples; then one validator in this process (serially, and
    in batches of `batch`) and 2 worker processes (one lane each, a shared list of
    batches) validate them, each REPEATS times (the fastest counts). Workers are started
    before the clock runs. On `device` cuda the engine, the validator and both workers share
    the GPU."""
    # One torch thread per process: on a shared 2-core machine a second OpenMP thread made
    # small matmuls many times slower (tests/conftest.py), which would flatter the workers.
    torch.set_num_threads(1)
    spec = _spec(model, dtype)
    task = make_task("copy", 0, {"digits": 8})
    with tempfile.TemporaryDirectory() as tmp:
        base, tok = load_model(model, dtype)
        store = PolicyStore(Path(tmp) / "weights", dtype, 2, 2, device=device)
        store.export(base, tok, 0)
        engine = HFEngine(device, max_batch=GROUP)
        engine.load(store.folder(0), 0)
        eos = list(eos_token_ids(base, tok))
        node, jobs, t0 = Identity.generate(), [], time.perf_counter()
        for s in range(SUBMISSIONS):
            ids = tok(task.render(task.train[s], tok), add_special_tokens=False)["input_ids"]
            lease = offline_lease(
                [ids], group_size=GROUP, max_new_tokens=NEW_TOKENS, eos_token_ids=eos
            )
            lease = msgspec.structs.replace(
                lease, tasks=[msgspec.structs.replace(lease.tasks[0], prompt_index=s)]
            )
            answer = msg.Submission(lease_id=s, weight_version=0, results=engine.generate(lease))
            _sync(device)
            tasks = [msgspec.to_builtins(t) for t in lease.tasks]
            jobs.append(Job(s, seal(node, "bench", answer), tasks, msgspec.msgpack.encode(lease)))
        rollouts = SUBMISSIONS * GROUP
        generation = (time.perf_counter() - t0) / rollouts
        print(f"generated {rollouts} rollouts: {generation:.3f} s each", file=sys.stderr)
        sampling = sampling_params(lease)
        validator = Validator(spec, task, tok, store.model, len(tok), tok.pad_token_id)
        validator.validate_jobs(jobs[:1], sampling, 0)  # load the version once, off the clock
        batches = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]

        def in_process(batch_list: list[list[Job]]) -> tuple[float, list[str]]:
            t0 = time.perf_counter()
            out = [
                c.verdict.outcome
                for b in batch_list
                for c in validator.validate_jobs(b, sampling, 0)
            ]
            _sync(device)
            return time.perf_counter() - t0, out

        # Best of REPEATS: the machine is shared, and the least disturbed run is the cost.
        serial_s, serial = min(in_process([[j] for j in jobs]) for _ in range(REPEATS))
        batched_s, batched = min(in_process(batches) for _ in range(REPEATS))
        print(f"in-process: serial {serial_s:.2f} s, batched {batched_s:.2f} s", file=sys.stderr)
        if profile:
            _profile(lambda: in_process(batches), profile)
        pool = ValidatorPool(2, worker_setup(validator, store, sampling, 2))
        try:
            pooled_s, pooled = trio.run(_pooled, pool, batches)
        finally:
            pool.close()
    if not serial == batched == pooled == ["accept"] * SUBMISSIONS:
        raise RuntimeError(f"verdicts differ: {serial} / {batched} / {pooled}")
    return {
        "validations_per_s": {"1": SUBMISSIONS / batched_s, "2": SUBMISSIONS / pooled_s},
        "validation_serial_per_s": SUBMISSIONS / serial_s,
        "generation_s_per_rollout": generation,
        "validation_s_per_rollout": batched_s / rollouts,
        "generation_to_validation": generation / (batched_s / rollouts),
    }


def _profile(run: Callable[[], object], path: Path) -> None:
    """Where `run` spends its time, twice over: Python functions by cumulative time
    (cProfile; on CUDA a function that waits for kernels holds their time) and torch
    operators by their own host time and device time (torch.profiler), overall and by the
    shapes of their inputs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    functions = cProfile.Profile()
    functions.runcall(run)
    with torch.profiler.profile(activities=activities, record_shapes=True) as operators:
        run()
    text = io.StringIO()
    pstats.Stats(functions, stream=text).sort_stats("cumulative").print_stats(45)
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = operators.key_averages().table(sort_by=sort, row_limit=30)
    by_shape = operators.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=30)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue() + "\n" + table + "\n" + by_shape + "\n")
    print(f"profile written to {path}", file=sys.stderr)


async def _pooled(pool: ValidatorPool, batches: list[list[Job]]) -> tuple[float, list[str]]:
    async with trio.open_nursery() as nursery:
        for w in pool.workers:
            nursery.start_soon(w.start)
    runs = []
    for _ in range(REPEATS):
        todo = list(enumerate(batches))
        verdicts: dict[int, list[str]] = {}

        async def lane(worker, todo=todo, verdicts=verdicts) -> None:
            while todo:
                i, batch = todo.pop(0)
                verdicts[i] = [c.verdict.outcome for c in await worker.validate(batch, 0)]

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in pool.workers:
                nursery.start_soon(lane, w)
        runs.append((time.perf_counter() - t0, [v for i in sorted(verdicts) for v in verdicts[i]]))
    return min(runs)


PARTS = ("lora", "fsdp", "checkpoint", "validation")


def _report(results: dict[str, object], part: dict[str, object], path: Path | None) -> None:
    """Print a part's figures as it ends and rewrite the JSON with everything so far, so a run
    stopped by a time limit still leaves the parts it finished."""
    results.update(part)
    for k, v in part.items():
        print(f"{k:24} {v}", flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CPU run (a few minutes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="run this part (repeatable); default all"
    )
    parser.add_argument(
        "--model",
        help=f"the model of the checkpoint and validation parts: a preset, an HF folder or id "
        f"(default {SMOLLM2}; validation uses {TINY} with --quick)",
    )
    parser.add_argument(
        "--auto-steps",
        type=int,
        default=0,
        help="after the checkpoint part's steps, this many more with checkpoint_every = 0",
    )
    parser.add_argument(
        "--validation-batch",
        type=int,
        default=4,
        help="submissions per validation batch (default 4; a coordinator claims up to 8)",
    )
    parser.add_argument(
        "--validation-dtype",
        choices=["float32", "bfloat16"],
        help="the pool dtype of the validation part: what nodes generate and validators "
        "prefill in (default bfloat16 on CUDA, float32 on a CPU; a CPU with AVX512-BF16 or "
        "AMX runs bfloat16 matmuls several times faster)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="write where one batched validation pass spends its time to this file",
    )
    parser.add_argument("--rank-program", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_program:
        _rank_program(args.rank_program)
        return
    parts = args.only or PARTS
    torch.manual_seed(0)
    results: dict[str, object] = {"device": args.device}
    t0 = time.perf_counter()
    if "lora" in parts:
        part = version_bytes(SMOLLM2, "bfloat16", rank=8)
        part["lora_fraction"] = part["lora_version_bytes"] / part["full_version_bytes"]
        _report(results, part, args.json)
    if "fsdp" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            ok, diff = fsdp_matches_single(Path(tmp))
        _report(results, {"fsdp_matches_single": ok, "fsdp_max_diff": diff}, args.json)
    if "checkpoint" in parts:
        # fp32 compute on the CPU: bf16 autocast on a CPU without bf16 units (AMD EPYC here) is
        # ~12x slower than fp32, which would hide the checkpoint's share; the checkpoint is
        # fp32 either way. On CUDA the learner computes in bf16 autocast.
        steps = 3 if args.quick else 6
        part = checkpoint_cost(
            args.model or SMOLLM2, "float32", steps, args.device, args.auto_steps
        )
        _report(results, part, args.json)
    if "validation" in parts:
        # A quick run uses the tiny model: SmolLM2 generates ~1 s per step on a shared 2-core
        # machine. On CUDA the versions are bf16, as a GPU pool publishes them.
        model = args.model or (TINY if args.quick else SMOLLM2)
        dtype = args.validation_dtype or ("bfloat16" if args.device == "cuda" else "float32")
        part = {"validation_model": model, "validation_dtype": dtype}
        part = {**part, "validation_batch": args.validation_batch}
        cost = validation_cost(model, dtype, args.device, args.validation_batch, args.profile)
        _report(results, {**part, **cost}, args.json)
    end = {"wall_s": time.perf_counter() - t0, "load_average": os.getloadavg()[0]}
    _report(results, end, args.json)


if __name__ == "__main__":
    main()
