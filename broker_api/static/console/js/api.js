// Talking to the gateway: the same /v1 API the CLI and the SDKs use, authenticated by the
// console's session cookie (HttpOnly: this code never sees it). Every state-changing request
// carries the session's CSRF token, which lives in this module's memory only: never in
// localStorage, sessionStorage or a URL. A reload fetches it again from /console/api/session.

const SAFE = new Set(["GET", "HEAD", "OPTIONS"]);
const SESSION = "/console/api/session";

let csrf = null;
let csrfHeader = "x-csrf-token";

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `The gateway answered ${status}.`);
    this.status = status;
    this.type = error?.type || null;
    this.code = error?.code || null;
    this.param = error?.param || null;
  }

  static async from(response) {
    let error = null;
    try {
      error = (await response.json()).error;
    } catch {
      // not JSON: keep the status
    }
    return new ApiError(response.status, error);
  }

  get signedOut() {
    return this.status === 401;
  }
}

function url(path, query) {
  if (!query) return path;
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") params.set(k, String(v));
  }
  const qs = params.toString();
  return qs ? `${path}?${qs}` : path;
}

function headersFor(method, body, extra) {
  const headers = { Accept: "application/json", ...extra };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (!SAFE.has(method) && csrf) headers[csrfHeader] = csrf;
  return headers;
}

async function send(method, path, { body, query, signal, headers } = {}) {
  const response = await fetch(url(path, query), {
    method,
    headers: headersFor(method, body, headers),
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
    redirect: "error",
    signal,
  });
  if (!response.ok) {
    const error = await ApiError.from(response);
    if (error.signedOut && path !== SESSION) {
      window.dispatchEvent(new CustomEvent("ty:signed-out", { detail: error.message }));
    }
    throw error;
  }
  const type = response.headers.get("content-type") || "";
  return type.includes("application/json") ? response.json() : response.text();
}

export const get = (path, query, opts) => send("GET", path, { query, ...opts });
export const post = (path, body, opts) => send("POST", path, { body, ...opts });
export const put = (path, body, opts) => send("PUT", path, { body, ...opts });
export const patch = (path, body, opts) => send("PATCH", path, { body, ...opts });
export const del = (path, opts) => send("DELETE", path, opts);

function remember(session) {
  csrf = session.csrf_token;
  csrfHeader = session.csrf_header || csrfHeader;
  return session;
}

export async function signIn(key) {
  return remember(await send("POST", SESSION, { body: { key } }));
}

export async function currentSession() {
  return remember(await send("GET", SESSION));
}

export async function signOut() {
  try {
    await send("DELETE", SESSION);
  } finally {
    csrf = null;
  }
}

// Is an endpoint missing on this gateway (an unknown route answers 404 "Invalid URL")?
export function missingRoute(error) {
  return error instanceof ApiError && error.status === 404 && /^Invalid URL/.test(error.message);
}

// A streamed chat completion: yields each chunk (parsed JSON) as it arrives, and returns the
// response's headers first through `onOpen`.
export async function* streamChat(body, { signal, onOpen, cache = false } = {}) {
  const extra = { Accept: "text/event-stream" };
  if (!cache) extra["x-tokenyard-cache"] = "no";
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headersFor("POST", body, extra),
    body: JSON.stringify(body),
    credentials: "same-origin",
    cache: "no-store",
    signal,
  });
  if (!response.ok) {
    const error = await ApiError.from(response);
    if (error.signedOut) window.dispatchEvent(new CustomEvent("ty:signed-out", { detail: error.message }));
    throw error;
  }
  if (onOpen) onOpen(response.headers);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code === "timeout" ? 504 : 502, chunk.error);
      yield chunk;
    }
  }
}
