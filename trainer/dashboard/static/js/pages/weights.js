// Weights: published versions, who holds which version and fetched it from where
// (origin → relays → nodes), bytes served.
import { operatorHeaders, tokenForm } from "../operator.js";
import { bytes, el, getJSON, localTime, pill, short, table } from "../util.js";

const held = (versions) => (versions && versions.length ? versions.map((v) => `v${v}`).join(", ") : "none");

export function mount(root) {
  const versions = el("div");
  const tree = el("div");
  const served = el("div");
  // Outside what each refresh redraws, so typing the token is not interrupted.
  const hidden = el("div", { id: "clients-hidden", hidden: true },
    el("p.muted", {}, "Client addresses are shown to the operator only."),
    el("div.filters", {}, tokenForm(() => refresh())));
  root.append(
    el("h1", {}, "Weights"),
    el("h2", {}, "Versions published"), versions,
    el("h2", {}, "Relay tree"), tree,
    el("h2", {}, "Bytes served by the origin"), served, hidden,
  );

  async function refresh() {
    const w = await getJSON("/api/weights", operatorHeaders());
    const atOrigin = new Set(w.origin.versions);
    versions.replaceChildren(
      table(["version", "kind", "base", "payload size", "published", "at origin"],
        [...w.versions].reverse().map((v) => ({
          cells: [`v${v.version}`, v.kind, v.base === null ? "–" : `v${v.base}`, bytes(v.bytes), localTime(v.published_at, true), atOrigin.has(v.version) ? "yes" : "pruned"],
        })), { numeric: [3] }),
    );
    // Each node sits under the source it says it fetched most of its weights from.
    const norm = (u) => (u ?? "").replace(/\/+$/, "");
    // A relay's URL is hidden from anonymous visitors until it passed the coordinator's check.
    const fedBy = (url) => (url ? w.nodes.filter((n) => norm(n.source) === norm(url)) : []);
    const isRelay = (url) => w.relays.some((r) => r.url && norm(r.url) === norm(url));
    const fedByOrigin = w.nodes.filter((n) => !isRelay(n.source));  // or unknown, or not reported
    const fetched = (n) => {
      if (!n.source) return el("span.muted", {}, " · no download reported yet");
      const total = Object.values(n.fetched).reduce((a, b) => a + b, 0);
      const share = `${Math.round((100 * n.fetched[n.source]) / total)}%`;
      const here = isRelay(n.source) || norm(n.source) === norm(w.origin.url);
      return el("span.muted", {}, ` · fetched ${bytes(total)}, ${share} `,
        here ? "from here" : ["from ", el("code", {}, n.source)]);
    };
    const nodeItem = (n) => el("li.holder", { "data-key": n.key, "data-source": n.source ?? "" },
      "node ", el("a", { href: `#/nodes/${n.key}` }, el("code", {}, short(n.key))),
      " holds ", el("strong", {}, n.weight_version < 0 ? "nothing yet" : `v${n.weight_version}`), " ", pill(n.status), fetched(n));
    tree.replaceChildren(
      el("ul.tree", { id: "relay-tree" },
        el("li", {}, el("strong", {}, "origin "), el("code", {}, w.origin.url ?? "–"), ` holds ${held(w.origin.versions)}`,
          el("ul", {},
            w.relays.map((r) => el("li.relay", { "data-url": r.url }, el("strong", {}, "relay "), el("code", {}, r.url ?? "address hidden"),
              r.node ? [" (node ", el("code", {}, short(r.node)), ")"] : " (from the pool spec)",
              r.error ? el("span.error", {}, ` failed its check: ${r.error}`) : ` holds ${held(r.versions)}`,
              r.verified ? null : el("span.muted", {}, " · not handed out (unverified)"),
              r.served != null ? el("span.muted", {}, ` · served ${bytes(r.served)} (its own count)`) : null,
              el("ul", {}, fedBy(r.url).map(nodeItem)))),
            fedByOrigin.map(nodeItem),
          ),
        ),
      ),
      el("p.muted", {}, `current version v${w.current}; nodes fetch from the origin or any relay, fastest first, `
        + "and each sits under the source it reports most of its bytes from (its own word); "
        + "relays as the coordinator last checked them"),
    );
    const s = w.served;
    hidden.hidden = !s || Boolean(s.by_client);
    served.replaceChildren(
      s ? el("div", {},
        el("p", {}, el("strong", { id: "served-total" }, bytes(s.total)), ` in ${s.requests} requests`),
        table(["version", "bytes"], Object.entries(s.by_version).map(([v, n]) => ({ cells: [`v${v}`, bytes(n)] })), { numeric: [1] }),
        el("h2", {}, "By client address"),
        s.by_client
          ? table(["client", "bytes"], Object.entries(s.by_client).map(([c, n]) => ({ cells: [c, bytes(n)] })), { numeric: [1] })
          : null,
      ) : el("p.muted", {}, "not counted"),
    );
  }
  return { refresh };
}
