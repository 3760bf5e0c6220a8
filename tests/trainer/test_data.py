"""Dataset tasks through Hugging Face `datasets`: local folders, files, TRL's prompt column."""

import json

import pytest

from toploc.models import tiny_tokenizer
from trainer.data import DatasetError
from trainer.rewards import exact_numeric, math_verify_reward, parse_rewards
from trainer.tasks import make_task


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_folder_with_its_own_columns_and_splits(tmp_path):
    folder = tmp_path / "quiz"
    folder.mkdir()
    rows = [{"ask": f"What is {i} + 1?", "gold": str(i + 1), "level": i % 3} for i in range(12)]
    _jsonl(folder / "train.jsonl", rows[:9])
    _jsonl(folder / "test.jsonl", rows[9:])
    options = {"source": str(folder), "prompt_column": "ask", "answer_column": "gold"}
    task = make_task("dataset", 0, options, limit=5)
    assert [e.prompt for e in task.train] == [r["ask"] for r in rows[:5]]
    assert [e.columns["answer"] for e in task.test] == ["10", "11", "12"]
    assert task.train[2].columns["level"] == 2  # other columns reach reward functions by name
    assert [r.func for r in task.rewards] == [exact_numeric]
    with pytest.raises(DatasetError, match="no prompt column 'question'; the columns are ask"):
        make_task("dataset", 0, {"source": str(folder), "prompt_column": "question"})
    with pytest.raises(DatasetError, match="no split 'dev'; the splits are train, test"):
        make_task("dataset", 0, {**options, "eval_split": "dev"})


def test_trl_prompt_column_text_and_chat_without_flags(tmp_path):
    text = _jsonl(tmp_path / "text.jsonl", [{"prompt": f"say {i}"} for i in range(10)])
    with pytest.raises(Exception, match="no reward"):
        make_task("dataset", 0, {"source": str(text)})
    rewards = parse_rewards(["format"])
    task = make_task("dataset", 0, {"source": str(text)}, rewards=rewards)
    assert len(task.train) == 9 and len(task.test) == 1  # 10% held out, no test split
    assert task.rewards == rewards

    chat = [
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": q}]}
        for q in ("hi", "2+2?", "bye")
    ]
    source = _jsonl(tmp_path / "chat.jsonl", chat)
    task = make_task("dataset", 0, {"source": str(source)}, rewards=rewards)
    example = next(e for e in task.train + task.test if e.prompt == "2+2?")
    rendered = task.render(example, tiny_tokenizer())
    assert rendered == "system: be brief\nuser: 2+2?\nassistant: "
    plain = make_task("dataset", 0, {"source": str(source), "chat": False}, rewards=rewards)
    with pytest.raises(Exception, match="chat is off"):
        plain.render(plain.train[0], tiny_tokenizer())


def test_held_out_split_is_seeded_and_answers_pick_the_reward(tmp_path):
    rows = [{"problem": f"p{i}", "solution": f"\\frac{{{i}}}{{2}}"} for i in range(20)]
    source = _jsonl(tmp_path / "math.jsonl", rows)
    a = make_task("dataset", 3, {"source": str(source), "answer_column": "solution"})
    b = make_task("dataset", 3, {"source": str(source), "answer_column": "solution"})
    assert [e.prompt for e in a.test] == [e.prompt for e in b.test]
    assert {e.prompt for e in a.train}.isdisjoint(e.prompt for e in a.test)
    assert [r.func for r in a.rewards] == [math_verify_reward]
    gsm = [{"question": "q", "answer": "steps\n#### 1,250"}]
    task = make_task("dataset", 0, {"source": str(_jsonl(tmp_path / "g.jsonl", gsm * 3))})
    assert task.train[0].columns["answer"] == "1250"


def test_saved_to_disk_and_parquet_and_bad_sources(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(8)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:6]),
            "validation": datasets.Dataset.from_list(rows[6:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "saved"))
    task = make_task("dataset", 0, {"source": str(tmp_path / "saved"), "answer_column": "answer"})
    assert len(task.train) == 6 and [e.prompt for e in task.test] == ["q6", "q7"]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    task = make_task(
        "dataset", 0, {"source": str(tmp_path / "d.parquet"), "answer_column": "answer"}
    )
    assert len(task.train) + len(task.test) == 8
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"unknown format '\.txt'"):
        make_task("dataset", 0, {"source": str(tmp_path / "d.txt")})
    with pytest.raises(DatasetError, match="no dataset at"):
        make_task("dataset", 0, {"source": str(tmp_path / "absent.jsonl")})
    with pytest.raises(DatasetError, match="'acme/absent' was not found"):
        make_task("dataset", 0, {"source": "acme/absent"})
