"""Reproducible accuracy: greedy decoding of a task's held-out split with its fixed prompt,
and, with k > 1, pass@1 and pass@k over k seeded samples per prompt.

A completion counts as correct when it earns the task's full reward (the sum of its reward
weights): for the built-in tasks, an exact answer. One answer extractor per task; the samples'
seeds are a hash of (seed, prompt index) with sample i under it, so two runs on the same
weights give the same numbers.

A multi-turn task (one with an environment) is evaluated on whole episodes, played by the turn
loop nodes roll out with (`protocol.environments.episodes`): the prompt's seed draws its game
(the same one for its greedy episode and its k samples) and each episode is scored as the
coordinator scores a transcript: the model's last turn as the completion, with columns `turns`
and `seed`. The result adds `mean_turns` and `rewarded` (episodes with a positive reward: for
the guessing game, games won).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm
from transformers import PreTrainedModel

from protocol.environments import Environment
from protocol.environments.episodes import Episode, play
from toploc import capture_hf
from toploc.models import eos_token_ids
from toploc.sampling import SamplingParams
from trainer.passk import mean_pass_at_k
from trainer.rewards import score, score_games
from trainer.tasks import Example, Task

SHOWN = 5
"""Greedy completions the result quotes."""


def evaluate(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = True,
    k: int = 1,
    sampling: SamplingParams | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy accuracy on `split`; with `k` > 1 also pass@1 and pass@k of k samples per prompt
    drawn with `sampling` (temperature 1 by default; its max_tokens and EOS are replaced)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    examples = {"test": task.test, "train": task.train}[split][:limit]
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} examples")
    eos = tuple(eos_token_ids(model, tokenizer))
    greedy = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, eos_token_ids=eos)
    count = len(examples) * (1 if k == 1 else 1 + k)
    bar = tqdm(total=count, desc=f"eval {task.name}/{split}", disable=not progress, unit="sample")
    scorer = _Scorer(model, tokenizer, task, batch_size, bar)
    prompts = _encode(task, tokenizer, examples)
    # Greedy decoding ignores the seeds; a multi-turn prompt's game is drawn from its seed.
    seeds = [sample_seed(seed, i) for i in range(len(examples))]
    rows = scorer.run(examples, prompts, greedy, seeds, [0] * len(examples))
    rewards = [r.reward for r in rows]
    result: dict[str, Any] = {
        "task": task.name,
        "split": split,
        "n": len(examples),
        "accuracy": sum(scorer.correct(r) for r in rewards) / len(examples),
        "mean_reward": sum(rewards) / len(rewards),
        "max_new_tokens": max_new_tokens,
    }
    if task.environment is not None:
        result["mean_turns"] = sum(r.turns for r in rows) / len(rows)
        result["rewarded"] = sum(r > 0 for r in rewards) / len(rewards)
    if k > 1:
        solved = _count_solved(scorer, examples, prompts, k, sampling, max_new_tokens, seed)
        counts = [(k, c) for c in solved]
        result.update(
            {
                "k": k,
                "temperature": (sampling or SamplingParams()).temperature,
                "pass@1": mean_pass_at_k(counts, 1),
                "pass@k": mean_pass_at_k(counts, k),
            }
        )
    bar.close()
    result["examples"] = [
        {"prompt": e.prompt, "completion": r.text, **e.columns, "reward": r.reward}
        for e, r in zip(examples[:SHOWN], rows, strict=False)
    ]
    return result


def solved_per_prompt(
    model: PreTrainedModel,
    tokenizer: Any,
    task: Task,
    examples: Sequence[Example],
    n: int,
    sampling: SamplingParams,
    max_new_tokens: int,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = False,
) -> list[int]:
    """For each example, how many of `n` seeded samples earn the task's full reward."""
    bar = tqdm(total=len(examples) * n, desc=task.name, disable=not progress, unit="sample")
    scorer = _Scorer(model, tokenizer, task, batch_size, bar)
    solved = _count_solved(
        scorer, examples, _encode(task, tokenizer, examples), n, sampling, max_new_tokens, seed
    )
    bar.close()
    return solved


