// The playground: chat with streaming against any model, on any route (a pool pinned with
// OpenRouter's `provider.only`), and two routes side by side on the same prompt with their
// latency, time to first token, tokens and cost. Requests go to /v1/chat/completions as the
// signed-in admin key, billed and limited like any other call; each asks for the usage chunk
// (`stream_options.include_usage`) with its cost (`usage.include`).

import { ApiError, get, streamChat } from "../api.js";
import { knownPools } from "./providers.js";
import { button, card, checkbox, clear, empty, errorToast, field, fmt, h, input, pageHead, select } from "../ui.js";

function body({ model, pool, messages, temperature, maxTokens }) {
  const out = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    usage: { include: true },
  };
  if (temperature !== "") out.temperature = Number(temperature);
  if (maxTokens !== "") out.max_tokens = Number(maxTokens);
  if (pool) out.provider = { only: [pool], allow_fallbacks: false };
  return out;
}

// One streamed completion; `onText(text)` gets the whole answer so far on each delta.
async function run(request, { signal, cache, onText }) {
  const started = performance.now();
  const result = { ttft: null, latency: null, usage: null, finish: null, cache: null, text: "" };
  for await (const chunk of streamChat(request, { signal, cache, onOpen: (headers) => (result.cache = headers.get("x-tokenyard-cache")) })) {
    if (chunk.usage) result.usage = chunk.usage;
    for (const choice of chunk.choices || []) {
      const piece = choice.delta?.content;
      if (piece) {
        if (result.ttft === null) result.ttft = performance.now() - started;
        result.text += piece;
        onText(result.text);
      }
      if (choice.finish_reason) result.finish = choice.finish_reason;
    }
  }
  result.latency = performance.now() - started;
  return result;
}

function rate(r) {
  const tokens = r.usage?.completion_tokens;
  if (!tokens || r.latency === null) return null;
  const seconds = (r.latency - (r.ttft || 0)) / 1000;
  return seconds > 0 ? tokens / seconds : null;
}

function routeField(id, pools, label = "Route (pool)") {
  const listId = `${id}-pools`;
  const el = input("route", { placeholder: "any: the gateway routes" });
  el.id = id;
  el.setAttribute("list", listId);
  const f = field(label, el, { help: "Pin one pool (provider.only), or leave empty for the gateway's routing." });
  f.append(h("datalist", { id: listId }, [...pools.keys()].map((p) => h("option", { value: p }))));
  return [f, el];
}

export async function render(root, ctx) {
  const [models, pools] = await Promise.all([get("/v1/models").then((m) => m.data), knownPools()]);
  if (ctx.stale()) return;
  const controllers = new Set();
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const area = h("div");
  root.append(pageHead("Playground", "Chat with any model or route, or run one prompt on two routes side by side. Requests are billed to your key's org like any other."), tabs, area);
  if (!models.length) {
    area.append(card("No models", null, h("div", { class: "card-body" },
      empty("No model is served right now", "Start a worker or a cloud adapter; its models appear within a second."))));
    return;
  }
  const modes = { chat: "Chat", compare: "Compare routes" };
  let mode = "chat";
  const show = () => {
    clear(tabs).append(...Object.entries(modes).map(([k, label]) =>
      h("button", { type: "button", class: k === mode ? "active" : "", id: `tab-${k}`, role: "tab", onclick: () => { mode = k; show(); } }, label)));
    clear(area).append(mode === "chat" ? chat(models, pools, controllers) : compare(models, pools, controllers));
  };
  show();
  return () => {
    for (const c of controllers) c.abort();
  };
}

function modelSelect(id, models, value) {
  const el = select("model", models.map((m) => m.id), value || models[0].id);
  el.id = id;
  return el;
}

function params() {
  const temperature = input("temperature", { type: "number", min: "0", max: "2", step: "0.1", value: "0.7" });
  const maxTokens = input("max_tokens", { type: "number", min: "1", step: "1", value: "256" });
  const system = h("textarea", { name: "system", placeholder: "You are a helpful assistant." });
  const cache = checkbox("cache", "Allow answers from the response cache");
  return { temperature, maxTokens, system, cache };
}

function stat(name, label, value) {
  return h("span", { class: "stat", dataset: { stat: name } }, `${label} ${value}`);
}

// --- chat ------------------------------------------------------------------------------

