// The audit log: who created, changed or revoked what, when and from where; the fleet's own
// events (nodes joining, draining, leaving, turning unhealthy). Newest first.

import { get } from "../api.js";
import { badge, button, card, clear, empty, errorToast, field, fmt, h, input, loading, pageHead, select, table, timeCell } from "../ui.js";

const RANGES = [["3600", "Last hour"], ["86400", "Last 24 hours"], ["604800", "Last 7 days"], ["2592000", "Last 30 days"]];

function kind(action) {
  if (/revoke|delete|disable|remove|unhealthy|leave/.test(action)) return "bad";
  if (/create|join|healthy|enable/.test(action)) return "ok";
  if (/signin|signout/.test(action)) return "";
  return "accent";
}

function detail(d) {
  if (!d || !Object.keys(d).length) return h("span", { class: "muted" }, "—");
  return h("div", { class: "detail" }, Object.entries(d).map(([k, v]) =>
    h("div", {}, h("span", { class: "muted" }, `${k}: `), typeof v === "object" ? JSON.stringify(v) : String(v))));
}

export async function render(root, ctx) {
  const range = select("range", RANGES, "86400");
  const filter = input("filter", { placeholder: "key.create, node…" });
  const body = h("div", { class: "card-body flush" }, loading());
  const count = h("span", { class: "muted" });
  root.append(
    pageHead("Audit log", "Append-only: every admin change, console sign-in and fleet event, each recorded once however many gateways saw it.",
      button("Refresh", () => reload(), { id: "audit-refresh" })),
    h("div", { class: "toolbar" }, field("Range", range), field("Action or target contains", filter)),
    card("Events", null, body, count));

  let rows = [];
  let keyName = {};
  async function load() {
    const since = Math.floor(Date.now() / 1000) - Number(range.value);
    const [audit, keys] = await Promise.all([get("/v1/admin/audit", { since }), get("/v1/admin/keys")]);
    if (ctx.stale()) return;
    keyName = Object.fromEntries(keys.data.map((k) => [k.id, k.name]));
    keyName.admin = "Operator admin key";
    rows = audit.data.slice().reverse();
    show();
  }

  function show() {
    const needle = filter.value.trim().toLowerCase();
    const shown = needle ? rows.filter((r) => `${r.action} ${r.target} ${r.actor}`.toLowerCase().includes(needle)) : rows;
    count.textContent = `${fmt.int(shown.length)} event${shown.length === 1 ? "" : "s"}`;
    clear(body).append(table(
      [
        { label: "Time", value: (r) => h("div", {}, timeCell(r.time), h("div", { class: "sub" }, fmt.time(r.time))) },
        { label: "Action", value: (r) => badge(r.action, kind(r.action)) },
        { label: "Actor", value: (r) => h("div", {}, keyName[r.actor] || r.actor, h("div", { class: "sub" }, r.actor)) },
        { label: "Target", value: (r) => h("span", { class: "mono" }, r.target) },
        ctx.session.operator && { label: "Org", value: (r) => r.org },
        { label: "From", value: (r) => r.source || "—" },
        { label: "Details", value: (r) => detail(r.detail) },
      ].filter(Boolean),
      shown,
      { id: "audit-table", rowKey: (r) => r.id, emptyNode: empty("No events", needle ? "Nothing matches the filter." : "Nothing was recorded in this range.") }));
  }

  const reload = () => load().catch((error) => errorToast(error, "Could not load the audit log"));
  range.addEventListener("change", reload);
  filter.addEventListener("input", show);
  await load();
}
