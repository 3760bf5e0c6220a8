import json

from toploc.models import load_model
from trainer.evaluate import evaluate
from trainer.metrics import RunLog
from trainer.rewards import WeightedReward, position_match
from trainer.tasks import Example, Task, make_task


def test_eval_is_deterministic_and_scores_exact_answers():
    model, tok = load_model("tiny")
    task = make_task("copy", 0, {"digits": 3})
    a = evaluate(model, tok, task, limit=8, max_new_tokens=4, progress=False)
    b = evaluate(model, tok, task, limit=8, max_new_tokens=4, progress=False)
    assert a == b and a["n"] == 8 and a["accuracy"] == 0.0  # an untrained model copies nothing

    # A task whose answer is what this model says greedily scores 100%.
    said = a["examples"][0]["completion"].strip()
    rigged = Task(
        "rigged",
        [],
        [Example(task.test[0].prompt, {"answer": said})],
        [WeightedReward(position_match)],
    )
    got = evaluate(model, tok, rigged, max_new_tokens=4, progress=False)
    assert got["accuracy"] == (1.0 if said else 0.0)


def test_run_log_writes_jsonl_and_prometheus(tmp_path):
    log = RunLog(tmp_path)
    log.sample({"step": 1, "completion": "x"})
    log.verdict("hard", "toploc", 0.2)
    log.step_done(3, 3, {"reward_mean": 0.5, "tokens_per_s": 100.0})
    assert json.loads((tmp_path / "samples.jsonl").read_text())["completion"] == "x"
    assert json.loads((tmp_path / "steps.jsonl").read_text())["reward_mean"] == 0.5
    text = log.prometheus().decode()
    assert 'swarmrl_submissions_total{check="toploc",outcome="hard"} 1.0' in text
    assert "swarmrl_reward_mean 0.5" in text and "swarmrl_step 3.0" in text
