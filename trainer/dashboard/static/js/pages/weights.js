// Weights: published versions, who holds which version (origin → relays → nodes), bytes served.
import { bytes, el, getJSON, localTime, pill, short, table } from "../util.js";

const held = (versions) =>
  versions && versions.length ? versions.map((v) => `v${v.version}${v.complete === false ? " (partial)" : ""}`).join(", ") : "none";

export function mount(root) {
  const versions = el("div");
  const tree = el("div");
  const served = el("div");
  root.append(
    el("h1", {}, "Weights"),
    el("h2", {}, "Versions published"), versions,
    el("h2", {}, "Relay tree"), tree,
    el("h2", {}, "Bytes served by the origin"), served,
  );

  async function refresh() {
    const w = await getJSON("/api/weights");
    const atOrigin = new Set(w.origin.versions.map((v) => v.version));
    versions.replaceChildren(
      table(["version", "kind", "base", "payload size", "published", "at origin"],
        [...w.versions].reverse().map((v) => ({
          cells: [`v${v.version}`, v.kind, v.base === null ? "–" : `v${v.base}`, bytes(v.bytes), localTime(v.published_at, true), atOrigin.has(v.version) ? "yes" : "pruned"],
        })), { numeric: [3] }),
    );
    const nodeItem = (n) => el("li", {}, "node ", el("a", { href: `#/nodes/${n.key}` }, el("code", {}, short(n.key))),
      " holds ", el("strong", {}, n.weight_version < 0 ? "nothing yet" : `v${n.weight_version}`), " ", pill(n.status));
    tree.replaceChildren(
      el("ul.tree", { id: "relay-tree" },
        el("li", {}, el("strong", {}, "origin "), el("code", {}, w.origin.url ?? "–"), ` holds ${held(w.origin.versions)}`,
          el("ul", {},
            w.relays.map((r) => el("li", {}, el("strong", {}, "relay "), el("code", {}, r.url),
              r.node ? [" (node ", el("code", {}, short(r.node)), ")"] : " (from the pool spec)",
              r.error ? el("span.error", {}, ` unreachable: ${r.error}`) : ` holds ${held(r.versions)}`,
              r.served != null ? el("span.muted", {}, ` · served ${bytes(r.served)} (its own count)`) : null)),
            w.nodes.map(nodeItem),
          ),
        ),
      ),
      el("p.muted", {}, `current version v${w.current}; nodes fetch from the origin or any relay, fastest first`),
    );
    const s = w.served;
    served.replaceChildren(
      s ? el("div", {},
        el("p", {}, el("strong", { id: "served-total" }, bytes(s.total)), ` in ${s.requests} requests`),
        table(["version", "bytes"], Object.entries(s.by_version).map(([v, n]) => ({ cells: [`v${v}`, bytes(n)] })), { numeric: [1] }),
        el("h2", {}, "By client address"),
        table(["client", "bytes"], Object.entries(s.by_client).map(([c, n]) => ({ cells: [c, bytes(n)] })), { numeric: [1] }),
      ) : el("p.muted", {}, "not counted"),
    );
  }
  return { refresh };
}
