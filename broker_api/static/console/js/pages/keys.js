// API keys: list, create (with limits), rotate and revoke. A secret appears once, in the
// dialog that follows creating or rotating; the list never holds it.

import { get, post } from "../api.js";
import {
  badge, button, card, checkbox, clear, clearErrors, confirm, empty, errorToast, field, h, input, limitsFields,
  limitsSummary, list, loading, modal, pageHead, readLimits, select, setError, showFormError, showSecret, table,
  timeCell, toast,
} from "../ui.js";

function state(key) {
  if (key.revoked) return badge("Revoked", "bad");
  if (key.expires && key.expires * 1000 < Date.now()) return badge("Expired", "warn");
  return badge("Active", "ok");
}

function live(key) {
  return !key.revoked && !(key.expires && key.expires * 1000 < Date.now());
}

export async function render(root, ctx) {
  const operator = ctx.session.operator;
  const body = h("div", { class: "card-body flush" }, loading());
  const showRevoked = checkbox("show-revoked", "Show revoked", false);
  const orgFilter = operator ? select("org-filter", [["", "All orgs"]], "") : null;
  root.append(
    pageHead("API keys", "Keys call /v1 on behalf of an org and project, within their limits. Admin keys also manage their org here and in the admin API.",
      button("New key", () => create(), { kind: "primary", id: "new-key" })),
    card("Keys", operator ? "Every org's keys." : `Keys of ${ctx.session.org.name}.`, body, orgFilter, showRevoked));

  let orgs = [];
  async function load() {
    const [keys, orgList] = await Promise.all([get("/v1/admin/keys", { org: orgFilter?.value }), get("/v1/admin/orgs")]);
    orgs = orgList.data;
    if (ctx.stale()) return;
    if (orgFilter && orgFilter.options.length !== orgs.length + 1) {
      const chosen = orgFilter.value;
      clear(orgFilter).append(h("option", { value: "" }, "All orgs"), ...orgs.map((o) => h("option", { value: o.id, selected: o.id === chosen }, o.name)));
    }
    const names = Object.fromEntries(orgs.map((o) => [o.id, o.name]));
    const shown = keys.data.filter((k) => showRevoked.querySelector("input").checked || !k.revoked).reverse();
    const columns = [
      { label: "Name", value: (k) => h("div", {}, h("div", {}, k.name), h("div", { class: "sub" }, k.id)) },
      operator && { label: "Org", value: (k) => names[k.org] || k.org },
      { label: "Project", value: (k) => k.project || h("span", { class: "muted" }, "—") },
      { label: "Access", value: (k) => h("div", { class: "chips" }, k.admin ? badge("Admin", "accent") : null, badge(k.priority),
          k.volunteer_ok ? badge("Volunteer ok") : null) },
      { label: "Models", value: (k) => (k.models.length ? k.models.join(", ") : h("span", { class: "muted" }, "All")) },
      { label: "Limits", value: (k) => h("span", { class: "muted" }, limitsSummary(k.limits)) },
      { label: "Created", value: (k) => timeCell(k.created) },
      { label: "Status", value: state },
      { label: "", actions: true, value: (k) => live(k) ? [
          button("Rotate", () => rotate(k), { small: true, dataset: { action: "rotate" } }), " ",
          button("Revoke", () => revoke(k), { small: true, kind: "danger", dataset: { action: "revoke" } }),
        ] : null },
    ].filter(Boolean);
    clear(body).append(table(columns, shown, {
      id: "keys-table",
      rowKey: (k) => k.id,
      emptyNode: empty("No API keys yet", "Create a key for each application or team that calls the gateway.",
        button("New key", () => create(), { kind: "primary" })),
    }));
  }
  showRevoked.querySelector("input").addEventListener("change", () => load().catch((e) => errorToast(e)));
  orgFilter?.addEventListener("change", () => load().catch((e) => errorToast(e)));

  async function create() {
    const created = await modal("New API key", (close) => {
      const orgSelect = select("org", orgs.map((o) => [o.id, `${o.name} (${o.id})`]), ctx.session.org.id);
      const projectSelect = select("project", [["", "No project"]]);
      const fillProjects = () => {
        const org = orgs.find((o) => o.id === orgSelect.value);
        clear(projectSelect).append(h("option", { value: "" }, "No project"),
          ...(org?.projects || []).map((p) => h("option", { value: p }, p)));
      };
      orgSelect.addEventListener("change", fillProjects);
      fillProjects();
      const form = h("form", { id: "key-form", novalidate: true },
        h("div", { class: "form-section" },
          field("Name", input("name", { placeholder: "web-frontend", required: true }), { param: "name", help: "Shown in lists and the audit log." }),
          h("div", { class: "grid-2" },
            operator ? field("Org", orgSelect, { param: "org" }) : null,
            field("Project", projectSelect, { param: "project" }),
            field("Priority", select("priority", [["interactive", "Interactive"], ["standard", "Standard"], ["batch", "Batch"]], "standard"), { param: "priority" }),
            field("Expires in (days)", input("expires_days", { type: "number", min: "0", step: "any", placeholder: "never" }), { param: "expires_in" })),
          field("Models", input("models", { placeholder: "all models" }), { param: "models", help: "Comma-separated model ids this key may call; empty for all." }),
          h("div", { class: "chips" },
            checkbox("admin", "Admin key: may use the admin API and this console for its org"),
            checkbox("cache", "May be answered from the response cache", true),
            checkbox("volunteer_ok", "Jobs may run on volunteer (idle-time) nodes"))),
        h("div", { class: "form-section" }, h("h3", { text: "Limits (empty: no limit)" }), limitsFields()));
      const submit = async () => {
        clearErrors(form);
        const v = (n) => form.elements[n]?.value?.trim() ?? "";
        const limits = readLimits(form);
        if (!v("name")) setError(form, "name", "A key needs a name.");
        const days = v("expires_days");
        if (days && !(Number(days) > 0)) setError(form, "expires_in", "A number of days above 0, or empty for never.");
        if (form.querySelector(".invalid") || !limits) return;
        const payload = {
          name: v("name"),
          project: v("project"),
          priority: v("priority"),
          models: list(v("models")),
          admin: form.elements.admin.checked,
          cache: form.elements.cache.checked,
          volunteer_ok: form.elements.volunteer_ok.checked,
          limits,
        };
        if (operator) payload.org = v("org");
        if (days) payload.expires_in = Number(days) * 86400;
        try {
          close(await post("/v1/admin/keys", payload));
        } catch (error) {
          showFormError(form, error);
        }
      };
      form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
      return { body: form, actions: [button("Cancel", () => close()), button("Create key", submit, { kind: "primary", id: "create-key" })] };
    }, { id: "key-dialog" });
    if (!created) return;
    await showSecret(`Key “${created.name}” created`, created.key,
      `Use it as a bearer key: Authorization: Bearer <key>. Key id ${created.id}.`);
    await load();
  }

  async function rotate(key) {
    const mine = key.id === ctx.session.key_id;
    const ok = await confirm(`Rotate “${key.name}”?`,
      "A new secret replaces the current one at once, on every gateway: clients using the old secret get 401 until they switch. " +
        "The key id, limits, routing policy and usage history stay." + (mine ? " You are signed in with this key: you will have to sign in again." : ""),
      { confirmLabel: "Rotate key" });
    if (!ok) return;
    try {
      const rotated = await post(`/v1/admin/keys/${encodeURIComponent(key.id)}/rotate`);
      await showSecret(`New secret for “${rotated.name}”`, rotated.key, `Key id ${rotated.id} is unchanged.`);
      if (!mine) await load();
      else window.dispatchEvent(new CustomEvent("ty:signed-out", { detail: "You rotated the key you signed in with: sign in with its new secret." }));
    } catch (error) {
      errorToast(error, "Rotation failed");
    }
  }

  async function revoke(key) {
    const ok = await confirm(`Revoke “${key.name}”?`,
      "Every gateway refuses the key within moments, and console sessions signed in with it end. This cannot be undone.",
      { confirmLabel: "Revoke key", danger: true });
    if (!ok) return;
    try {
      await post(`/v1/admin/keys/${encodeURIComponent(key.id)}/revoke`);
      toast(`Key “${key.name}” is revoked.`, { kind: "ok", timeout: 4000 });
      await load();
    } catch (error) {
      errorToast(error, "Revocation failed");
    }
  }

  await load();
}
