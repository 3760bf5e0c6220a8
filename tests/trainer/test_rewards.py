import asyncio
import time

import pytest

from trainer.rewards import (
    WeightedReward,
    exact_numeric,
    extract_number,
    format_reward,
    length_penalty,
    math_verify_reward,
    position_match,
    score,
)


def test_extract_number_prefers_tags_then_hashes():
    assert extract_number("<answer>1,234</answer> and 5") == 1234
    assert extract_number("so 3 apples #### 7") == 7
    assert extract_number("The answer is -12.5 then 4") == -12.5
    assert extract_number("no digits") is None


def test_exact_numeric_and_math_verify():
    completions = ["The answer is 103.", "102", "it is \\frac{206}{2}", "nothing"]
    answer = ["103"] * 4
    assert exact_numeric([""] * 4, completions, answer) == [1.0, 0.0, 0.0, 0.0]
    assert math_verify_reward([""] * 4, completions, answer)[2] == 1.0
    assert math_verify_reward([""], ["\\frac{{{"], ["1"]) == [0.0]


def test_format_and_length():
    assert format_reward(
        [""] * 2, ["<think>x</think> <answer>1</answer>", "<answer>1</answer>"]
    ) == [
        1.0,
        0.0,
    ]
    penalty = length_penalty(max_chars=20, coef=0.5)
    assert penalty([""] * 3, ["a" * 5, "a" * 15, "a" * 40]) == [0.0, -0.25, -0.5]


def test_position_match_cannot_be_farmed_by_a_constant():
    assert position_match([""], ["1234"], ["1234"]) == [1.0]
    assert position_match([""], ["1243"], ["1234"]) == [0.5]
    assert position_match([""], ["12345"], ["1234"]) == [0.8]  # one too long: 4 of 5 right
    # a constant digit scores only where the answer happens to have it
    assert position_match([""], ["7777"], ["1234"]) == [0.0]


def test_score_weights_and_survives_bad_functions():
    def broken(prompts, completions, **_):
        raise RuntimeError("boom")

    def slow(prompts, completions, **_):
        time.sleep(5)
        return [1.0] * len(completions)

    def wrong_count(prompts, completions, **_):
        return [1.0]

    async def async_bonus(prompts, completions, **_):
        await asyncio.sleep(0)
        return [0.5 for _ in completions]

    rewards = [
        WeightedReward(exact_numeric, 2.0),
        WeightedReward(async_bonus),
        WeightedReward(broken),
        WeightedReward(slow),
        WeightedReward(wrong_count),
    ]
    t0 = time.monotonic()
    totals, per = score(rewards, ["q", "q"], ["7", "8"], {"answer": ["7", "7"]}, timeout_s=0.5)
    assert time.monotonic() - t0 < 3
    assert totals == [2.5, 0.5]
    assert per["broken"] == [None, None] and per["slow"] == [None, None]
    assert per["wrong_count"] == [None, None]


def test_columns_reach_reward_functions_by_name():
    seen = {}

    def spy(prompts, completions, answer, difficulty, **_):
        seen.update(answer=answer, difficulty=difficulty)
        return [0.0] * len(completions)

    score([WeightedReward(spy)], ["p"], ["c"], {"answer": ["1"], "difficulty": [3]})
    assert seen == {"answer": ["1"], "difficulty": [3]}


@pytest.mark.parametrize("bad", [[], ["x"]])
def test_score_with_no_rewards_or_samples(bad):
    totals, per = score([], ["q"] * len(bad), bad, {})
    assert totals == [0.0] * len(bad) and per == {}
