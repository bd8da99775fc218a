// The console's shell: sign-in, navigation between pages (/console/<page>, history-driven),
// and who is signed in. Each page module exports `render(root, ctx)`, which may return a
// function to call when the page is left (to stop streams and timers).

import { ApiError, currentSession, signIn, signOut } from "./api.js";
import { clear, errorToast, h, toast } from "./ui.js";
import * as audit from "./pages/audit.js";
import * as keys from "./pages/keys.js";
import * as nodes from "./pages/nodes.js";
import * as orgs from "./pages/orgs.js";
import * as playground from "./pages/playground.js";
import * as providers from "./pages/providers.js";
import * as usage from "./pages/usage.js";

const PAGES = {
  keys: { title: "API keys", module: keys },
  orgs: { title: "Orgs & limits", module: orgs },
  nodes: { title: "Nodes", module: nodes },
  providers: { title: "Providers & routing", module: providers },
  usage: { title: "Usage", module: usage },
  audit: { title: "Audit log", module: audit },
  playground: { title: "Playground", module: playground },
};
const HOME = "keys";

const $ = (id) => document.getElementById(id);
let session = null;
let leave = null;
let generation = 0;

function pageFromPath() {
  const name = location.pathname.replace(/^\/console\/?/, "").split("/")[0];
  return PAGES[name] ? name : HOME;
}

function showSignIn(message) {
  session = null;
  if (leave) leave();
  leave = null;
  clear($("page"));
  $("shell").hidden = true;
  $("boot").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("signin-key").value = "";
  $("signin-key").focus();
}

function showShell() {
  $("signin").hidden = true;
  $("boot").hidden = true;
  $("shell").hidden = false;
  $("who-name").textContent = session.key_name;
  $("who-name").title = `key ${session.key_id}`;
  $("who-role").textContent = session.operator ? "Operator" : `Org admin · ${session.org.name}`;
  $("who-role").className = session.operator ? "badge accent" : "badge";
  $("crumb-org").textContent = session.operator ? "All orgs" : session.org.name;
  $("gateway-origin").textContent = location.host;
}

async function render(page) {
  if (leave) leave();
  leave = null;
  const mine = ++generation;
  const root = clear($("page"));
  document.title = `${PAGES[page].title} · Tokenyard console`;
  $("crumb-page").textContent = PAGES[page].title;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  const ctx = { session, navigate, stale: () => mine !== generation };
  try {
    const done = await PAGES[page].module.render(root, ctx);
    if (mine === generation) leave = typeof done === "function" ? done : null;
    else if (typeof done === "function") done();
  } catch (error) {
    if (error instanceof ApiError && error.signedOut) return;
    errorToast(error, `Could not load ${PAGES[page].title.toLowerCase()}`);
  }
}

export function navigate(page, { replace = false } = {}) {
  const path = `/console/${page}`;
  if (location.pathname !== path) history[replace ? "replaceState" : "pushState"]({}, "", path);
  render(page);
}

async function onSignIn(event) {
  event.preventDefault();
  const field = $("signin-key");
  const key = field.value.trim();
  $("signin-error").textContent = "";
  field.classList.remove("invalid");
  if (!key) {
    field.classList.add("invalid");
    $("signin-error").textContent = "Enter an admin API key.";
    return;
  }
  $("signin-submit").disabled = true;
  try {
    session = await signIn(key);
    field.value = "";
    showShell();
    render(pageFromPath());
  } catch (error) {
    field.classList.add("invalid");
    $("signin-error").textContent = error instanceof ApiError ? error.message : String(error);
  } finally {
    $("signin-submit").disabled = false;
  }
}

async function onSignOut() {
  try {
    await signOut();
    toast("You are signed out.", { kind: "ok", timeout: 3000 });
  } catch (error) {
    if (!(error instanceof ApiError && error.signedOut)) errorToast(error, "Sign-out failed");
  }
  showSignIn();
}

async function boot() {
  $("signin-form").addEventListener("submit", onSignIn);
  $("signout").addEventListener("click", onSignOut);
  $("nav").addEventListener("click", (event) => {
    const a = event.target.closest("a[data-page]");
    if (!a || event.metaKey || event.ctrlKey || event.shiftKey) return;
    event.preventDefault();
    navigate(a.dataset.page);
  });
  window.addEventListener("popstate", () => session && render(pageFromPath()));
  window.addEventListener("ty:signed-out", (event) => {
    if (session) showSignIn(event.detail || "Your session ended; sign in again.");
  });
  try {
    session = await currentSession();
  } catch (error) {
    showSignIn(error instanceof ApiError && error.code !== "not_signed_in" && error.signedOut ? error.message : "");
    if (!(error instanceof ApiError && error.signedOut)) errorToast(error, "The gateway did not answer");
    return;
  }
  showShell();
  if (location.pathname === "/console" || location.pathname === "/console/") history.replaceState({}, "", `/console/${HOME}`);
  render(pageFromPath());
}

boot();
