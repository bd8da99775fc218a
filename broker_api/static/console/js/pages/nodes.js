// Nodes: the node registry (state, models, hardware, slots, what each served), enrolment
// tokens, and disable / enable / remove. Against /v1/admin/nodes; a gateway without the
// registry answers 404 there, and the page says the feature is not available on it.

import { del, get, missingRoute, post } from "../api.js";
import {
  badge, button, card, clear, clearErrors, confirm, empty, errorToast, field, fmt, h, input, list, loading, modal,
  pageHead, select, setError, showFormError, showSecret, table, timeCell, toast,
} from "../ui.js";

const STATE_KIND = { online: "ok", draining: "warn", stale: "warn", offline: "bad", disabled: "bad" };

const pick = (o, ...names) => names.map((n) => o?.[n]).find((v) => v !== undefined && v !== null);

const bytes = (n) => (n ? `${+(n / 2 ** 30).toFixed(n >= 10 * 2 ** 30 ? 0 : 1)} GB` : "");

function hardware(n) {
  const hw = n.hardware;
  if (!hw) return h("span", { class: "muted" }, "—");
  if (typeof hw === "string") return hw;
  const gpus = (Array.isArray(hw.gpus) ? hw.gpus : [])
    .map((g) => (typeof g === "string" ? g : [g.name, bytes(g.mem ?? g.memory)].filter(Boolean).join(" · ")))
    .filter(Boolean);
  const cpu = [hw.cpu, hw.cores ? `${hw.cores} cores` : "", bytes(hw.mem ?? hw.memory) && `${bytes(hw.mem ?? hw.memory)} RAM`]
    .filter(Boolean).join(" · ");
  return h("div", {}, gpus.length ? h("div", {}, gpus.join(", ")) : null, cpu ? h("div", { class: "sub" }, cpu) : null,
    hw.system ? h("div", { class: "sub" }, hw.system) : null);
}

// What it serves now (its adverts), and what its enrolment allows (empty: whatever it serves).
function models(n) {
  const name = (m) => (typeof m === "string" ? m : m.id);
  const serving = (n.serving || []).map(name);
  const allowed = (n.models || []).map(name);
  return h("div", {},
    h("div", { class: "chips" }, (serving.length ? serving : allowed).map((m) => badge(m))),
    allowed.length && serving.length ? h("div", { class: "sub" }, `allowed: ${allowed.join(", ")}`) : null);
}

function slots(n) {
  const s = n.slots && typeof n.slots === "object" ? n.slots : { total: n.slots_total, free: n.slots_free, used: n.slots_used };
  if (s.total === undefined && s.free === undefined) return "—";
  const used = s.used ?? (s.total ?? 0) - (s.free ?? 0);
  return `${fmt.int(used)} used / ${fmt.int(s.free ?? 0)} free`;
}

function served(n) {
  const s = n.served || {};
  const requests = pick(s, "requests") ?? pick(n, "requests");
  const tokens = pick(s, "tokens") ?? pick(n, "tokens");
  if (requests === undefined && tokens === undefined) return "—";
  return `${fmt.int(requests ?? 0)} req · ${fmt.compact(tokens ?? 0)} tok`;
}

function price(n) {
  const p = n.price;
  if (!p || (!p.input && !p.output)) return h("span", { class: "muted" }, "free");
  return `$${p.input} / $${p.output} per 1M`;
}

