// Try the policy: one bounded completion from the newest published weights.
import { el, postJSON } from "../util.js";

export function mount(root) {
  const prompt = el("textarea", { name: "prompt", maxlength: 2000 }, "What is 12 + 34?");
  const maxTokens = el("input", { type: "number", name: "max_tokens", min: 1, max: 64, value: 32, style: "width: 7rem" });
  const sample = el("input", { type: "checkbox", name: "sample" });
  const template = el("input", { type: "checkbox", name: "template", checked: true });
  const button = el("button", { type: "submit" }, "Generate");
  const status = el("p.muted", { id: "try-status" });
  const out = el("pre.out", { id: "completion" });
  const form = el("form", {
    onsubmit: async (e) => {
      e.preventDefault();
      button.disabled = true;
      status.className = "muted";
      status.textContent = "generating…";
      try {
        const r = await postJSON("/api/generate", {
          prompt: prompt.value,
          max_tokens: Number(maxTokens.value),
          sample: sample.checked,
          template: template.checked,
        });
        // Whitespace alone would look like no answer at all: show it escaped, and say so.
        const blank = r.completion.trim() === "";
        out.textContent = blank ? JSON.stringify(r.completion) : r.completion;
        status.textContent = `weights v${r.version} · ${r.tokens} tokens (${r.finish_reason}) in ${r.seconds} s`
          + (blank ? " · only whitespace, shown escaped" : "");
      } catch (err) {
        status.className = "error";
        status.textContent = err.detail ?? String(err);
      } finally {
        button.disabled = false;
      }
    },
  },
    el("label", {}, "prompt", prompt),
    el("div.filters", {},
      el("label", {}, "max new tokens (≤ 64)", maxTokens),
      el("label.inline", {}, sample, "sample with the pool's sampler (else greedy)"),
      el("label.inline", {}, template, "use the task's prompt template"),
      button));
  root.append(
    el("h1", {}, "Try the policy"),
    el("p.muted", {}, "Completes your prompt with the newest published weights, on the coordinator. Requests are rate-limited per visitor."),
    form, status, out);
  return {};
}
