// Orgs and their limits. The operator lists, creates and changes every org; an org admin
// sees its own org (the admin API refuses it any change, and the page says so).

import { get, patch, post } from "../api.js";
import {
  button, card, clear, clearErrors, empty, field, h, input, LIMITS, limitsFields, limitsSummary, list, loading, modal,
  pageHead, readLimits, setError, showFormError, table, timeCell, toast,
} from "../ui.js";

export async function render(root, ctx) {
  const operator = ctx.session.operator;
  const body = h("div", { class: "card-body flush" }, loading());
  root.append(
    pageHead("Orgs & limits", "An org's limits cap all of its keys together; a key's own limits apply within them.",
      operator ? button("New org", () => edit(null), { kind: "primary", id: "new-org" }) : null),
    operator ? null : h("div", { class: "callout info" }, "Only the operator's admin key can create orgs or change their limits."),
    card("Orgs", operator ? "Every org on this gateway." : "Your org.", body));

  async function load() {
    const orgs = (await get("/v1/admin/orgs")).data;
    if (ctx.stale()) return;
    const columns = [
      { label: "Name", value: (o) => h("div", {}, h("div", {}, o.name), h("div", { class: "sub" }, o.id)) },
      { label: "Projects", value: (o) => (o.projects.length ? o.projects.join(", ") : h("span", { class: "muted" }, "—")) },
      { label: "Limits", value: (o) => h("span", { class: "muted" }, limitsSummary(o.limits)) },
      { label: "Created", value: (o) => timeCell(o.created) },
      operator && { label: "", actions: true, value: (o) => button("Edit", () => edit(o), { small: true, dataset: { action: "edit" } }) },
    ].filter(Boolean);
    clear(body).append(table(columns, orgs, {
      id: "orgs-table",
      rowKey: (o) => o.id,
      emptyNode: empty("No orgs", "Create an org for each customer or team; give it limits and projects."),
    }));
  }

  async function edit(org) {
    const saved = await modal(org ? `Edit “${org.name}”` : "New org", (close) => {
      const form = h("form", { id: "org-form", novalidate: true },
        h("div", { class: "form-section" },
          field("Name", input("name", { value: org?.name || "", placeholder: "Acme Inc.", required: true }), { param: "name" }),
          field("Projects", input("projects", { value: (org?.projects || []).join(", "), placeholder: "web, batch" }),
            { param: "projects", help: "Comma-separated; keys may be tied to one." })),
        h("div", { class: "form-section" }, h("h3", { text: "Org-wide limits (empty: no limit)" }), limitsFields(org?.limits)));
      const submit = async () => {
        clearErrors(form);
        const name = form.elements.name.value.trim();
        const limits = readLimits(form);
        if (!name) setError(form, "name", "An org needs a name.");
        if (!name || !limits) return;
        // An edit names every limit (0: none), so a cleared field clears the limit whether PATCH
        // replaces the limits or merges them.
        const full = org ? Object.fromEntries(LIMITS.map(([n]) => [n, limits[n] ?? 0])) : limits;
        const payload = { name, projects: list(form.elements.projects.value), limits: full };
        try {
          close(org ? await patch(`/v1/admin/orgs/${encodeURIComponent(org.id)}`, payload) : await post("/v1/admin/orgs", payload));
        } catch (error) {
          showFormError(form, error);
        }
      };
      form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
      return { body: form, actions: [button("Cancel", () => close()), button(org ? "Save" : "Create org", submit, { kind: "primary", id: "save-org" })] };
    }, { id: "org-dialog" });
    if (!saved) return;
    toast(org ? `Org “${saved.name}” saved.` : `Org “${saved.name}” created (${saved.id}).`, { kind: "ok", timeout: 4000 });
    await load();
  }

  await load();
}
