// Usage: requests, tokens and cost from the ledger, over time (charts per model, route or
// key) and in total, with CSV exports of the report and of every row.

import uPlot from "../../../vendor/uplot-1.6.32/uPlot.esm.js";
import { get } from "../api.js";
import { button, card, clear, empty, errorToast, field, fmt, h, loading, pageHead, select, table } from "../ui.js";

const RANGES = [
  ["3600", "Last hour", 60],
  ["86400", "Last 24 hours", 900],
  ["604800", "Last 7 days", 7200],
  ["2592000", "Last 30 days", 43200],
];
const COLORS = ["#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#64748b"];
const TOP = 7; // series drawn per chart; the rest are summed as "other"

function chart(el, title, xs, series, format) {
  const width = Math.max(320, el.clientWidth || 560);
  const opts = {
    title,
    width,
    height: 240,
    // from zero, and a visible range when every value is zero (uPlot's default would be 0 to 100)
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.15 : 1] } },
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 2, points: { show: xs.length <= 40, size: 5 },
      value: (u, v) => (v === null || v === undefined ? "—" : format(v)),
    }))],
    axes: [{}, { values: (u, ticks) => ticks.map(format), size: 70 }],
    legend: { show: true },
  };
  return new uPlot(opts, [xs, ...series.map((s) => s.values)], el);
}

