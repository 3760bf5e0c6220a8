// The operator token, kept for this browser tab only; sent as `Authorization: Bearer`.
import { el } from "./util.js";

const KEY = "swarmrl-operator-token";

export function token() {
  return sessionStorage.getItem(KEY) ?? "";
}

// The header that shows the operator what anonymous visitors do not see (none without a token:
// a wrong one would make every read fail with 403).
export function operatorHeaders() {
  return token() ? { authorization: `Bearer ${token()}` } : {};
}

export function tokenForm(onChange) {
  const input = el("input", { type: "password", name: "token", placeholder: "operator token", value: token(), autocomplete: "off" });
  input.addEventListener("change", () => {
    sessionStorage.setItem(KEY, input.value);
    onChange?.();
  });
  return el("label", {}, "operator token", input);
}
