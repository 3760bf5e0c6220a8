// Small helpers shared by the pages: JSON fetches, DOM building, formatting.

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

async function parse(resp) {
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new ApiError(resp.status, body.detail ?? resp.statusText);
  return body;
}

export async function getJSON(path, headers = {}) {
  return parse(await fetch(path, { headers: { accept: "application/json", ...headers } }));
}

export async function postJSON(path, body, headers = {}) {
  return parse(
    await fetch(path, {
      method: "POST",
      headers: { "content-type": "application/json", ...headers },
      body: JSON.stringify(body ?? {}),
    }),
  );
}

// el("div.card", {title: "x"}, child, "text", ...)
export function el(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const node = document.createElement(tag || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

export function table(headers, rows, { rowClick, numeric = [] } = {}) {
  const head = el("tr", {}, headers.map((h, i) => el("th", { class: numeric.includes(i) ? "num" : null }, h)));
  const body = el("tbody");
  for (const r of rows) {
    const tr = el("tr", { class: rowClick ? "link" : null },
      r.cells.map((c, i) => el("td", { class: numeric.includes(i) ? "num" : null }, c)));
    if (rowClick) tr.addEventListener("click", () => rowClick(r));
    if (r.id) tr.dataset.id = r.id;
    body.append(tr);
  }
  if (!rows.length) body.append(el("tr", {}, el("td.muted", { colspan: headers.length }, "nothing yet")));
  return el("div.table-wrap", {}, el("table", {}, el("thead", {}, head), body));
}

export function card(k, v, id) {
  return el("div.card", { "data-k": id ?? null }, el("div.k", {}, k), el("div.v", {}, v ?? "–"));
}

export function pill(text) {
  return el("span.pill." + String(text).replace(/[^a-z]/gi, ""), {}, text);
}

// Unix seconds in the viewer's local time.
export function localTime(t, withDate = false) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  return withDate ? d.toLocaleString() : d.toLocaleTimeString();
}

export function ago(t) {
  if (!t) return "–";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function num(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number.isInteger(x) ? String(x) : Number(x).toFixed(digits);
}

export const short = (key) => (key ? key.slice(0, 12) : "–");

// A verdict's numbers, e.g. "toploc_mismatches=3 max_exp_err=91" (check and timing left out).
export function details(d) {
  if (!d) return "";
  return Object.entries(d)
    .filter(([k]) => k !== "check" && k !== "seconds")
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : typeof v === "number" ? num(v) : v}`)
    .join("  ");
}

export function hardware(h) {
  if (!h) return "–";
  const parts = [h.device_name || h.device];
  if (h.cpu_count) parts.push(`${h.cpu_count} cpu`);
  if (h.memory_bytes) parts.push(bytes(h.memory_bytes));
  if (h.tokens_per_s) parts.push(`${num(h.tokens_per_s, 0)} tok/s`);
  return parts.join(" · ");
}
