"""Validation throughput of the `hf` and `vllm` validator backends on the same submissions.

    .venv-vllm/bin/python bench/validator_backends.py --json bench/results/validator-backends.json

The hf engine answers SUBMISSIONS one-prompt leases of GROUP samples (the tiny model's copy
task, fp32, up to NEW_TOKENS tokens); a validator in this process, one per backend, validates
them in batches of BATCH, REPEATS times (the fastest run counts: the machine may be shared).
Each backend loads the version (vLLM: builds its engine) before the clock runs, and both must
reach the same verdicts. Fields: validations_per_s and rollouts_per_s per backend, and
vllm_over_hf (the speed-up). Needs vLLM: run it from .venv-vllm (`--device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine import HFEngine, offline_lease, sampling_params
from protocol import messages as msg
from protocol import poolspec
from toploc.models import eos_token_ids, load_model, model_dir
from trainer.tasks import make_task
from trainer.validator import LeaseView, Validator

SUBMISSIONS, GROUP, NEW_TOKENS, BATCH, REPEATS = 16, 8, 32, 4, 3


def submissions(device: str) -> tuple[list[tuple[msg.Submission, LeaseView]], object, object]:
    """The benchmark's submissions (each with its lease), the model and its tokenizer."""
    model, tok = load_model("tiny")
    model = model.to(device).eval()
    task = make_task("copy", 0, {"digits": 8})
    engine = HFEngine(device=device, dtype="float32", max_batch=GROUP)
    engine.load(model_dir("tiny"), 0)
    eos = list(eos_token_ids(model, tok))
    items = []
    for s in range(SUBMISSIONS):
        ids = tok(task.render(task.train[s], tok), add_special_tokens=False)["input_ids"]
        lease = offline_lease([ids], group_size=GROUP, max_new_tokens=NEW_TOKENS, eos_token_ids=eos)
        answer = msg.Submission(lease_id=s, weight_version=0, results=engine.generate(lease))
        items.append((answer, LeaseView.of(lease, sampling_params(lease))))
    return items, model, tok


def throughput(validator: Validator, items: list) -> tuple[float, list[str]]:
    """The fastest of REPEATS runs over `items` in batches, and its verdicts."""
    batches = [items[i : i + BATCH] for i in range(0, len(items), BATCH)]
    validator.validate_batch(batches[0], 0)  # the version loads off the clock
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = [v.outcome for b in batches for v, _ in validator.validate_batch(b, 0)]
        runs.append((time.perf_counter() - t0, out))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(1)  # what vLLM's CPU backend runs with here: the same for both
    items, model, tok = submissions(args.device)
    task = make_task("copy", 0, {"digits": 8})
    spec = poolspec.from_dict({"name": "bench", "coordinator": {"public_key": "ab" * 32}})
    rollouts = SUBMISSIONS * GROUP
    result: dict[str, object] = {"device": args.device, "submissions": SUBMISSIONS}
    verdicts, rates = {}, {}
    for backend in ("hf", "vllm"):
        validator = Validator(
            spec, task, tok, lambda v: model, len(tok), tok.pad_token_id, backend=backend
        )
        seconds, verdicts[backend] = throughput(validator, items)
        rates[backend] = SUBMISSIONS / seconds
        result[backend] = {
            "validations_per_s": rates[backend],
            "rollouts_per_s": rollouts / seconds,
        }
        print(f"{backend}: {rates[backend]:.2f} validations/s", file=sys.stderr)
    if not verdicts["hf"] == verdicts["vllm"] == ["accept"] * SUBMISSIONS:
        raise RuntimeError(f"verdicts differ: {verdicts}")
    result["vllm_over_hf"] = rates["vllm"] / rates["hf"]
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
