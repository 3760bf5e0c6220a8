"""The dashboard's data helpers: chart series, verdict buckets, the sample log's tail, the rate
limit, byte counting."""

import json

import trio

from protocol.ratelimit import client_key
from shardcast.traffic import CountServed, ServedBytes
from trainer.dashboard.limits import RateLimiter
from trainer.dashboard.series import (
    OFF_POLICY_KEYS,
    SampleLog,
    accuracy_by_step,
    check_of,
    eval_series,
    minute_buckets,
    read_samples,
    step_series,
    tail_lines,
    verdict_key,
)
from trainer.metrics import EVALS_FILE, RunLog


def test_minute_buckets_fill_gaps_and_split_by_check():
    verdicts = [
        {"outcome": "accept", "decided_at": 600.5, "details": {"check": "reward", "seconds": 0.2}},
        {"outcome": "hard", "decided_at": 610.0, "details": {"check": "toploc", "seconds": 0.4}},
        {"outcome": "hard", "decided_at": 790.0, "details": {"code": "bad_request"}},
        {"outcome": None, "decided_at": None, "details": {}},
    ]
    out = minute_buckets(verdicts, 60.0)
    assert [b["time"] for b in out] == [600.0, 660.0, 720.0, 780.0]
    assert out[0]["accept"] == 1 and out[0]["hard"] == 1
    assert out[0]["by_key"] == {"accept": 1, "hard:toploc": 1}
    assert abs(out[0]["latency_mean"] - 0.3) < 1e-9
    assert out[0]["latency_max"] == 0.4
    assert out[1]["accept"] == out[1]["hard"] == 0 and out[1]["latency_mean"] is None
    assert out[3]["by_key"] == {"hard:transport": 1}
    assert minute_buckets([]) == []
    newest = minute_buckets(verdicts, 60.0, max_buckets=2)
    assert [b["time"] for b in newest] == [720.0, 780.0]


def test_check_of_names_refusals_before_validation():
    assert check_of({"details": {"check": "sampling"}}) == "sampling"
    assert check_of({"details": {"lease_id": 3}}) == "lease"
    assert check_of({"details": {"code": "too_large"}}) == "transport"
    assert check_of({"details": None}) == "other"
    assert verdict_key({"outcome": "accept", "details": {}}) == "accept"
    assert verdict_key({"outcome": "soft", "details": {"check": "staleness"}}) == "soft:staleness"


