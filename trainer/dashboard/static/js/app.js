// The dashboard shell: hash routes to pages, and a poll that keeps the shown page live.
import * as nodes from "./pages/nodes.js";
import * as overview from "./pages/overview.js";
import * as samples from "./pages/samples.js";
import * as tryPolicy from "./pages/try.js";
import * as validation from "./pages/validation.js";
import * as weights from "./pages/weights.js";
import { getJSON } from "./util.js";

const POLL_MS = 3000;
const PAGES = {
  overview: overview.mount,
  nodes: nodes.mount,
  validation: validation.mount,
  weights: weights.mount,
  samples: samples.mount,
  try: tryPolicy.mount,
};

let current = null;
let timer = null;
let generation = 0;

function route() {
  const [name = "overview", arg] = location.hash.replace(/^#\/?/, "").split("/");
  // A node's own page sits under the Nodes tab but has its own page name, so a wait for it
  // cannot be satisfied by the list it was opened from.
  if (name === "nodes" && arg) return { name, page: "node", mount: (root) => nodes.mountNode(root, arg) };
  const known = PAGES[name] ? name : "overview";
  return { name: known, page: known, mount: PAGES[known] };
}

async function tick(gen) {
  const dot = document.getElementById("live-dot");
  try {
    const s = await getJSON("/api/status");
    document.getElementById("pool-name").textContent = s.name;
    document.getElementById("pool-id").textContent = s.pool_id.slice(0, 12);
    document.getElementById("badge").textContent = `step ${s.step} · v${s.version}`;
    if (current?.refresh) await current.refresh();
    if (gen !== generation) return;
    dot.className = "dot on";
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded ?? 0) + 1);
  } catch (err) {
    dot.className = "dot err";
    document.getElementById("updated").textContent = `update failed: ${err.detail ?? err.message}`;
  }
  if (gen === generation) timer = setTimeout(() => tick(gen), POLL_MS);
}

function show() {
  clearTimeout(timer);
  current?.destroy?.();
  generation += 1;
  document.body.dataset.loaded = "0";
  const { name, page, mount } = route();
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === name);
  const root = document.getElementById("page");
  root.replaceChildren();
  root.dataset.page = page;
  current = mount(root);
  tick(generation);
}

window.addEventListener("hashchange", show);
show();
