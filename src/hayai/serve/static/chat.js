// hayai chat page: plain JavaScript, no dependencies, works offline against the server that serves it.
// Conversations live in localStorage; answers stream from /v1/chat/completions (server-sent events over fetch).
"use strict";

const STORE = { conversations: "hayai.conversations", current: "hayai.current", settings: "hayai.settings",
                apiKey: "hayai.apiKey" };
const $ = (id) => document.getElementById(id);

const state = {
  conversations: load(STORE.conversations, []),
  currentId: load(STORE.current, null),
  controller: null, // AbortController of the answer being streamed
};

function load(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch (e) {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE.conversations, JSON.stringify(state.conversations));
  localStorage.setItem(STORE.current, JSON.stringify(state.currentId));
}

function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify({
    model: $("model").value, system: $("system").value,
    temperature: $("temperature").value, topP: $("top-p").value, maxTokens: $("max-tokens").value,
  }));
  localStorage.setItem(STORE.apiKey, JSON.stringify($("api-key").value));
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// ---- conversations -------------------------------------------------------------------------------------------
function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation() {
  const conversation = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat",
                         messages: [], updated: Date.now() };
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  save();
  render();
  $("prompt").focus();
  return conversation;
}

function deleteConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations.length ? state.conversations[0].id : null;
  save();
  render();
}

function renderList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = document.createElement("li");
    item.classList.toggle("active", c.id === state.currentId);
    const title = document.createElement("span");
    title.textContent = c.title;
    title.title = c.title;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Delete this conversation";
    remove.addEventListener("click", (event) => { event.stopPropagation(); deleteConversation(c.id); });
    item.append(title, remove);
    item.addEventListener("click", () => {
      if (state.controller) return; // do not switch while an answer streams
      state.currentId = c.id;
      save();
      render();
    });
    list.append(item);
  }
}

function messageElement(message) {
  const el = document.createElement("div");
  el.className = `message ${message.role}` + (message.state === "error" ? " error" : "");
  el.dataset.state = message.state || "done";
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = message.content;
  el.append(content);
  if (message.meta) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = message.meta;
    el.append(meta);
  }
  return el;
}

function render() {
  renderList();
  const view = $("messages");
  view.replaceChildren();
  const conversation = current();
  if (!conversation) return;
  for (const m of conversation.messages) view.append(messageElement(m));
  view.scrollTop = view.scrollHeight;
}

// ---- models --------------------------------------------------------------------------------------------------
async function loadModels() {
  const select = $("model");
  const wanted = load(STORE.settings, {}).model;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      setStatus("This server needs an API key: enter it under Settings.", true);
      $("settings").open = true;
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data.map((m) => m.id);
    select.replaceChildren(...models.map((id) => new Option(id, id)));
    if (wanted && models.includes(wanted)) select.value = wanted;
    setStatus(`Connected: ${models.length} model${models.length === 1 ? "" : "s"}.`);
  } catch (e) {
    setStatus(`Cannot list models: ${e.message}`, true);
  }
}

// ---- streaming an answer -------------------------------------------------------------------------------------
// Yields the JSON payload of each `data:` event until `data: [DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function describeSpeed(tokens, start, firstAt, lastAt) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (tokens > 1 && lastAt > firstAt) parts.push(`${((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1)} tok/s`);
  if (firstAt) parts.push(`first token after ${((firstAt - start) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

async function send(text) {
  const conversation = current() || newConversation();
  conversation.messages.push({ role: "user", content: text });
  if (conversation.title === "New chat") conversation.title = text.slice(0, 60);
  conversation.updated = Date.now();
  save();
  render();

  const answer = { role: "assistant", content: "", state: "streaming" };
  const el = messageElement(answer);
  el.classList.add("streaming");
  $("messages").append(el);
  const content = el.querySelector(".content");

  const system = $("system").value.trim();
  const history = conversation.messages.filter((m) => m.role === "user" || (m.role === "assistant" && !m.failed))
    .map((m) => ({ role: m.role, content: m.content }));
  const request = (messages) => fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal: state.controller.signal, body: JSON.stringify({
      model: $("model").value || undefined,
      messages: (system ? [{ role: "system", content: system }] : []).concat(messages),
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_tokens: Number($("max-tokens").value) || undefined,
    }),
  });

  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const start = performance.now();
  let firstAt = 0, lastAt = 0, chunks = 0, usage = null, finish = null, dropped = 0;
  try {
    let response;
    for (;;) {
      response = await request(history.slice(dropped));
      if (response.ok) break;
      const error = await response.json().catch(() => ({}));
      const code = error.error && error.error.code;
      // The conversation outgrew the context window: forget the oldest exchange and try again.
      if (code === "context_length_exceeded" && history.length - dropped > 2) { dropped += 2; continue; }
      throw new Error(error.error ? `${response.status}: ${error.error.message}` : `${response.status}`);
    }
    if (dropped) setStatus(`The conversation outgrew the context window: the oldest ${dropped / 2} ` +
                           `exchange${dropped === 2 ? " was" : "s were"} left out.`);
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        const now = performance.now();
        if (!firstAt) firstAt = now;
        lastAt = now;
        chunks += 1;
        answer.content += piece;
        content.textContent = answer.content;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    answer.meta = describeSpeed(tokens, start, firstAt, lastAt) + (finish === "length" ? " · hit max tokens" : "");
    answer.state = "done";
    if (!dropped) setStatus("");
  } catch (e) {
    if (e.name === "AbortError") {
      answer.meta = describeSpeed(chunks, start, firstAt, lastAt) + " · stopped";
      answer.state = "stopped";
    } else {
      answer.content = answer.content || e.message;
      answer.meta = answer.content === e.message ? "error" : `error: ${e.message}`;
      answer.failed = !answer.content || answer.content === e.message;
      answer.state = "error";
      setStatus(e.message, true);
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  save();
  render();
}

// ---- wiring --------------------------------------------------------------------------------------------------
function init() {
  const settings = load(STORE.settings, {});
  if (settings.system) $("system").value = settings.system;
  if (settings.temperature) $("temperature").value = settings.temperature;
  if (settings.topP) $("top-p").value = settings.topP;
  if (settings.maxTokens) $("max-tokens").value = settings.maxTokens;
  $("api-key").value = load(STORE.apiKey, "");
  for (const id of ["model", "system", "temperature", "top-p", "max-tokens"]) $(id).addEventListener("change", saveSettings);
  $("api-key").addEventListener("change", () => { saveSettings(); loadModels(); });

  $("new-chat").addEventListener("click", () => { if (!state.controller) newConversation(); });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  if (!current()) state.currentId = state.conversations.length ? state.conversations[0].id : null;
  render();
  loadModels();
}

init();
