// Building blocks of the console's pages: elements (built with the DOM, never from HTML
// strings, so nothing the gateway returns can become markup), tables, dialogs, toasts, form
// fields with validation messages, and the formats numbers and times are shown in.

import { ApiError } from "./api.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "value") el.value = value;
    else if (name === "checked" || name === "disabled" || name === "hidden" || name === "selected") el[name] = Boolean(value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

// --- formats ---------------------------------------------------------------------------

const dateTime = new Intl.DateTimeFormat(undefined, {
  year: "numeric", month: "short", day: "2-digit", hour: "2-digit", minute: "2-digit", second: "2-digit",
});
const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export const fmt = {
  time(unix) {
    if (!unix) return "—";
    return dateTime.format(new Date(unix * 1000));
  },
  ago(unix) {
    if (!unix) return "—";
    const s = Math.max(0, Date.now() / 1000 - unix);
    if (s < 60) return `${Math.round(s)} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    if (s < 86400) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  },
  int(n) {
    return n === undefined || n === null ? "—" : integer.format(n);
  },
  // Fixed-point dollars: never 1.14e-05.
  cost(usd) {
    if (usd === undefined || usd === null) return "—";
    const v = Number(usd);
    if (v === 0) return "$0.00";
    if (Math.abs(v) >= 1) return `$${v.toFixed(2)}`;
    if (Math.abs(v) >= 0.01) return `$${v.toFixed(4)}`;
    return `$${v.toFixed(6)}`;
  },
  ms(v) {
    if (v === undefined || v === null || Number.isNaN(v)) return "—";
    return v >= 10000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`;
  },
  compact(n) {
    if (!n) return "0";
    if (n >= 1e9) return `${+(n / 1e9).toFixed(1)}B`;
    if (n >= 1e6) return `${+(n / 1e6).toFixed(1)}M`;
    if (n >= 1e3) return `${+(n / 1e3).toFixed(1)}k`;
    return String(n);
  },
};

export function timeCell(unix) {
  return h("span", { title: fmt.time(unix) }, fmt.ago(unix));
}

// --- page pieces -------------------------------------------------------------------------

export function pageHead(title, subtitle, ...actions) {
  return h("div", { class: "page-head" }, h("div", {}, h("h1", { text: title }), subtitle && h("p", { text: subtitle })),
    h("div", { class: "actions" }, ...actions));
}

export function card(title, subtitle, body, ...actions) {
  return h("section", { class: "card" },
    h("div", { class: "card-head" }, h("div", {}, h("h2", { text: title }), subtitle && h("p", { text: subtitle })),
      h("div", { class: "actions" }, ...actions)),
    body);
}

export function button(label, onclick, { kind = "", small = false, ...attrs } = {}) {
  const cls = ["btn", kind, small ? "small" : ""].filter(Boolean).join(" ");
  return h("button", { type: "button", class: cls, onclick, ...attrs }, label);
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}`.trim() }, text);
}

export function empty(title, text, ...actions) {
  return h("div", { class: "empty" }, h("h3", { text: title }), text && h("p", { text }), h("div", { class: "actions" }, ...actions));
}

export function loading(text = "Loading…") {
  return h("div", { class: "empty" }, h("p", { text }));
}

// columns: [{ label, value: (row) => node|string, num?: bool }]
export function table(columns, rows, { id, rowKey, emptyNode } = {}) {
  if (!rows.length && emptyNode) return emptyNode;
  const head = h("tr", {}, columns.map((c) => h("th", { class: c.num ? "num" : "" }, c.label)));
  const body = rows.map((row) =>
    h("tr", { dataset: rowKey ? { id: rowKey(row) } : {} },
      columns.map((c) => h("td", { class: c.num ? "num" : c.actions ? "actions-cell" : "" }, c.value(row)))));
  return h("div", { class: "table-wrap" }, h("table", { class: "data", id }, h("thead", {}, head), h("tbody", {}, body)));
}

// --- toasts ------------------------------------------------------------------------------

export function toast(message, { title, kind = "info", timeout = 6000 } = {}) {
  const box = document.getElementById("toasts");
  const node = h("div", { class: `toast ${kind}`, role: kind === "error" ? "alert" : "status" },
    h("div", { class: "toast-text" }, title && h("div", { class: "toast-title" }, title), h("div", { class: "toast-msg" }, message)),
    h("button", { type: "button", class: "btn ghost small", "aria-label": "Dismiss", onclick: () => node.remove() }, "×"));
  box.append(node);
  if (timeout) setTimeout(() => node.remove(), timeout);
  return node;
}

// An error as the gateway put it: OpenAI's error object's message, with its status and code.
export function errorToast(error, title = "Request failed") {
  if (error instanceof ApiError) {
    const tag = [error.status, error.code || error.type].filter(Boolean).join(" · ");
    return toast(error.message, { title: `${title} (${tag})`, kind: "error", timeout: 10000 });
  }
  return toast(String(error?.message || error), { title, kind: "error", timeout: 10000 });
}

// --- dialogs -----------------------------------------------------------------------------

// A modal dialog; `build(close)` returns its body and footer buttons. Resolves with what
// `close(value)` was given (undefined when dismissed).
export function modal(title, build, { id, wide = false } = {}) {
  return new Promise((resolve) => {
    const dialog = h("dialog", { class: "modal", id });
    if (wide) dialog.classList.add("wide");
    let result;
    const close = (value) => {
      result = value;
      dialog.close();
    };
    const { body, actions } = build(close);
    dialog.append(
      h("div", { class: "modal-head" }, h("h2", { text: title }),
        h("button", { type: "button", class: "btn ghost small", "aria-label": "Close", onclick: () => close(undefined) }, "×")),
      h("div", { class: "modal-body" }, body),
      h("div", { class: "modal-foot" }, actions));
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(result);
    });
    document.body.append(dialog);
    dialog.showModal();
    const first = dialog.querySelector("input:not([type=hidden]), select, textarea");
    if (first) first.focus();
  });
}

export function confirm(title, text, { confirmLabel = "Confirm", danger = false } = {}) {
  return modal(title, (close) => ({
    body: h("p", { text }),
    actions: [
      button("Cancel", () => close(false)),
      button(confirmLabel, () => close(true), { kind: danger ? "danger solid" : "primary", id: "confirm-ok" }),
    ],
  }), { id: "confirm-dialog" }).then(Boolean);
}

// A secret shown this once: the dialog is the only place it ever is, and it is gone when closed.
export function showSecret(title, secret, note) {
  return modal(title, (close) => {
    const code = h("code", { id: "secret-value" }, secret);
    const copy = button("Copy", async () => {
      try {
        await navigator.clipboard.writeText(secret);
        copy.textContent = "Copied";
      } catch {
        const range = document.createRange();
        range.selectNodeContents(code);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        copy.textContent = "Selected: press Ctrl+C";
      }
    }, { small: true });
    return {
      body: [
        h("div", { class: "callout warn" }, "Copy this secret now. It is shown only this once: the gateway keeps only a digest of it."),
        h("div", { class: "secret-box" }, code, copy),
        note && h("p", { class: "muted", text: note }),
      ],
      actions: [button("Done", () => close(true), { kind: "primary", id: "secret-done" })],
    };
  }, { id: "secret-dialog" });
}

// --- forms -------------------------------------------------------------------------------

// A labelled input. `param` names the request parameter, so a 400 naming it lands here.
export function field(label, input, { help, param } = {}) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  if (param) input.dataset.param = param;
  return h("div", { class: "field" },
    h("label", { for: id }, label), input, help && h("span", { class: "help", text: help }),
    h("p", { class: "field-error", role: "alert" }));
}

export function input(name, { type = "text", value = "", placeholder = "", required = false, min, step, max } = {}) {
  return h("input", { name, type, value, placeholder, required, min, step, max, spellcheck: "false", autocomplete: "off" });
}

export function select(name, options, value) {
  return h("select", { name },
    options.map((o) => {
      const [v, label] = Array.isArray(o) ? o : [o, o];
      return h("option", { value: v, selected: v === value }, label);
    }));
}

export function checkbox(name, label, checked = false) {
  const box = h("input", { type: "checkbox", name, checked });
  return h("label", { class: "check" }, box, label);
}

export function setError(form, name, message) {
  const target = form.querySelector(`[data-param="${CSS.escape(name)}"]`) || form.querySelector(`[name="${CSS.escape(name)}"]`);
  if (!target) return false;
  target.classList.add("invalid");
  const box = target.closest(".field")?.querySelector(".field-error");
  if (box) box.textContent = message;
  return true;
}

export function clearErrors(form) {
  form.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  form.querySelectorAll(".field-error").forEach((el) => (el.textContent = ""));
}

// Show a refused request where it belongs: on its field when the gateway named the
// parameter, else as a toast.
export function showFormError(form, error) {
  if (error instanceof ApiError && error.param && setError(form, error.param, error.message)) return;
  errorToast(error);
}

// --- limits (keys and orgs share them) ---------------------------------------------------

export const LIMITS = [
  ["rpm", "Requests / min", "1"],
  ["tpm", "Tokens / min", "1"],
  ["max_concurrent", "In flight", "1"],
  ["max_tokens", "Max tokens / request", "1"],
  ["tokens_per_day", "Tokens / day", "1"],
  ["tokens_per_month", "Tokens / month", "1"],
  ["usd_per_day", "USD / day", "0.01"],
  ["usd_per_month", "USD / month", "0.01"],
];

export function limitsFields(limits = {}) {
  return h("div", { class: "grid-4" },
    LIMITS.map(([name, label, step]) =>
      field(label, input(`limit.${name}`, { type: "number", min: "0", step, value: limits[name] ?? "", placeholder: "no limit" }),
        { param: `limits.${name}` })));
}

// The limits a form holds; empty fields mean "no limit". Returns null (and marks the field)
// when a value is not a number >= 0.
export function readLimits(form) {
  const out = {};
  let ok = true;
  for (const [name, , step] of LIMITS) {
    const el = form.querySelector(`[name="limit.${name}"]`);
    const raw = el.value.trim();
    if (!raw) continue;
    const v = Number(raw);
    if (!Number.isFinite(v) || v < 0 || (step === "1" && !Number.isInteger(v))) {
      setError(form, `limits.${name}`, step === "1" ? "A whole number, 0 or more." : "A number, 0 or more.");
      ok = false;
      continue;
    }
    out[name] = v;
  }
  return ok ? out : null;
}

export function limitsSummary(limits) {
  const parts = [];
  const l = limits || {};
  if (l.rpm) parts.push(`${fmt.compact(l.rpm)} rpm`);
  if (l.tpm) parts.push(`${fmt.compact(l.tpm)} tpm`);
  if (l.max_concurrent) parts.push(`${l.max_concurrent} in flight`);
  if (l.max_tokens) parts.push(`≤${fmt.compact(l.max_tokens)} tok/req`);
  if (l.tokens_per_day) parts.push(`${fmt.compact(l.tokens_per_day)} tok/day`);
  if (l.tokens_per_month) parts.push(`${fmt.compact(l.tokens_per_month)} tok/mo`);
  if (l.usd_per_day) parts.push(`${fmt.cost(l.usd_per_day)}/day`);
  if (l.usd_per_month) parts.push(`${fmt.cost(l.usd_per_month)}/mo`);
  return parts.length ? parts.join(" · ") : "No limits";
}

export function list(text) {
  return text.split(",").map((s) => s.trim()).filter(Boolean);
}