export async function render(root, ctx) {
  const operator = ctx.session.operator;
  const groups = [["model", "Model"], ["route", "Route (pool)"], ["key", "API key"], ["project", "Project"], ["day", "Day"]];
  if (operator) groups.splice(4, 0, ["org", "Org"]);
  const range = select("range", RANGES.map(([v, l]) => [v, l]), "86400");
  const groupBy = select("group_by", groups, "model");
  const exportReport = h("a", { class: "btn", id: "export-report", download: "tokenyard-usage-report.csv" }, "Export report (CSV)");
  const exportRows = h("a", { class: "btn", id: "export-rows", download: "tokenyard-usage-rows.csv" }, "Export all rows (CSV)");
  const tiles = h("div", { class: "tiles" });
  const charts = h("div", { class: "charts" });
  const tableBody = h("div", { class: "card-body flush" }, loading());
  const tableCard = card("By model", "Totals over the range.", tableBody);
  root.append(
    pageHead("Usage", "From the ledger: one row per request that ran, with its tokens, cost and time to first token.",
      exportReport, exportRows, button("Refresh", () => reload(), { id: "usage-refresh" })),
    h("div", { class: "toolbar" }, field("Range", range), field("Group by", groupBy)),
    tiles,
    card("Over time", "Tokens and cost per time bucket; the top series by tokens, the rest as “other”.", h("div", { class: "card-body" }, charts)),
    tableCard);

  let plots = [];
  const observer = new ResizeObserver(() => {
    for (const p of plots) p.setSize({ width: Math.max(320, p.root.parentElement.clientWidth), height: 240 });
  });
  observer.observe(charts);

  async function load() {
    const seconds = Number(range.value);
    const interval = RANGES.find(([v]) => v === range.value)[2];
    const by = groupBy.value;
    const now = Date.now() / 1000;
    const since = Math.floor((now - seconds) / interval) * interval;
    const query = { group_by: by, since };
    exportReport.href = `/v1/admin/usage?${new URLSearchParams({ ...query, format: "csv" })}`;
    exportRows.href = `/v1/admin/usage/export?${new URLSearchParams({ since, format: "csv" })}`;
    const [report, series, keys] = await Promise.all([
      get("/v1/admin/usage", query),
      get("/v1/admin/usage/series", { ...query, interval }),
      get("/v1/admin/keys"),
    ]);
    if (ctx.stale()) return;
    const keyName = Object.fromEntries(keys.data.map((k) => [k.id, k.name]));
    const label = (v) => (by === "key" ? keyName[v] || v || "—" : v || "—");
    const rows = report.data;

    const sum = (f) => rows.reduce((a, r) => a + (Number(r[f]) || 0), 0);
    const requests = sum("requests");
    const ttfts = rows.filter((r) => r.avg_ttft_ms);
    const avgTtft = ttfts.length ? ttfts.reduce((a, r) => a + r.avg_ttft_ms * r.requests, 0) / ttfts.reduce((a, r) => a + r.requests, 0) : null;
    clear(tiles).append(
      ...[
        ["Requests", fmt.int(requests)],
        ["Tokens", fmt.int(sum("prompt_tokens") + sum("completion_tokens"))],
        ["Cost", fmt.cost(sum("cost"))],
        ["Errors", fmt.int(sum("errors"))],
        ["Avg time to first token", fmt.ms(avgTtft)],
      ].map(([l, v]) => h("div", { class: "tile" }, h("div", { class: "label" }, l), h("div", { class: "value" }, v))));

    for (const p of plots) p.destroy();
    plots = [];
    clear(charts);
    if (!series.data.length) {
      charts.append(h("div", { id: "usage-empty" }, empty("No usage in this range", "Requests appear here within a second of finishing. Try the playground.",
        button("Open the playground", () => ctx.navigate("playground"), { kind: "primary" }))));
    } else {
      const xs = [];
      for (let t = since; t <= now; t += interval) xs.push(t);
      const index = new Map(xs.map((t, i) => [t, i]));
      const totals = new Map();
      for (const r of series.data) totals.set(r[by], (totals.get(r[by]) || 0) + r.prompt_tokens + r.completion_tokens);
      const ranked = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a));
      const shown = ranked.slice(0, TOP);
      const build = (metric) => {
        const lines = new Map(shown.map((g) => [g, new Array(xs.length).fill(0)]));
        const other = new Array(xs.length).fill(0);
        for (const r of series.data) {
          const i = index.get(r.t);
          if (i === undefined) continue;
          (lines.get(r[by]) || other)[i] += metric(r);
        }
        const out = shown.map((g) => ({ label: label(g), values: lines.get(g) }));
        if (ranked.length > TOP) out.push({ label: "other", values: other });
        return out;
      };
      const tokensEl = h("div", { class: "chart", id: "chart-tokens" });
      const costEl = h("div", { class: "chart", id: "chart-cost" });
      charts.append(tokensEl, costEl);
      plots.push(chart(tokensEl, `Tokens by ${by}`, xs, build((r) => r.prompt_tokens + r.completion_tokens), (v) => fmt.compact(Math.round(v))));
      plots.push(chart(costEl, `Cost (USD) by ${by}`, xs, build((r) => r.cost), (v) => fmt.cost(v)));
    }

    tableCard.querySelector("h2").textContent = `By ${groups.find(([v]) => v === by)[1].toLowerCase()}`;
    clear(tableBody).append(table(
      [
        { label: groups.find(([v]) => v === by)[1], value: (r) => h("div", {}, label(r[by]), by === "key" && r[by] ? h("div", { class: "sub" }, r[by]) : null) },
        { label: "Requests", num: true, value: (r) => fmt.int(r.requests) },
        { label: "Prompt tokens", num: true, value: (r) => fmt.int(r.prompt_tokens) },
        { label: "Completion tokens", num: true, value: (r) => fmt.int(r.completion_tokens) },
        { label: "Cached tokens", num: true, value: (r) => fmt.int(r.cached_tokens) },
        { label: "Cost", num: true, value: (r) => fmt.cost(r.cost) },
        { label: "Errors", num: true, value: (r) => fmt.int(r.errors) },
        { label: "Cache hits", num: true, value: (r) => fmt.int(r.cache_hits) },
        { label: "Avg TTFT", num: true, value: (r) => fmt.ms(r.avg_ttft_ms) },
      ],
      rows,
      { id: "usage-table", rowKey: (r) => String(r[by]), emptyNode: empty("Nothing to report", "No request finished in this range.") }));
  }

  const reload = () => load().catch((error) => errorToast(error, "Could not load usage"));
  range.addEventListener("change", reload);
  groupBy.addEventListener("change", reload);
  await load();
  return () => {
    observer.disconnect();
    for (const p of plots) p.destroy();
  };
}
