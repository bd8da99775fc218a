// Providers and routing: the models the gateway serves, the pools behind them (own nodes,
// volunteers, cloud providers), and the routing policies every scheduler applies.

import { del, get, missingRoute, put } from "../api.js";
import {
  badge, button, card, clear, clearErrors, confirm, empty, errorToast, field, h, input, list, loading, modal,
  pageHead, select, setError, showFormError, table, toast,
} from "../ui.js";

const STRATEGIES = [
  ["most_free", "Most free slots"],
  ["cheapest", "Cheapest"],
  ["fastest", "Fastest (TTFT and tokens/s)"],
  ["own_first", "Own nodes first, then spill"],
  ["weighted", "Weighted split"],
  ["failover", "Failover in order"],
];
const STRATEGY_LABEL = Object.fromEntries(STRATEGIES);

// Pools the gateway knows of: from the node registry when it has one, and from routing rules.
export async function knownPools() {
  const pools = new Map();
  try {
    for (const n of (await get("/v1/admin/nodes")).data) {
      if (!n.pool) continue;
      const p = pools.get(n.pool) || { pool: n.pool, kinds: new Set(), nodes: 0, models: new Set(), online: 0 };
      p.kinds.add(n.kind || "own");
      p.nodes += 1;
      if (n.state === "online") p.online += 1;
      for (const m of n.models || []) p.models.add(typeof m === "string" ? m : m.id);
      pools.set(n.pool, p);
    }
  } catch (error) {
    if (!missingRoute(error)) throw error;
  }
  try {
    const routing = await get("/v1/admin/routing");
    const policies = [routing.default, ...Object.values(routing.models || {}), ...Object.values(routing.keys || {})].filter(Boolean);
    for (const policy of policies) {
      for (const name of [...(policy.order || []), ...Object.keys(policy.weights || {})]) {
        if (!pools.has(name)) pools.set(name, { pool: name, kinds: new Set(), nodes: null, models: new Set(), online: null });
      }
    }
  } catch (error) {
    if (!missingRoute(error)) throw error;
  }
  return pools;
}

function policyText(p) {
  const parts = [];
  if (p.order?.length) parts.push(`order ${p.order.join(" → ")}`);
  if (p.weights && Object.keys(p.weights).length) parts.push(Object.entries(p.weights).map(([k, v]) => `${k} ${v}`).join(", "));
  if (p.spill_wait !== undefined) parts.push(`spill after ${p.spill_wait} s`);
  return parts.join(" · ");
}

