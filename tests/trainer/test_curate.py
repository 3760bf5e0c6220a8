import json

from toploc.models import load_model
from toploc.sampling import SamplingParams
from trainer.cli import main
from trainer.curate import curate
from trainer.rewards import WeightedReward
from trainer.tasks import Task, make_task


def test_curate_keeps_the_prompts_solved_sometimes():
    model, tok = load_model("tiny")
    examples = make_task("copy", 0, {"digits": 3}).train[:3]
    seen = []

    def spy(prompts, completions, **_):
        seen.extend(completions)
        return [0.0] * len(completions)

    sampling = SamplingParams(temperature=1.0)
    probe = curate(model, tok, Task("p", examples, [], [WeightedReward(spy)]), 4, sampling, 4)
    assert probe.summary() == {
        "prompts": 3,
        "kept": 0,
        "dropped_always_solved": 0,
        "dropped_never_solved": 3,
    }
    assert len(seen) == 12
    # Right: all of prompt 0's samples and the second of prompt 1's (and any text equal).
    right = set(seen[0:4]) | {seen[5]}

    def rigged(prompts, completions, **_):
        return [float(c in right) for c in completions]

    got = curate(model, tok, Task("r", examples, [], [WeightedReward(rigged)]), 4, sampling, 4)
    solved = [sum(c in right for c in seen[i * 4 : i * 4 + 4]) for i in range(3)]
    assert solved[0] == 4 and solved[1] >= 1
    assert got.always == sum(c == 4 for c in solved) and got.never == sum(c == 0 for c in solved)
    kept = [(r["index"], r["pass_rate"]) for r in got.rows]
    assert kept == [(i, c / 4) for i, c in enumerate(solved) if 0 < c < 4]
    assert all(r["prompt"] == examples[r["index"]].prompt and "answer" in r for r in got.rows)


def test_the_curate_command_writes_jsonl_and_refuses_bad_settings(tmp_path, capsys):
    out = tmp_path / "kept.jsonl"
    args = ["curate", "--model", "tiny", "--task", "copy", "--option", "digits=2"]
    assert main([*args, "--limit", "3", "--n", "2", "--max-new-tokens", "2", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 3 and summary["n"] == 2
    # an untrained model solves nothing: every prompt dropped, an empty dataset
    assert summary["dropped_never_solved"] == 3 and out.read_text() == ""
    refused = tmp_path / "refused.jsonl"
    assert main([*args, "--n", "1", "-o", str(refused)]) == 2
    assert "n >= 2" in capsys.readouterr().err and not refused.exists()
