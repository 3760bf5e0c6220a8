// Nodes: the table of every node, and one node's page with its verdicts and ban evidence.
import { ago, details, el, getJSON, hardware, localTime, num, pill, postJSON, short, table } from "../util.js";
import { token, tokenForm } from "../operator.js";

export function mount(root) {
  const wrap = el("div", { id: "node-table" });
  const ledger = el("div", { id: "contributions" });
  root.append(
    el("h1", {}, "Nodes"), wrap,
    el("h2", {}, "Contributions ", el("a.small", { href: "/api/contributions?download=1", download: "" }, "download JSON")),
    el("p.muted", {}, "What each node has delivered, most verified tokens first: the base for any reward scheme. "
      + "Validation seconds are the coordinator's time spent checking its work."),
    ledger,
  );

  async function refresh() {
    const [nodes, contributions] = await Promise.all([getJSON("/api/nodes"), getJSON("/api/contributions")]);
    const rows = nodes.map((n) => ({
      id: n.key,
      cells: [
        el("a", { href: `#/nodes/${n.key}` }, el("code", {}, short(n.key))),
        pill(n.status),
        hardware(n.hardware),
        n.engine,
        n.weight_version < 0 ? "–" : `v${n.weight_version}`,
        el("span", { title: localTime(n.last_seen, true) }, ago(n.last_seen)),
        n.accepted, n.soft_rejected, n.hard_rejected,
        num(n.reputation, 1),
      ],
    }));
    wrap.replaceChildren(
      table(
        ["node", "status", "hardware", "engine", "weights", "last heartbeat", "accepted", "soft-rejected", "hard-rejected", "reputation"],
        rows,
        { rowClick: (r) => (location.hash = `#/nodes/${r.id}`), numeric: [6, 7, 8, 9] },
      ),
    );
    ledger.replaceChildren(
      table(
        ["node", "status", "groups accepted / trained", "verified tokens", "validation s",
          "leases issued / open / expired / released", "soft faults", "refused for rate",
          "rejected hard / soft"],
        contributions.map((c) => ({
          id: c.key,
          cells: [
            el("a", { href: `#/nodes/${c.key}` }, el("code", {}, short(c.key))),
            [pill(c.banned ? "banned" : c.status), c.probation ? " probation" : ""],
            `${c.accepted_groups} / ${c.trained_groups}`,
            c.verified_tokens,
            num(c.validation_s, 1),
            `${c.leases_issued} / ${c.leases_open} / ${c.leases_expired} / ${c.leases_released}`,
            c.soft_faults,
            c.rate_refusals,
            `${c.hard_rejected} / ${c.soft_rejected}`,
          ],
        })),
        { numeric: [2, 3, 4, 5, 6, 7, 8] },
      ),
    );
  }
  return { refresh };
}

export function mountNode(root, key) {
  const head = el("div");
  const evidence = el("div");
  const verdicts = el("div");
  const action = el("div");
  root.append(
    el("p", {}, el("a", { href: "#/nodes" }, "← all nodes")),
    el("h1", {}, "Node ", el("code", {}, short(key))),
    head, evidence, el("h2", {}, "Recent verdicts"), verdicts, action,
  );
  let banned = null;

  function renderAction(n) {
    if (banned === (n.status === "banned")) return;
    banned = n.status === "banned";
    if (banned) return action.replaceChildren();
    const msg = el("span.muted");
    const reason = el("input", { name: "reason", placeholder: "reason", value: "banned by the operator" });
    const button = el("button.danger", { type: "submit" }, "Ban this node");
    const form = el("form.filters", {
      onsubmit: async (e) => {
        e.preventDefault();
        button.disabled = true;
        try {
          const r = await postJSON(`/api/nodes/${key}/ban?reason=${encodeURIComponent(reason.value)}`, {},
            { authorization: `Bearer ${token()}` });
          msg.className = "ok";
          msg.textContent = `banned; ${r.revoked_leases.length} leases revoked`;
        } catch (err) {
          msg.className = "error";
          msg.textContent = err.detail ?? String(err);
        } finally {
          button.disabled = false;
        }
      },
    }, tokenForm(), el("label", {}, "reason", reason), button, msg);
    action.replaceChildren(el("h2", {}, "Operator"), form);
  }

  async function refresh() {
    const n = await getJSON(`/api/nodes/${key}?limit=100`);
    head.replaceChildren(
      el("dl.kv", {},
        el("dt", {}, "key"), el("dd", {}, el("code", {}, n.key)),
        el("dt", {}, "peer id"), el("dd", {}, el("code", {}, n.peer_id)),
        el("dt", {}, "status"), el("dd", {}, pill(n.status)),
        el("dt", {}, "hardware"), el("dd", {}, hardware(n.hardware)),
        el("dt", {}, "engine"), el("dd", {}, n.engine),
        el("dt", {}, "weights held"), el("dd", {}, n.weight_version < 0 ? "–" : `v${n.weight_version}`),
        el("dt", {}, "joined"), el("dd", {}, localTime(n.joined_at, true)),
        el("dt", {}, "last heartbeat"), el("dd", {}, `${localTime(n.last_seen, true)} (${ago(n.last_seen)})`),
        el("dt", {}, "accepted / soft / hard"), el("dd", {}, `${n.accepted} / ${n.soft_rejected} / ${n.hard_rejected}`),
        el("dt", {}, "reputation"), el("dd", {}, num(n.reputation, 2)),
      ),
    );
    if (n.banned_at) {
      const ev = n.evidence;
      evidence.replaceChildren(
        el("h2", {}, "Ban"),
        el("dl.kv", { id: "ban" },
          el("dt", {}, "banned at"), el("dd", {}, localTime(n.banned_at, true)),
          el("dt", {}, "reason"), el("dd", {}, n.ban_reason),
          el("dt", {}, "evidence"), el("dd", {}, ev
            ? el("span", {}, `submission #${ev.id} (${ev.raw_bytes} signed bytes kept), ${ev.outcome}: ${ev.reason} `,
              el("code", {}, details(ev.details)), " ", el("a", { href: `/api/submissions/${ev.id}` }, "JSON"))
            : "none (banned by the operator)"),
        ),
      );
    } else evidence.replaceChildren();
    verdicts.replaceChildren(
      table(
        ["#", "received", "outcome", "check", "reason", "numbers"],
        n.verdicts.map((v) => ({
          cells: [v.id, localTime(v.received_at), pill(v.outcome ?? "pending"), v.outcome ? v.check : "", v.reason ?? "", el("code", {}, details(v.details))],
        })),
        { numeric: [0] },
      ),
    );
    renderAction(n);
  }
  return { refresh };
}
