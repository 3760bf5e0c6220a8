import json

import trio

from protocol.host import HostStats
from toploc.models import load_model
from toploc.sampling import SamplingParams
from trainer.evaluate import evaluate
from trainer.evaluating import EvalService
from trainer.metrics import EVALS_FILE, RunLog
from trainer.policy import PolicyStore
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
    # The transport's counters, read from the host's stats at each scrape.
    assert "swarmrl_requests_served_total 0.0" in text
    stats = HostStats(served=7, refused={"rate_limited": 3}, cutoffs=1, streams_cut=12)
    stats.connections_refused = 5
    stats.connections_over_held = 2
    stats.silent_connections_closed = 4
    stats.connections_evicted, stats.handshakes_cut, stats.window_violations = 6, 8, 9
    log.watch_transport(stats)
    stats.streams_cut += 1
    text = log.prometheus().decode()
    assert "swarmrl_requests_served_total 7.0" in text
    assert 'swarmrl_requests_refused_total{code="rate_limited"} 3.0' in text
    assert "swarmrl_peer_cutoffs_total 1.0" in text and "swarmrl_streams_cut_total 13.0" in text
    assert "swarmrl_connections_refused_total 5.0" in text
    assert "swarmrl_connections_over_held_total 2.0" in text
    assert "swarmrl_silent_connections_closed_total 4.0" in text
    assert "swarmrl_connections_evicted_total 6.0" in text
    assert "swarmrl_handshakes_cut_total 8.0" in text
    assert "swarmrl_window_violations_total 9.0" in text


def test_pass_at_k_counts_the_seeded_samples():
    model, tok = load_model("tiny")
    task = make_task("copy", 0, {"digits": 3})
    seen = []

    def spy(prompts, completions, **_):
        seen.extend(completions)
        return [0.0] * len(completions)

    probe = Task("probe", [], task.test[:3], [WeightedReward(spy)])
    first = evaluate(model, tok, probe, max_new_tokens=4, progress=False, k=4)
    greedy, sampled = seen[:3], seen[3:]
    assert len(sampled) == 12 and first["pass@1"] == first["pass@k"] == 0.0
    assert len(set(sampled[:4])) > 1  # sample i of a prompt is its own draw
    seen.clear()
    evaluate(model, tok, probe, max_new_tokens=4, progress=False, k=4)
    assert seen == greedy + sampled  # same seeds, same samples

    # Deem two of the samples right: prompt 0's first and prompt 1's second (and any equal).
    right = {sampled[0], sampled[5]}

    def rigged(prompts, completions, **_):
        return [float(c in right) for c in completions]

    got = evaluate(
        model,
        tok,
        Task("r", [], task.test[:3], [WeightedReward(rigged)]),
        max_new_tokens=4,
        progress=False,
        k=4,
    )
    per_prompt = [sum(c in right for c in sampled[i * 4 : i * 4 + 4]) for i in range(3)]
    # n = k = 4: pass@1 is the mean fraction right, pass@4 the share of prompts with any.
    assert got["pass@1"] == sum(c / 4 for c in per_prompt) / 3
    assert got["pass@k"] == sum(c > 0 for c in per_prompt) / 3
    assert got["accuracy"] == sum(g in right for g in greedy) / 3


def test_k_one_keeps_the_greedy_report():
    model, tok = load_model("tiny")
    task = make_task("copy", 0, {"digits": 2})
    got = evaluate(model, tok, task, limit=2, max_new_tokens=2, progress=False)
    assert "pass@k" not in got and set(got) >= {"accuracy", "mean_reward", "examples", "n"}


def test_in_run_evaluation_loads_the_published_version_and_logs_it(tmp_path):
    model, tok = load_model("tiny")
    task = make_task("copy", 0, {"digits": 2})
    policy = PolicyStore(tmp_path / "weights", "float32", 4, 1)
    policy.export(model, tok, 2)
    log = RunLog(tmp_path / "logs")
    sampling = SamplingParams(temperature=1.0, max_tokens=3)
    service = EvalService(task, tok, policy, log, 2, 4, 3, sampling, 0)
    assert not service.due(1) and service.due(2) and service.due(0)

    async def main():
        async with trio.open_nursery() as nursery:
            assert service.start_if_due(2, nursery)
            assert not service.start_if_due(4, nursery)  # one at a time: v4 is passed over
        assert await service.run(6) is None  # never published: nothing to evaluate

    trio.run(main)
    rows = [json.loads(line) for line in (tmp_path / "logs" / EVALS_FILE).read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["version"] == 2
    assert set(rows[0]) >= {"eval_accuracy", "eval_pass@1", "eval_pass@k", "time"}
    assert rows[0]["eval_k"] == 3 and rows[0]["eval_prompts"] == 4
    text = log.prometheus().decode()
    assert "swarmrl_eval_version 2.0" in text and "swarmrl_eval_pass_at_k" in text
    assert service.running is None


def test_the_eval_command_reports_pass_at_k(tmp_path, capsys):
    from trainer.cli import main

    args = ["eval", "--model", "tiny", "--task", "copy", "--option", "digits=2", "--limit", "2"]
    out = tmp_path / "eval.json"
    assert main([*args, "--max-new-tokens", "2", "--k", "3", "--output", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["k"] == 3 and got["n"] == 2 and {"pass@1", "pass@k", "accuracy"} <= set(got)
    assert main([*args, "--k", "0"]) == 2 and "--k" in capsys.readouterr().err


def test_the_coordinator_evaluates_its_published_version_when_training_starts(tmp_path):
    from tests.trainer.pools import tiny_coordinator
    from trainer.config import TrainerConfig, TrainerSection

    config = TrainerConfig(trainer=TrainerSection(eval_every=1, eval_prompts=3, eval_k=2))
    coord = tiny_coordinator(tmp_path, config, digits=2, max_steps=0)

    async def main():
        await coord.training.ensure_published(0)
        await coord.training.train_forever()  # no steps to take: only the starting evaluation

    try:
        trio.run(main)
    finally:
        coord.close()
    (row,) = [json.loads(line) for line in (tmp_path / "logs" / EVALS_FILE).open()]
    assert row["version"] == 0 and row["eval_prompts"] == 3 and row["eval_k"] == 2