export async function render(root, ctx) {
  const body = h("div", { class: "card-body flush" }, loading());
  const head = pageHead("Nodes", "Machines that serve models: your own, volunteers' idle-time machines, and cloud adapters.");
  root.append(head, card("Registry", "Live state from the nodes' adverts; disable takes a node's credentials away within seconds.", body));

  let nodes;
  try {
    nodes = (await get("/v1/admin/nodes")).data;
  } catch (error) {
    if (!missingRoute(error)) throw error;
    clear(body).append(h("div", { id: "nodes-unavailable" }, empty("Not available on this gateway",
      "This gateway has no node registry (GET /v1/admin/nodes answers 404), so nodes cannot be listed, enrolled or disabled here. " +
        "Workers that are connected still serve: Providers & routing shows the models they offer.",
      button("Providers & routing", () => ctx.navigate("providers")))));
    return;
  }
  head.querySelector(".actions").append(button("New enrolment token", () => enrol(), { kind: "primary", id: "new-token" }));
  const tokensBody = h("div", { class: "card-body flush" }, loading());
  const tokensCard = card("Enrolment tokens", "A machine joins with one (tokenyard worker join --token …); the secret was shown once, when it was made.", tokensBody);
  root.append(tokensCard);

  async function loadTokens() {
    let tokens;
    try {
      tokens = (await get("/v1/admin/nodes/tokens")).data;
    } catch (error) {
      if (!missingRoute(error)) throw error;
      tokensCard.hidden = true;
      return;
    }
    if (ctx.stale()) return;
    const now = Date.now() / 1000;
    clear(tokensBody).append(table(
      [
        { label: "Token", value: (t) => h("span", { class: "mono" }, t.id) },
        ctx.session.operator && { label: "Org", value: (t) => t.org },
        { label: "Pool", value: (t) => h("div", {}, t.pool, h("div", { class: "sub" }, t.kind)) },
        { label: "Models", value: (t) => (t.models?.length ? t.models.join(", ") : h("span", { class: "muted" }, "any")) },
        { label: "Uses", num: true, value: (t) => `${fmt.int(t.used)} / ${fmt.int(t.uses)}` },
        { label: "Expires", value: (t) => h("span", { title: fmt.time(t.expires) }, t.expires < now ? badge("Expired", "warn") : fmt.time(t.expires)) },
        { label: "Created", value: (t) => timeCell(t.created) },
      ].filter(Boolean),
      tokens.slice().reverse(),
      { id: "tokens-table", rowKey: (t) => t.id, emptyNode: empty("No enrolment tokens", "Make one to let a machine join as a node.") }));
  }

  async function reload() {
    nodes = (await get("/v1/admin/nodes")).data;
    show();
  }

  function show() {
    if (ctx.stale()) return;
    const columns = [
      { label: "Node", value: (n) => h("div", {}, h("div", {}, pick(n, "name") || pick(n, "id", "node")), h("div", { class: "sub" }, pick(n, "id", "node"))) },
      ctx.session.operator && { label: "Owner", value: (n) => pick(n, "org", "owner") || "—" },
      { label: "Pool", value: (n) => h("div", {}, pick(n, "pool") || "—", h("div", { class: "sub" }, pick(n, "kind") || "")) },
      { label: "State", value: (n) => badge(pick(n, "state") || (n.enabled === false ? "disabled" : "unknown"), STATE_KIND[pick(n, "state")] || "") },
      { label: "Models", value: models },
      { label: "Hardware", value: hardware },
      { label: "Slots", value: slots },
      { label: "Served", value: served },
      { label: "Price (in / out)", value: price },
      { label: "Last seen", value: (n) => timeCell(pick(n, "last_seen", "seen")) },
      { label: "", actions: true, value: (n) => [
          pick(n, "state") === "disabled" || n.enabled === false
            ? button("Enable", () => act(n, "enable"), { small: true, dataset: { action: "enable" } })
            : button("Disable", () => act(n, "disable"), { small: true, kind: "danger", dataset: { action: "disable" } }),
          " ",
          button("Remove", () => remove(n), { small: true, kind: "danger", dataset: { action: "remove" } }),
        ] },
    ].filter(Boolean);
    clear(body).append(table(columns, nodes, {
      id: "nodes-table",
      rowKey: (n) => pick(n, "id", "node"),
      emptyNode: empty("No nodes yet", "Make an enrolment token, then run tokenyard worker join with it on the machine.",
        button("New enrolment token", () => enrol(), { kind: "primary" })),
    }));
  }

  async function act(n, verb) {
    const id = pick(n, "id", "node");
    if (verb === "disable") {
      const ok = await confirm(`Disable ${pick(n, "name") || id}?`,
        "Its NATS connection is closed and its credentials refused within seconds; jobs it was running move to other nodes (or end with an explicit error if they had started streaming).",
        { confirmLabel: "Disable node", danger: true });
      if (!ok) return;
    }
    try {
      await post(`/v1/admin/nodes/${encodeURIComponent(id)}/${verb}`);
      toast(`Node ${id} ${verb}d.`, { kind: "ok", timeout: 4000 });
      await reload();
    } catch (error) {
      errorToast(error, `Could not ${verb} the node`);
    }
  }

  async function remove(n) {
    const id = pick(n, "id", "node");
    const ok = await confirm(`Remove ${pick(n, "name") || id}?`, "Its credentials are revoked for good; to serve again it must join with a new enrolment token.",
      { confirmLabel: "Remove node", danger: true });
    if (!ok) return;
    try {
      await del(`/v1/admin/nodes/${encodeURIComponent(id)}`);
      toast(`Node ${id} removed.`, { kind: "ok", timeout: 4000 });
      await reload();
    } catch (error) {
      errorToast(error, "Could not remove the node");
    }
  }

  async function enrol() {
    const made = await modal("New enrolment token", (close) => {
      const form = h("form", { id: "token-form", novalidate: true },
        h("div", { class: "grid-2" },
          field("Pool", input("pool", { placeholder: "own", required: true }), { param: "pool", help: "The pool the node will serve in." }),
          field("Kind", select("kind", [["own", "Own (dedicated)"], ["volunteer", "Volunteer (idle time)"]], "own"), { param: "kind" }),
          field("Valid for (hours)", input("ttl_hours", { type: "number", min: "0", step: "any", value: "24" }), { param: "ttl" }),
          field("Uses", input("uses", { type: "number", min: "1", step: "1", value: "1" }), { param: "uses", help: "Machines that may join with it." })),
        field("Models", input("models", { placeholder: "whatever the node serves" }), { param: "models", help: "Comma-separated model ids the node may serve." }));
      const submit = async () => {
        clearErrors(form);
        const pool = form.elements.pool.value.trim();
        const hours = Number(form.elements.ttl_hours.value);
        const uses = Number(form.elements.uses.value);
        if (!/^[a-z0-9][a-z0-9-]{0,62}$/.test(pool)) setError(form, "pool", "Lower-case letters, digits and dashes, up to 63.");
        if (!(hours > 0)) setError(form, "ttl", "A number of hours above 0.");
        if (!Number.isInteger(uses) || uses < 1) setError(form, "uses", "A whole number, 1 or more.");
        if (form.querySelector(".invalid")) return;
        try {
          close(await post("/v1/admin/nodes/tokens", {
            pool, kind: form.elements.kind.value, models: list(form.elements.models.value), ttl: hours * 3600, uses,
          }));
        } catch (error) {
          showFormError(form, error);
        }
      };
      form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
      return { body: form, actions: [button("Cancel", () => close()), button("Create token", submit, { kind: "primary", id: "create-token" })] };
    }, { id: "token-dialog" });
    if (!made) return;
    loadTokens().catch((error) => errorToast(error, "Could not list enrolment tokens"));
    await showSecret("Enrolment token created", made.token,
      `On the machine: tokenyard worker join --token <token> --api-url ${location.origin}`);
  }

  show();
  await loadTokens();
}
