// Overview: the pool at a glance and its numbers over time.
import { TimeChart } from "../charts.js";
import { card, el, getJSON, num } from "../util.js";

// Short runs read better in 10-second buckets; longer ones per minute.
export function bucketFor(seconds) {
  return seconds < 900 ? 10 : 60;
}

const col = (rows, key) => rows.map((r) => r[key] ?? null);

// Off-policy statistics beside staleness (its own chart): each drawn only when steps carry it.
const OFF_POLICY = [
  ["tis_weight_mean", "TIS weight"],
  ["icepop_masked_frac", "masked fraction"],
  ["mismatch_kl", "mismatch KL"],
];

// Columns of the keys some row holds, and their labels: [[ys...], [labels...]].
export function present(rows, keys) {
  const shown = keys.filter(([key]) => rows.some((r) => r[key] != null));
  return [shown.map(([key]) => col(rows, key)), shown.map(([, label]) => label)];
}

export function mount(root) {
  const cards = el("div.cards");
  const charts = el("div.charts");
  root.append(el("h1", {}, "Overview"), cards, el("h2", {}, "Over time"), charts);
  const c = {
    reward: new TimeChart(charts, "Mean reward per step", ["reward"], { id: "reward" }),
    tps: new TimeChart(charts, "Trainer tokens/s", ["tokens/s"], { id: "tokens" }),
    rate: new TimeChart(charts, "Submissions per minute", ["accepted", "rejected"], { id: "submissions" }),
    stale: new TimeChart(charts, "Staleness (versions)", ["mean", "max"], { id: "staleness" }),
    offPolicy: new TimeChart(charts, "Off-policy correction", [], { id: "offpolicy" }),
    evals: new TimeChart(charts, "Held-out evaluation by weight version", [], { id: "eval", xTime: false }),
    latency: new TimeChart(charts, "Validation latency (s)", ["mean", "max"], { id: "latency" }),
  };
  let span = 0;

  async function refresh() {
    const [s, t] = await Promise.all([
      getJSON("/api/status"),
      getJSON(`/api/timeline?bucket=${bucketFor(span)}`),
    ]);
    const steps = t.steps;
    const m = t.minutes;
    if (m.length) span = m[m.length - 1].time - m[0].time;
    const lastReward = steps.length ? steps[steps.length - 1].reward_mean : null;
    cards.replaceChildren(
      card("pool id", el("code", { title: s.pool_id }, s.pool_id.slice(0, 12) + "…"), "pool"),
      card("model", `${s.model} (${s.dtype})`, "model"),
      card("task", s.task, "task"),
      card("algorithm", s.algorithm, "algorithm"),
      card("step", s.step, "step"),
      card("weight version", s.version, "version"),
      card("nodes", `${s.counts.nodes} (${s.counts.banned} banned)`, "nodes"),
      card("submissions (awaiting a verdict)", `${s.counts.submissions} (${s.counts.pending})`, "submissions"),
      card("groups trained / accepted", `${s.counts.trained_groups} / ${s.counts.accepted_groups}`),
      card("last mean reward", num(lastReward), "reward"),
    );
    const xs = col(steps, "time");
    if (t.has_accuracy) c.reward.set([xs, col(steps, "reward_mean"), col(steps, "accuracy")], ["reward", "accuracy"]);
    else c.reward.set([xs, col(steps, "reward_mean")]);
    c.tps.set([xs, col(steps, "tokens_per_s")]);
    c.stale.set([xs, col(steps, "staleness_mean"), col(steps, "staleness_max")]);
    const [offYs, offLabels] = present(steps, OFF_POLICY);
    c.offPolicy.set(offLabels.length ? [xs, ...offYs] : [[]], offLabels);
    const ev = t.evals || [];
    const k = ev.length ? ev[ev.length - 1].k : null;
    const evalKeys = [["eval_accuracy", "greedy accuracy"], ["eval_pass@1", "pass@1"], ["eval_pass@k", k ? `pass@${k}` : "pass@k"], ["eval_mean_reward", "mean reward"], ["eval_rewarded", "games won"]];
    const [evYs, evLabels] = present(ev, evalKeys);
    c.evals.set(evLabels.length ? [col(ev, "version"), ...evYs] : [[]], evLabels);
    // The newest bucket is still filling: rate it over the time it has covered so far.
    const perMin = (b) => 60 / Math.max(1, Math.min(t.bucket, t.time - b.time));
    const mx = col(m, "time");
    c.rate.set([mx, m.map((b) => b.accept * perMin(b)), m.map((b) => (b.soft + b.hard) * perMin(b))]);
    c.latency.set([mx, col(m, "latency_mean"), col(m, "latency_max")]);
  }

  return { refresh, destroy: () => Object.values(c).forEach((x) => x.destroy()) };
}
