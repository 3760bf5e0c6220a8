import json
import random

import pytest

from protocol.errors import SwarmError
from trainer.tasks import Example, _split, make_task


@pytest.mark.parametrize("name", ["copy", "sort", "mod_add", "arithmetic"])
def test_procedural_tasks_are_seeded_and_splits_disjoint(name):
    a, b = make_task(name, seed=1), make_task(name, seed=1)
    assert [e.prompt for e in a.train] == [e.prompt for e in b.train]
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.test}
    assert make_task(name, seed=2).train[0].prompt != a.train[0].prompt or name == "mod_add"


def test_answers_are_right():
    for ex in make_task("sort", 0, {"digits": 5}).train[:50]:
        digits = ex.prompt.split()[1].rstrip("=")
        assert ex.columns["answer"] == "".join(sorted(digits))
    for ex in make_task("arithmetic", 0, {"op": "*", "digits": 2}).train[:50]:
        a, _, b = ex.prompt.removeprefix("What is ").rstrip("?").split()
        assert int(ex.columns["answer"]) == int(a) * int(b)


def test_limit_and_bad_names():
    assert len(make_task("copy", 0, limit=7).train) == 7
    with pytest.raises(SwarmError, match="known tasks"):
        make_task("nope", 0)
    with pytest.raises(SwarmError, match="bad options"):
        make_task("copy", 0, {"digitz": 3})
    with pytest.raises(SwarmError, match="op must be"):
        make_task("arithmetic", 0, {"op": "/"})


def test_gsm8k_jsonl(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}?", "answer": f"work\n#### {i * 1000:,}"} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = make_task("gsm8k", 0, {"path": str(path), "test_fraction": 0.25})
    assert len(task.train) == 15 and len(task.test) == 5
    for ex in task.train + task.test:
        assert ex.columns["answer"] == str(int(ex.prompt[1:-1]) * 1000)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(SwarmError, match="no answer column 'answer'; the columns are question"):
        make_task("gsm8k", 0, {"path": str(tmp_path / "bad.jsonl")})
    with pytest.raises(SwarmError, match="no dataset at"):
        make_task("gsm8k", 0, {"path": str(tmp_path / "absent.jsonl")})


def test_render_plain_and_chat():
    task = make_task("sort", 0)
    assert task.render(task.train[0], tokenizer=None) == task.train[0].prompt

    class ChatTokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert add_generation_prompt and not tokenize
            return f"<user>{messages[0]['content']}<assistant>"

    task = make_task("arithmetic", 0)
    text = task.render(task.train[0], ChatTokenizer())
    assert text == f"<user>{task.train[0].prompt}<assistant>The answer is "


def test_small_prompt_spaces_keep_most_for_training():
    task = make_task("copy", 0, {"digits": 2})
    assert len(task.train) == 80 and len(task.test) == 20


def _rows(n):
    return [{"question": f"q{i}?", "answer": f"steps\n#### {i}"} for i in range(n)]


def test_gsm8k_from_parquet_and_a_local_datasets_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(_rows(10))
    ds.to_parquet(str(tmp_path / "g.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    for path in (tmp_path / "g.parquet", tmp_path / "folder"):
        task = make_task("gsm8k", 0, {"path": str(path)})
        got = sorted(int(e.columns["answer"]) for e in task.train + task.test)
        assert got == list(range(10))


def test_pool_spec_rewards_replace_the_tasks(tmp_path):
    from trainer.rewards import parse_rewards

    rewards = parse_rewards(
        ["exact_numeric*2", "format*0.5", "length_penalty", "trainer.rewards:position_match"],
        max_new_tokens=8,
    )
    assert [r.weight for r in rewards] == [2.0, 0.5, 1.0, 1.0]
    task = make_task("arithmetic", 0, rewards=rewards)
    assert task.rewards == rewards
    with pytest.raises(SwarmError, match="unknown reward"):
        parse_rewards(["nope"])
    with pytest.raises(SwarmError, match="not a number"):
        parse_rewards(["format*x"])
    with pytest.raises(SwarmError, match="cannot be imported"):
        parse_rewards(["no_such_module:f"])


def test_a_known_prompt_space_stops_the_draw_without_changing_the_split():
    def make(rng: random.Random) -> Example:
        s = str(rng.randrange(100))
        return Example(f"copy {s}=", {"answer": s})

    drawn_on = _split(make, 3, n_train=150, n_test=20)
    stopped = _split(make, 3, n_train=150, n_test=20, space=100)
    assert [e.prompt for e in stopped[0]] == [e.prompt for e in drawn_on[0]]
    assert [e.prompt for e in stopped[1]] == [e.prompt for e in drawn_on[1]]
    assert len(stopped[0]) + len(stopped[1]) == 100