def test_accuracy_pairs_samples_with_the_step_they_fed(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [
        {"trainer_step": 0, "rewards": {"exact_numeric": 1.0}},
        {"trainer_step": 0, "rewards": {"exact_numeric": 0.0}},
        {"trainer_step": 1, "rewards": {"exact_numeric": 1.0}},
        {"trainer_step": 1, "verdict": "hard"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"half a li')
    samples = read_samples(path)
    assert len(samples) == 4  # the torn last line is skipped
    assert accuracy_by_step(samples) == {0: 0.5, 1: 1.0}
    steps = [
        {"step": 1, "finished_at": 10.0, "metrics": {"reward_mean": 0.5, "tokens_per_s": 9.0}},
        {"step": 2, "finished_at": 20.0, "metrics": {"reward_mean": 0.7}},
    ]
    series = step_series(steps, samples, has_accuracy=True)
    assert [p["accuracy"] for p in series] == [0.5, 1.0]
    assert series[0]["tokens_per_s"] == 9.0 and series[1]["tokens_per_s"] is None
    assert [p["accuracy"] for p in step_series(steps, samples, has_accuracy=False)] == [None] * 2
    assert read_samples(tmp_path / "missing.jsonl") == []


def test_rate_limiter_allows_a_burst_then_one_per_interval():
    limit = RateLimiter(every_s=2.0, burst=3)
    assert [limit.allow("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limit.allow("a", now=0.0)
    assert 1.9 < wait <= 2.0
    assert limit.allow("b", now=0.0) == 0.0  # per client
    assert limit.allow("a", now=1.0) > 0
    assert limit.allow("a", now=2.1) == 0.0


def test_the_tail_drops_the_line_its_window_cuts(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2}\n')
    assert tail_lines(path, 12) == [b'{"i": 2}', b""]  # `1}` of the cut line is left out
    assert [r["i"] for r in read_samples(path, 12)] == [2]
    assert [r["i"] for r in read_samples(path)] == [0, 1, 2]
    path.write_bytes(b'[1, 2]\n"text"\n\xff\xfe\n{"i": 3}\n')  # JSON, but not a record
    assert read_samples(path) == [{"i": 3}]
    assert tail_lines(tmp_path / "missing.jsonl") == []


def test_the_sample_log_is_reread_only_when_it_changed(tmp_path):
    path = tmp_path / "samples.jsonl"
    log = SampleLog(path)
    assert log.records() == []
    path.write_text('{"i": 0}\n')
    first = log.records()
    assert first == [{"i": 0}] and log.records() is first  # cached
    with path.open("a") as f:
        f.write('{"i": 1}\n')
    assert log.records() == [{"i": 0}, {"i": 1}]


def test_rate_limiter_table_stays_bounded_and_forgets_the_oldest():
    limit = RateLimiter(every_s=2.0, burst=1, max_clients=3)
    for i in range(10):
        assert limit.allow(f"10.0.0.{i}", now=float(i)) == 0.0
    assert len(limit) == 3
    assert limit.allow("10.0.0.9", now=9.5) > 0  # the newest is remembered
    assert limit.allow("10.0.0.0", now=9.5) == 0.0  # the oldest was forgotten


def test_ipv6_clients_are_counted_by_their_64():
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::1") != client_key("2001:db8::1")
    assert client_key("10.0.0.2") == "10.0.0.2" == client_key("::ffff:10.0.0.2")
    assert client_key("testclient") == "testclient"


def test_served_bytes_are_counted_by_version_and_client():
    served = ServedBytes()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x" * 100, "more_body": True})
        await send({"type": "http.response.body", "body": b"y" * 23})

    async def main():
        sent = []

        async def send(m):
            sent.append(m)

        wrapped = CountServed(app, served)
        scope = {"type": "http", "path": "/v/7/f/model.safetensors", "client": ("10.0.0.2", 5)}
        await wrapped(scope, None, send)
        await wrapped({"type": "http", "path": "/versions", "client": ("10.0.0.3", 9)}, None, send)
        assert len(sent) == 6

    trio.run(main)
    snap = served.snapshot()
    assert snap["total"] == 246 and snap["requests"] == 2
    assert snap["by_version"] == {"7": 123}
    assert snap["by_client"] == {"10.0.0.2": 123, "10.0.0.3": 123}


def test_step_series_carries_the_off_policy_statistics_a_step_has():
    steps = [
        {"step": 1, "finished_at": 1.0, "metrics": {"staleness_mean": 0.5, "mismatch_kl": 0.01}},
        {"step": 2, "finished_at": 2.0, "metrics": {"tis_weight_mean": 0.9}},
    ]
    a, b = step_series(steps, [], has_accuracy=False)
    assert a["staleness_mean"] == 0.5 and a["mismatch_kl"] == 0.01 and a["tis_weight_mean"] is None
    assert b["tis_weight_mean"] == 0.9 and b["icepop_masked_frac"] is None
    assert all(k in a and k in b for k in OFF_POLICY_KEYS)


def test_eval_series_orders_versions_and_keeps_the_newest_record_of_each():
    records = [
        {"version": 4, "time": 5.0, "eval_accuracy": 0.5, "eval_k": 4.0, "eval_pass@k": 0.75},
        {"version": 0, "time": 1.0, "eval_accuracy": 0.0},
        {"version": 4, "time": 9.0, "eval_accuracy": 0.25},  # re-evaluated after a restart
        {"time": 3.0, "eval_accuracy": 1.0},  # no version: not a point
        {"version": "2", "eval_accuracy": 1.0},
    ]
    out = eval_series(records)
    assert [p["version"] for p in out] == [0, 4]
    assert out[1] == {
        "version": 4,
        "time": 9.0,
        "k": None,
        "eval_accuracy": 0.25,
        "eval_pass@1": None,
        "eval_pass@k": None,
        "eval_mean_reward": None,
        "eval_rewarded": None,
    }
    assert out[0]["eval_pass@1"] is None and eval_series([]) == []


def test_the_timeline_serves_the_run_logs_evaluations(tmp_path):
    from fastapi.testclient import TestClient

    from tests.trainer.test_api_view import FakeOperator, FakeView
    from trainer.api import create_api

    view = FakeView(tmp_path)
    client = TestClient(create_api(view, FakeOperator(), None), backend="trio")
    assert client.get("/api/timeline").json()["evals"] == []  # no evaluation yet: no file
    log = RunLog(tmp_path)
    log.evaluated(0, {"eval_accuracy": 0.0, "eval_pass@1": 0.1, "eval_pass@k": 0.3, "eval_k": 4})
    log.evaluated(2, {"eval_accuracy": 0.5})
    assert (tmp_path / EVALS_FILE).exists()
    body = (
        TestClient(create_api(view, FakeOperator(), None), backend="trio")
        .get("/api/timeline")
        .json()
    )
    assert [(p["version"], p["eval_accuracy"]) for p in body["evals"]] == [(0, 0.0), (2, 0.5)]
    assert body["evals"][0]["eval_pass@k"] == 0.3 and body["evals"][0]["k"] == 4
    assert body["steps"][0]["mismatch_kl"] is None  # a step without the statistic
