// The operator token, kept for this browser tab only; sent as `Authorization: Bearer`.
import { el } from "./util.js";

const KEY = "swarmrl-operator-token";

export function token() {
  return sessionStorage.getItem(KEY) ?? "";
}

export function tokenForm() {
  const input = el("input", { type: "password", name: "token", placeholder: "operator token", value: token(), autocomplete: "off" });
  input.addEventListener("change", () => sessionStorage.setItem(KEY, input.value));
  return el("label", {}, "operator token", input);
}
