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

function hardware(n) {
  const hw = n.hardware;
  if (!hw) return h("span", { class: "muted" }, "—");
  if (typeof hw === "string") return hw;
  const gpus = hw.gpus || hw.gpu || [];
  const gpuText = (Array.isArray(gpus) ? gpus : [gpus])
    .map((g) => (typeof g === "string" ? g : [g.name, g.memory_gb ? `${g.memory_gb} GB` : g.memory ? `${fmt.compact(g.memory)}B` : ""].filter(Boolean).join(" ")))
    .filter(Boolean);
  const cpu = [hw.cpu || hw.cpu_model, hw.cores ? `${hw.cores} cores` : "", hw.ram_gb ? `${hw.ram_gb} GB RAM` : hw.memory ? `${fmt.compact(hw.memory)}B RAM` : ""]
    .filter(Boolean).join(" · ");
  return h("div", {}, gpuText.length ? h("div", {}, gpuText.join(", ")) : null, cpu ? h("div", { class: "sub" }, cpu) : null);
}

function models(n) {
  const ms = pick(n, "models") || [];
  return h("div", { class: "chips" }, ms.map((m) => badge(typeof m === "string" ? m : m.id)));
}

function slots(n) {
  const total = pick(n, "slots_total", "slots");
  const free = pick(n, "slots_free");
  const used = pick(n, "slots_used") ?? (typeof total === "number" && typeof free === "number" ? total - free : undefined);
  if (used === undefined && free === undefined) return "—";
  return `${fmt.int(used ?? 0)} used / ${fmt.int(free ?? 0)} free`;
}

function served(n) {
  const s = n.served || {};
  const requests = pick(s, "requests") ?? pick(n, "requests");
  const tokens = pick(s, "tokens") ?? pick(n, "tokens");
  if (requests === undefined && tokens === undefined) return "—";
  return `${fmt.int(requests ?? 0)} req · ${fmt.compact(tokens ?? 0)} tok`;
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
      emptyNode: empty("No nodes yet", "Make an enrolment token, then run `tokenyard worker join` with it on the machine.",
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
    await showSecret("Enrolment token created", made.token,
      `On the machine: tokenyard worker join --token <token> --api-url ${location.origin}`);
  }

  show();
}