def _count_solved(
    scorer: _Scorer,
    examples: Sequence[Example],
    prompts: Sequence[list[int]],
    n: int,
    sampling: SamplingParams | None,
    max_new_tokens: int,
    seed: int,
) -> list[int]:
    """Per example, the samples of `n` (sample i under the example's seed) that are right."""
    base = sampling or SamplingParams()
    params = SamplingParams(
        temperature=base.temperature,
        top_k=base.top_k,
        top_p=base.top_p,
        max_tokens=max_new_tokens,
        eos_token_ids=tuple(eos_token_ids(scorer.model, scorer.tokenizer)),
    )
    seeds = [sample_seed(seed, i) for i in range(len(examples))]
    rows = scorer.run(
        [e for e in examples for _ in range(n)],
        [p for p in prompts for _ in range(n)],
        params,
        [s for s in seeds for _ in range(n)],
        list(range(n)) * len(examples),
    )
    return [
        sum(scorer.correct(r.reward) for r in rows[i * n : (i + 1) * n])
        for i in range(len(examples))
    ]


def _encode(task: Task, tokenizer: Any, examples: Sequence[Example]) -> list[list[int]]:
    return [
        tokenizer(task.render(e, tokenizer), add_special_tokens=False)["input_ids"]
        for e in examples
    ]


def sample_seed(seed: int, prompt_index: int) -> int:
    """The sampling seed of an evaluation prompt (63 bits: the sampler takes an int64)."""
    digest = hashlib.blake2b(struct.pack(">qQ", seed, prompt_index), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class _Played:
    """One completion or episode, as the task's rewards take it."""

    text: str
    """What the model produced: the completion, or the whole transcript of an episode."""
    turns: list[str] | None = None
    """An episode's model turns (the last one is its answer); None for a completion."""
    seed: int = 0
    """The episode's seed (its game)."""


@dataclass(frozen=True)
class _Row:
    text: str
    reward: float
    turns: int


class _Scorer:
    """Generates (or plays episodes) in batches and scores each with the task's rewards."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: Any, task: Task, batch_size: int, bar: tqdm
    ) -> None:
        self.model, self.tokenizer, self.task = model, tokenizer, task
        self.batch_size = batch_size
        self.bar = bar
        self.full = sum(r.weight for r in task.rewards)

    def correct(self, reward: float) -> bool:
        return reward >= self.full - 1e-9

    def run(
        self,
        examples: Sequence[Example],
        prompts: Sequence[list[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        indices: Sequence[int],
    ) -> list[_Row]:
        rows: list[_Row] = []
        env = self.task.environment
        for start in range(0, len(prompts), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = (prompts[part], params, seeds[part], indices[part])
            played = self._completions(*batch) if env is None else self._episodes(env, *batch)
            rows += [self._score(e, p) for e, p in zip(examples[part], played, strict=True)]
            self.bar.update(len(played))
        return rows

    def _generate(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        indices: Sequence[int],
    ) -> list[Any]:
        return capture_hf.generate(
            self.model,
            prompts,
            params,
            seeds=seeds,
            sample_indices=indices,
            pad_token_id=self.tokenizer.pad_token_id,
            capture=False,
        )

    def _completions(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        indices: Sequence[int],
    ) -> list[_Played]:
        rollouts = self._generate(prompts, params, seeds, indices)
        return [_Played(self._decode(r.completion_ids)) for r in rollouts]

    def _episodes(
        self,
        env: Environment,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        seeds: Sequence[int],
        indices: Sequence[int],
    ) -> list[_Played]:
        episodes = [Episode(list(p), s, i) for p, s, i in zip(prompts, seeds, indices, strict=True)]
        play(
            episodes,
            env,
            self.tokenizer,
            lambda ctx, s, i: self._generate(ctx, params, s, i),
            self.batch_size,
        )
        return [
            _Played(self._decode(e.tokens), [self._decode(t) for t in e.turns], e.seed)
            for e in episodes
        ]

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _score(self, example: Example, played: _Played) -> _Row:
        columns = {c: [v] for c, v in example.columns.items()}
        if played.turns is None:
            total, _ = score(self.task.rewards, [example.prompt], [played.text], columns)
        else:  # as validation scores a transcript
            games = ([played.turns], [played.seed])
            total, _ = score_games(self.task.rewards, [example.prompt], *games, columns)
        return _Row(played.text, total[0], 1 if played.turns is None else len(played.turns))
