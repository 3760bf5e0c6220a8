"""Dataset tasks: prompts (and answers) from any Hugging Face `datasets` source.

A source is a hub id (`openai/gsm8k`; offline it works when cached), a local folder (saved with
`save_to_disk`, or holding data files such as `train.jsonl` / `test.parquet`, whose names give
the splits), or one JSONL / JSON / Parquet / CSV file. Every option is a task option of the pool
spec, so it is part of the pool id: the coordinator and anyone auditing the pool read the same
rows. Nodes never load the data; leases carry the prompt tokens.

The prompt column holds text or a chat conversation (TRL's conversational format: a list of
`{"role", "content"}` messages). The answer column, when there is one, becomes the `answer`
reference column rewards compare with; a GSM8K-style answer keeps only what follows `####`.
A hub dataset with several configurations takes `subset` (e.g. `main` for `openai/gsm8k`).
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from protocol.errors import SwarmError
from trainer.rewards import WeightedReward, exact_numeric, math_verify_reward
from trainer.tasks import Example, Task

PROMPT_COLUMNS = ("prompt", "question", "problem")
"""Tried in order when no prompt column is named: TRL's `prompt`, then GSM8K's and MATH's."""
ANSWER_COLUMNS = ("answer", "solution", "ground_truth")
"""Tried in order when no answer column is named; a dataset with none has no `answer`."""
EVAL_SPLITS = ("test", "validation", "eval")
"""Tried in order as the held-out split when none is named."""
NO_EVAL_SPLIT = "none"
"""`eval_split = "none"`: hold out `test_fraction` of the training split instead."""
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_NUMBER = re.compile(r"^\s*-?\d[\d,]*(?:\.\d+)?\s*$")


class DatasetError(SwarmError):
    """A dataset that is missing, unreadable, or lacks a column the task needs."""


def load_splits(source: str, revision: str = "", subset: str = "") -> dict[str, Any]:
    """Every split of a source, as `datasets.Dataset`s keyed by split name."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    path = Path(source).expanduser()
    try:
        if path.is_dir() and _saved_to_disk(path):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DatasetError(
                    f"dataset file {path}: unknown format {path.suffix!r}; use one of "
                    f"{', '.join(_FILE_BUILDERS)} or a folder"
                )
            loaded = datasets.load_dataset(builder, data_files={"train": str(path)})
        elif _is_hub_id(source):
            loaded = datasets.load_dataset(source, subset or None, revision=revision or None)
        else:
            raise DatasetError(f"no dataset at {source}: not a file, a folder or a hub id")
    except (DatasetNotFoundError, ConnectionError) as e:
        raise DatasetError(
            f"dataset {source!r} was not found ({_first_line(e)}): check the id; offline, a hub "
            "dataset must already be in the Hugging Face cache, or pass a local folder or file"
        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise DatasetError(f"dataset {source!r} cannot be read: {_first_line(e)}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    return dict(loaded)


def pick_column(columns: list[str], named: str, candidates: tuple[str, ...], what: str) -> str:
    """The named column, or the first candidate present; a DatasetError lists what there is."""
    if named:
        if named not in columns:
            raise DatasetError(f"no {what} column {named!r}; the columns are {', '.join(columns)}")
        return named
    for c in candidates:
        if c in columns:
            return c
    raise DatasetError(
        f"no {what} column found (tried {', '.join(candidates)}); the columns are "
        f"{', '.join(columns)}: name one with --{what}-column"
    )


def pick_eval_split(splits: list[str], train_split: str, named: str) -> str:
    if named:
        if named != NO_EVAL_SPLIT and named not in splits:
            raise DatasetError(f"no split {named!r}; the splits are {', '.join(splits)}")
        return named
    return next((s for s in EVAL_SPLITS if s in splits and s != train_split), NO_EVAL_SPLIT)


def dataset_task(
    seed: int,
    source: str,
    split: str = "train",
    eval_split: str = "",
    prompt_column: str = "",
    answer_column: str = "",
    test_fraction: float = 0.1,
    chat: bool = True,
    prefill: str = "",
    revision: str = "",
    subset: str = "",
) -> Task:
    """A task over a dataset's rows. Empty column and eval-split options are detected (see the
    module constants); `coordinator init` writes what it detected into the spec."""
    splits = load_splits(source, revision, subset)
    if split not in splits:
        raise DatasetError(f"dataset {source!r} has no split {split!r}; it has {', '.join(splits)}")
    train_rows = splits[split]
    columns = list(train_rows.column_names)
    prompt_column = pick_column(columns, prompt_column, PROMPT_COLUMNS, "prompt")
    if answer_column or any(c in columns for c in ANSWER_COLUMNS):
        answer_column = pick_column(columns, answer_column, ANSWER_COLUMNS, "answer")
    train = [_example(r, prompt_column, answer_column) for r in train_rows]
    eval_split = pick_eval_split(list(splits), split, eval_split)
    if eval_split == NO_EVAL_SPLIT:
        # Shuffled with the pool seed, so the held-out part is the same on every run.
        random.Random(seed).shuffle(train)
        n_test = max(1, int(len(train) * test_fraction))
        train, test = train[n_test:], train[:n_test]
    else:
        test = [_example(r, prompt_column, answer_column) for r in splits[eval_split]]
    if not train:
        raise DatasetError(f"dataset {source!r} split {split!r} has no rows to train on")
    rewards = [WeightedReward(answer_reward(train))] if answer_column else []
    return Task(
        "dataset",
        train,
        test,
        rewards,
        chat=chat,
        prefill=prefill,
        # Every value as resolved, so `coordinator init` can write what it detected.
        options={
            "source": source,
            "split": split,
            "eval_split": eval_split,
            "prompt_column": prompt_column,
            "answer_column": answer_column,
            "test_fraction": test_fraction,
            "chat": chat,
            "prefill": prefill,
            "revision": revision,
            "subset": subset,
        },
    )


def answer_reward(examples: list[Example]) -> Any:
    """Exact numeric match when every answer is a number, else math-verify's equivalence."""
    numeric = all(_NUMBER.match(str(e.columns.get("answer", ""))) for e in examples)
    return exact_numeric if numeric else math_verify_reward


def _example(row: dict[str, Any], prompt_column: str, answer_column: str) -> Example:
    value = row[prompt_column]
    messages = _messages(value, prompt_column)
    prompt = messages[-1]["content"] if messages else str(value)
    # Other scalar columns go to reward functions by name, as TRL passes a dataset's columns.
    columns = {
        k: v
        for k, v in row.items()
        if k != prompt_column and (v is None or isinstance(v, str | int | float | bool))
    }
    if answer_column:
        columns["answer"] = str(row[answer_column]).split("####")[-1].strip().replace(",", "")
    return Example(prompt, columns, tuple(messages) if messages else None)


def _messages(value: Any, column: str) -> list[dict[str, str]]:
    """A conversational prompt as messages; [] for plain text."""
    if isinstance(value, str):
        return []
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]
    raise DatasetError(
        f"prompt column {column!r} holds {type(value).__name__}: expected text or a list of "
        "{'role', 'content'} messages"
    )


def _is_message(m: Any) -> bool:
    return isinstance(m, dict) and "role" in m and "content" in m


def _is_hub_id(source: str) -> bool:
    return "/" in source and not source.startswith((".", "/", "~"))


def _saved_to_disk(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