function chat(models, pools, controllers) {
  const model = modelSelect("play-model", models);
  const [routeF, route] = routeField("play-route", pools);
  const p = params();
  p.temperature.id = "play-temperature";
  const transcript = h("div", { class: "transcript", id: "transcript" });
  const prompt = h("textarea", { id: "play-input", name: "prompt", placeholder: "Send a message… (Ctrl+Enter)" });
  const send = button("Send", () => go(), { kind: "primary", id: "play-send" });
  const stop = button("Stop", () => current?.abort(), { id: "play-stop", disabled: true });
  const messages = [];
  let current = null;

  const placeholder = () => empty("Start a conversation", "Pick a model and, to test one route, a pool; the answer streams in as it is generated.");
  transcript.append(placeholder());

  function bubble(role, text) {
    const node = h("div", { class: `msg ${role}` }, h("div", { class: "who-label" }, role === "user" ? "You" : model.value),
      h("div", { class: "bubble" }, text));
    if (!messages.length && transcript.querySelector(".empty")) clear(transcript);
    transcript.append(node);
    transcript.scrollTop = transcript.scrollHeight;
    return node;
  }

  async function go() {
    const text = prompt.value.trim();
    if (!text || current) return;
    prompt.value = "";
    bubble("user", text);
    messages.push({ role: "user", content: text });
    const reply = bubble("assistant", "");
    const answer = reply.querySelector(".bubble");
    answer.classList.add("streaming");
    const history = p.system.value.trim() ? [{ role: "system", content: p.system.value.trim() }, ...messages] : [...messages];
    current = new AbortController();
    controllers.add(current);
    send.disabled = true;
    stop.disabled = false;
    const pool = route.value.trim();
    try {
      const r = await run(body({ model: model.value, pool, messages: history, temperature: p.temperature.value, maxTokens: p.maxTokens.value }),
        { signal: current.signal, cache: p.cache.querySelector("input").checked, onText: (t) => { answer.textContent = t; transcript.scrollTop = transcript.scrollHeight; } });
      messages.push({ role: "assistant", content: r.text });
      reply.append(h("div", { class: "stats" },
        stat("route", "route", pool || "gateway's choice"),
        stat("ttft", "TTFT", fmt.ms(r.ttft)),
        stat("latency", "latency", fmt.ms(r.latency)),
        stat("tokens", "tokens", r.usage ? `${fmt.int(r.usage.prompt_tokens)} in · ${fmt.int(r.usage.completion_tokens)} out` : "—"),
        stat("rate", "speed", rate(r) ? `${rate(r).toFixed(1)} tok/s` : "—"),
        stat("cost", "cost", fmt.cost(r.usage?.cost ?? null)),
        r.cache ? stat("cache", "cache", r.cache) : null));
    } catch (error) {
      messages.pop();
      reply.classList.add("error");
      if (error.name === "AbortError") answer.textContent = (answer.textContent ? answer.textContent + "\n" : "") + "[stopped]";
      else {
        answer.textContent = error instanceof ApiError ? `${error.status} ${error.code || error.type || ""}: ${error.message}` : String(error);
        errorToast(error, "The model did not answer");
      }
    } finally {
      answer.classList.remove("streaming");
      controllers.delete(current);
      current = null;
      send.disabled = false;
      stop.disabled = true;
      prompt.focus();
    }
  }

  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      go();
    }
  });
  const reset = button("Clear conversation", () => {
    if (current) current.abort();
    messages.length = 0;
    clear(transcript).append(placeholder());
  }, { id: "play-clear" });

  return h("div", { class: "play" },
    card("Settings", null, h("div", { class: "card-body play-settings" },
      field("Model", model), routeF,
      h("div", { class: "grid-2" }, field("Temperature", p.temperature), field("Max tokens", p.maxTokens)),
      field("System prompt", p.system), p.cache, reset)),
    h("section", { class: "card" }, transcript, h("div", { class: "composer" }, prompt, h("div", { class: "actions" }, stop, send))));
}

// --- compare ---------------------------------------------------------------------------

const METRICS = [
  ["status", "Status", null],
  ["latency", "Latency", "low"],
  ["ttft", "Time to first token", "low"],
  ["prompt_tokens", "Prompt tokens", null],
  ["completion_tokens", "Completion tokens", null],
  ["rate", "Tokens / s", "high"],
  ["cost", "Cost", "low"],
];