export async function render(root, ctx) {
  const operator = ctx.session.operator;
  const modelsBody = h("div", { class: "card-body flush" }, loading());
  const poolsBody = h("div", { class: "card-body flush" }, loading());
  const rulesBody = h("div", { class: "card-body flush" }, loading());
  root.append(
    pageHead("Providers & routing", "Every model is served by one or more pools: your nodes, volunteers, or an upstream provider behind a cloud adapter. Routing rules choose among them."),
    card("Models", "What /v1/models lists: served by at least one live node now.", modelsBody),
    card("Pools", "Capacity groups the gateway routes to.", poolsBody),
    card("Routing rules", "Applied by every scheduler to its next placement. A key's rule wins over its model's, which wins over the default.", rulesBody,
      button("New rule", () => edit(null), { kind: "primary", id: "new-rule" })));

  let models = [];
  let keys = [];
  async function load() {
    const [modelList, routing, keyList, pools] = await Promise.all([
      get("/v1/models"), get("/v1/admin/routing"), get("/v1/admin/keys"), knownPools(),
    ]);
    if (ctx.stale()) return;
    models = modelList.data;
    keys = keyList.data.filter((k) => !k.revoked);
    const keyName = Object.fromEntries(keyList.data.map((k) => [k.id, k.name]));
    clear(modelsBody).append(table(
      [
        { label: "Model", value: (m) => h("span", { class: "mono" }, m.id) },
        { label: "Owned by", value: (m) => m.owned_by },
        { label: "", actions: true, value: (m) => button("Try in playground", () => ctx.navigate("playground"), { small: true }) },
      ],
      models,
      { id: "models-table", rowKey: (m) => m.id, emptyNode: empty("No models are served now", "Start a worker (tokenyard worker) or a cloud adapter; its models appear here within a second.") }));
    const poolRows = [...pools.values()].sort((a, b) => a.pool.localeCompare(b.pool));
    clear(poolsBody).append(table(
      [
        { label: "Pool", value: (p) => h("span", { class: "mono" }, p.pool) },
        { label: "Kind", value: (p) => h("div", { class: "chips" }, [...p.kinds].map((k) => badge(k))) },
        { label: "Nodes", value: (p) => (p.nodes === null ? h("span", { class: "muted" }, "named in a rule") : `${p.online} online / ${p.nodes}`) },
        { label: "Models", value: (p) => [...p.models].join(", ") || "—" },
      ],
      poolRows,
      { id: "pools-table", rowKey: (p) => p.pool, emptyNode: empty("No pools known here", "This gateway lists pools from its node registry and from routing rules; with neither, pin a pool by name in the playground.") }));
    const rules = [];
    if (routing.default) rules.push({ scope: "default", id: "", label: "Default", policy: routing.default });
    for (const [id, policy] of Object.entries(routing.models || {})) rules.push({ scope: "model", id, label: `Model ${id}`, policy });
    for (const [id, policy] of Object.entries(routing.keys || {})) rules.push({ scope: "key", id, label: `Key ${keyName[id] || id}`, policy });
    clear(rulesBody).append(table(
      [
        { label: "Applies to", value: (r) => h("div", {}, r.label, r.scope === "key" ? h("div", { class: "sub" }, r.id) : null) },
        { label: "Strategy", value: (r) => badge(STRATEGY_LABEL[r.policy.strategy] || r.policy.strategy, "accent") },
        { label: "Settings", value: (r) => h("span", { class: "muted" }, policyText(r.policy) || "—") },
        { label: "", actions: true, value: (r) => (r.scope === "key" || operator) ? [
            button("Edit", () => edit(r), { small: true, dataset: { action: "edit" } }), " ",
            button("Delete", () => remove(r), { small: true, kind: "danger", dataset: { action: "delete" } }),
          ] : null },
      ],
      rules,
      { id: "rules-table", rowKey: (r) => `${r.scope}:${r.id}`, emptyNode: empty("No routing rules", "Without rules every scheduler places a job on the pool with the most free slots (or its --routing-file's policies).") }));
  }

  function path(scope, id) {
    if (scope === "default") return "/v1/admin/routing/default";
    if (scope === "model") return `/v1/admin/routing/models/${id.split("/").map(encodeURIComponent).join("/")}`;
    return `/v1/admin/routing/keys/${encodeURIComponent(id)}`;
  }

  async function edit(rule) {
    const saved = await modal(rule ? `Edit rule: ${rule.label}` : "New routing rule", (close) => {
      const scopes = operator ? [["default", "Default (every model)"], ["model", "One model"], ["key", "One API key"]] : [["key", "One API key"]];
      const scope = select("scope", scopes, rule?.scope || scopes[0][0]);
      const modelTarget = select("model", models.map((m) => m.id), rule?.scope === "model" ? rule.id : undefined);
      const keyTarget = select("key", keys.map((k) => [k.id, `${k.name} (${k.id})`]), rule?.scope === "key" ? rule.id : undefined);
      const modelField = field("Model", modelTarget, { param: "model" });
      const keyField = field("API key", keyTarget, { param: "key" });
      const p = rule?.policy || {};
      const strategy = select("strategy", STRATEGIES, p.strategy || "most_free");
      const form = h("form", { id: "rule-form", novalidate: true },
        h("div", { class: "grid-2" }, field("Applies to", scope), modelField, keyField),
        field("Strategy", strategy, { param: "strategy" }),
        field("Order", input("order", { value: (p.order || []).join(", "), placeholder: "openai, own" }), { param: "policy", help: "Pools, comma-separated: failover's order, and the tie order of the others." }),
        field("Weights", input("weights", { value: Object.entries(p.weights || {}).map(([k, v]) => `${k}=${v}`).join(", "), placeholder: "openai=0.9, own=0.1" }), { param: "weights", help: "For weighted: pool=weight, comma-separated." }),
        field("Spill wait (s)", input("spill_wait", { type: "number", min: "0", step: "any", value: p.spill_wait ?? "" , placeholder: "2" }), { param: "spill_wait", help: "For own first: predicted wait before spilling over." }));
      const sync = () => {
        modelField.hidden = scope.value !== "model";
        keyField.hidden = scope.value !== "key";
      };
      scope.addEventListener("change", sync);
      sync();
      if (rule) scope.disabled = modelTarget.disabled = keyTarget.disabled = true;
      const submit = async () => {
        clearErrors(form);
        const policy = { strategy: strategy.value };
        const order = list(form.elements.order.value);
        if (order.length) policy.order = order;
        const weights = {};
        for (const part of list(form.elements.weights.value)) {
          const [name, value] = part.split("=").map((s) => s.trim());
          if (!name || value === undefined || !(Number(value) >= 0)) {
            setError(form, "weights", `“${part}” is not pool=weight with a weight of 0 or more.`);
            return;
          }
          weights[name] = Number(value);
        }
        if (Object.keys(weights).length) policy.weights = weights;
        const spill = form.elements.spill_wait.value.trim();
        if (spill) policy.spill_wait = Number(spill);
        if (policy.strategy === "weighted" && !Object.values(weights).some((w) => w > 0)) return setError(form, "weights", "The weighted strategy needs at least one weight above 0.");
        if (policy.strategy === "failover" && !order.length) return setError(form, "policy", "The failover strategy needs an order of pools.");
        const s = scope.value;
        const id = s === "model" ? modelTarget.value : s === "key" ? keyTarget.value : "";
        if (s !== "default" && !id) return setError(form, s, s === "model" ? "No model is served now." : "No API key to choose.");
        try {
          close(await put(path(s, id), policy));
        } catch (error) {
          showFormError(form, error);
        }
      };
      form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
      return { body: form, actions: [button("Cancel", () => close()), button("Save rule", submit, { kind: "primary", id: "save-rule" })] };
    }, { id: "rule-dialog" });
    if (!saved) return;
    toast(`Routing rule for ${saved.target} saved.`, { kind: "ok", timeout: 4000 });
    await load();
  }

  async function remove(rule) {
    if (!(await confirm(`Delete the rule for ${rule.label}?`, "Schedulers fall back to the next rule (model, then default, then their routing file).", { confirmLabel: "Delete rule", danger: true }))) return;
    try {
      await del(path(rule.scope, rule.id));
      toast(`Rule for ${rule.label} deleted.`, { kind: "ok", timeout: 4000 });
      await load();
    } catch (error) {
      errorToast(error, "Could not delete the rule");
    }
  }

  await load();
}
