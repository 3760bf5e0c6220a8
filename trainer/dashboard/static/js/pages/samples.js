// Samples: browse the sample log, filtered by step, node, reward and verdict.
import { el, getJSON, num, pill } from "../util.js";

const FIELDS = [
  ["step", "trainer step", "number"],
  ["node", "node (key prefix)", "text"],
  ["min_reward", "min reward", "number"],
  ["max_reward", "max reward", "number"],
];

export function mount(root) {
  const inputs = Object.fromEntries(FIELDS.map(([k, , type]) => [k, el("input", { name: k, type, step: "any", size: 10 })]));
  const verdict = el("select", { name: "verdict" }, ["", "accept", "soft", "hard"].map((v) => el("option", { value: v }, v || "any")));
  const limit = el("select", { name: "limit" }, ["20", "50", "200"].map((v) => el("option", { value: v }, v)));
  const follow = el("input", { type: "checkbox", name: "follow", checked: true });
  const list = el("div", { id: "samples" });
  const count = el("p.muted");
  const form = el("form.filters", { onsubmit: (e) => { e.preventDefault(); load(); } },
    FIELDS.map(([k, label]) => el("label", {}, label, inputs[k])),
    el("label", {}, "verdict", verdict), el("label", {}, "show", limit),
    el("button", { type: "submit" }, "Filter"),
    el("label.inline", {}, follow, "follow new samples"));
  root.append(el("h1", {}, "Samples"), form, count, list);

  function query() {
    const q = new URLSearchParams({ limit: limit.value });
    for (const [k, input] of Object.entries(inputs)) if (input.value !== "") q.set(k, input.value);
    if (verdict.value) q.set("verdict", verdict.value);
    return q;
  }

  function sampleCard(s) {
    const rewards = Object.entries(s.rewards ?? {}).map(([k, v]) => `${k}=${num(v)}`).join(" ");
    return el("div.sample", {},
      el("div.meta", {},
        pill(s.verdict), el("span", {}, `step ${s.trainer_step ?? "–"}`),
        el("span", {}, "node ", el("a", { href: `#/nodes/${s.node}` }, el("code", {}, s.node))),
        el("span", {}, `weights v${s.version ?? "–"}`), el("span", {}, `staleness ${s.staleness ?? "–"}`),
        el("span", {}, `reward ${num(s.reward)}`), rewards ? el("span", {}, rewards) : null,
        el("span", {}, `advantage ${num(s.advantage)}`), el("span", {}, `submission #${s.submission}`)),
      s.prompt !== undefined
        ? el("div.texts", {},
          el("div", {}, el("div.muted", {}, "prompt"), el("pre.prompt", {}, s.prompt)),
          el("div", {}, el("div.muted", {}, "completion"), el("pre.completion", {}, s.completion)))
        : el("p", {}, `rejected (${s.check}): ${s.reason}`));
  }

  async function load() {
    const rows = await getJSON(`/api/samples?${query()}`);
    count.textContent = `${rows.length} newest matching samples`;
    list.replaceChildren(...rows.map(sampleCard));
  }

  let first = true;
  async function refresh() {
    if (first || follow.checked) await load();
    first = false;
  }
  return { refresh };
}