function lane(name, models, pools, pool) {
  const model = modelSelect(`lane-${name}-model`, models);
  const [routeF, route] = routeField(`lane-${name}-route`, pools);
  if (pool) route.value = pool;
  const answer = h("div", { class: "answer", id: `lane-${name}-answer` });
  const cells = Object.fromEntries(METRICS.map(([k]) => [k, h("td", { dataset: { metric: k } }, "—")]));
  const metrics = h("table", { class: "metrics" }, h("tbody", {}, METRICS.map(([k, label]) => h("tr", { dataset: { row: k } }, h("td", {}, label), cells[k]))));
  const node = h("section", { class: "card lane", id: `lane-${name}` },
    h("div", { class: "card-head" }, h("h2", { text: `Route ${name.toUpperCase()}` })),
    h("div", { class: "card-body form-section" }, h("div", { class: "grid-2" }, field("Model", model), routeF), answer, metrics));
  return { name, node, model, route, answer, cells, metrics, result: null };
}

function compare(models, pools, controllers) {
  const names = [...pools.keys()];
  const a = lane("a", models, pools, names[0] || "");
  const b = lane("b", models, pools, names[1] || "");
  const p = params();
  const prompt = h("textarea", { id: "compare-prompt", name: "prompt", placeholder: "One prompt, sent to both routes at once." });
  const runBtn = button("Run both", () => go(), { kind: "primary", id: "compare-run" });

  async function one(l, request, cache) {
    const controller = new AbortController();
    controllers.add(controller);
    l.answer.className = "answer streaming";
    l.answer.textContent = "";
    for (const c of Object.values(l.cells)) c.textContent = "…";
    l.result = null;
    try {
      const r = await run(request, { signal: controller.signal, cache, onText: (t) => (l.answer.textContent = t) });
      l.result = r;
      l.cells.status.textContent = r.finish ? `ok (${r.finish})` : "ok";
      l.cells.latency.textContent = fmt.ms(r.latency);
      l.cells.ttft.textContent = fmt.ms(r.ttft);
      l.cells.prompt_tokens.textContent = fmt.int(r.usage?.prompt_tokens);
      l.cells.completion_tokens.textContent = fmt.int(r.usage?.completion_tokens);
      l.cells.rate.textContent = rate(r) ? rate(r).toFixed(1) : "—";
      l.cells.cost.textContent = fmt.cost(r.usage?.cost ?? null);
    } catch (error) {
      l.answer.classList.add("failed");
      l.answer.textContent = error instanceof ApiError ? `${error.status} ${error.code || error.type || ""}: ${error.message}` : String(error);
      for (const c of Object.values(l.cells)) c.textContent = "—";
      l.cells.status.textContent = error instanceof ApiError ? `error ${error.status}` : "error";
    } finally {
      l.answer.classList.remove("streaming");
      controllers.delete(controller);
    }
  }

  function best() {
    for (const [k, , better] of METRICS) {
      for (const l of [a, b]) l.metrics.querySelector(`tr[data-row="${k}"]`).classList.remove("best");
      if (!better || !a.result || !b.result) continue;
      const value = (l) => (k === "rate" ? rate(l.result) : k === "cost" ? l.result.usage?.cost : l.result[k]);
      const [va, vb] = [value(a), value(b)];
      if (va === null || vb === null || va === undefined || vb === undefined || va === vb) continue;
      const winner = (better === "low" ? va < vb : va > vb) ? a : b;
      winner.metrics.querySelector(`tr[data-row="${k}"]`).classList.add("best");
    }
  }

  async function go() {
    const text = prompt.value.trim();
    if (!text) {
      prompt.classList.add("invalid");
      prompt.focus();
      return;
    }
    prompt.classList.remove("invalid");
    runBtn.disabled = true;
    const messages = p.system.value.trim() ? [{ role: "system", content: p.system.value.trim() }, { role: "user", content: text }] : [{ role: "user", content: text }];
    const cache = p.cache.querySelector("input").checked;
    const request = (l) => body({ model: l.model.value, pool: l.route.value.trim(), messages, temperature: p.temperature.value, maxTokens: p.maxTokens.value });
    try {
      await Promise.all([one(a, request(a), cache), one(b, request(b), cache)]);
      best();
    } finally {
      runBtn.disabled = false;
    }
  }

  return h("div", { class: "form-section" },
    card("Prompt", "Sent to both routes at the same moment.", h("div", { class: "card-body form-section" },
      field("Prompt", prompt),
      h("div", { class: "grid-4" }, field("Temperature", p.temperature), field("Max tokens", p.maxTokens), h("div", { class: "field" }, h("span", { class: "label-text" }, " "), p.cache)),
      field("System prompt", p.system),
      h("div", { class: "actions" }, runBtn))),
    h("div", { class: "compare" }, a.node, b.node));
}
