"""A LoRA learner checkpoints only its adapters and resumes them exactly."""

import torch

from protocol import poolspec
from trainer.checkpoint import latest_committed
from trainer.config import from_dict
from trainer.grpo import Sample, TrainGroup
from trainer.learner import build_learner


def on_policy(learner, prompt: list[int], tokens: list[int]) -> Sample:
    """A sample with the model's own logprobs, so a step's ratio is 1 and the step moves."""
    with torch.no_grad():
        logits = learner.trainer.model(torch.tensor([prompt + tokens])).logits[0]
    rows = logits[len(prompt) - 1 : -1].log_softmax(-1)
    logprobs = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()
    return Sample(prompt, tokens, logprobs, False)


def test_a_lora_learner_resumes_its_adapters_from_a_checkpoint(tmp_path):
    spec = poolspec.from_dict({"name": "t", "coordinator": {"public_key": "ab" * 32}})
    config = from_dict(
        {
            "algorithm": {"lr": 1e-2},
            "trainer": {"device": "cpu", "lora": {"rank": 4, "target_modules": ["q_proj"]}},
        }
    )
    learner = build_learner(spec, config, tmp_path)
    samples = [on_policy(learner, [1, 5, 9], tokens) for tokens in ([7, 8, 2], [4, 3, 2])]
    learner.step([TrainGroup(samples, [1.0, 0.0], [0.5, -0.5], 0)], 1)
    assert not learner.writing()
    learner.start_checkpoint(1, 1)
    assert learner.finish_checkpoint() == 1
    assert not learner.writing()  # the write is done: auto pacing may checkpoint again
    trained = {n: p.detach().clone() for n, p in learner.trainer.model.named_parameters()}

    resumed = build_learner(spec, config, tmp_path)
    resumed.restore(latest_committed(tmp_path, 1))
    params = dict(resumed.trainer.model.named_parameters())
    lora = [n for n in trained if "lora_B" in n]
    assert lora and not torch.equal(trained[lora[0]], torch.zeros_like(trained[lora[0]]))
    assert all(torch.equal(params[n], trained[n]) for n in trained)
    held = sum(f.stat().st_size for f in tmp_path.rglob("*.distcp"))
    full = sum(p.numel() * 4 for p in params.values())
    assert held < full / 4  # adapters and their AdamW state only, not the frozen base
