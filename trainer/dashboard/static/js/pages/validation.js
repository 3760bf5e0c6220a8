// Validation: verdict counts by outcome and reason over time, and the latest rejections.
import { TimeChart } from "../charts.js";
import { bucketFor } from "./overview.js";
import { card, details, el, getJSON, localTime, pill, short, table } from "../util.js";

export function mount(root) {
  const cards = el("div.cards");
  const charts = el("div.charts");
  const reasons = el("div");
  const recent = el("div");
  root.append(
    el("h1", {}, "Validation"), cards,
    el("h2", {}, "Over time"), charts,
    el("h2", {}, "By outcome and check"), reasons,
    el("h2", {}, "Most recent rejections"), recent,
  );
  const byKey = new TimeChart(charts, "Verdicts per bucket, by outcome:check", ["accept"], { id: "verdicts" });
  const latency = new TimeChart(charts, "Validation latency (s)", ["mean", "max"], { id: "latency" });
  let span = 0;

  async function refresh() {
    const v = await getJSON(`/api/validation?limit=50&bucket=${bucketFor(span)}`);
    const m = v.minutes;
    if (m.length) span = m[m.length - 1].time - m[0].time;
    cards.replaceChildren(
      card("accepted", v.totals.accept ?? 0, "accept"),
      card("soft-rejected", v.totals.soft ?? 0, "soft"),
      card("hard-rejected", v.totals.hard ?? 0, "hard"),
      card("pending", v.totals.pending ?? 0, "pending"),
    );
    const keys = Object.keys(v.by_key).slice(0, 8);
    const xs = m.map((b) => b.time);
    byKey.set([xs, ...keys.map((k) => m.map((b) => b.by_key[k] ?? 0))], keys.length ? keys : ["accept"]);
    latency.set([xs, m.map((b) => b.latency_mean), m.map((b) => b.latency_max)]);
    reasons.replaceChildren(
      table(["outcome", "check", "count"],
        Object.entries(v.by_key).map(([k, n]) => {
          const [outcome, check] = k.split(":");
          return { cells: [pill(outcome), check ?? "", n] };
        }), { numeric: [2] }),
    );
    recent.replaceChildren(
      table(["#", "time", "node", "outcome", "failing check", "reason", "numbers"],
        v.rejections.map((r) => ({
          cells: [
            r.id, localTime(r.decided_at ?? r.received_at),
            el("a", { href: `#/nodes/${r.node}` }, el("code", {}, short(r.node))),
            pill(r.outcome), r.check ?? "", r.reason ?? "", el("code", {}, details(r.details)),
          ],
        })), { numeric: [0] }),
      el("p.muted", {}, `counts cover the last ${v.window} submissions`),
    );
  }
  return { refresh, destroy: () => { byKey.destroy(); latency.destroy(); } };
}
