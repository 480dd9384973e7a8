// The Etude chat page: keeps the conversation here in the page and streams each answer from
// POST /v1/chat/completions (server-sent events read through fetch + ReadableStream).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}], the system prompt excluded
let modelName = null;
let controller = null;        // AbortController of the answer being streamed
// The server's API key, when it has one: asked for on a 401, kept for this tab only.
let apiKey = sessionStorage.getItem("etude-api-key") || "";

function apiHeaders(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("model-name").textContent = message;
  $("api-key").focus();
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function requestBody() {
  const system = $("system-prompt").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  return {
    model: modelName, messages, stream: true, stream_options: { include_usage: true },
    truncation: "auto",        // a long chat loses its oldest turns rather than failing
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
    // off: the prompt closes an empty <think> block, so the model answers at once
    chat_template_kwargs: { enable_thinking: $("thinking").checked },
  };
}

// Split an SSE byte stream into the JSON payloads of its `data:` lines.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  // reasoning_content goes into a block of its own, hidden by the "Show its thinking" toggle;
  // only the answer goes back into the history (the template drops old reasoning anyway)
  const thoughts = document.createElement("div");
  thoughts.className = "reasoning";
  const body = document.createElement("div");
  bubble.append(thoughts, body);
  let reasoning = "";
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (response.status === 401) askForKey("the API key was refused");
    if (!response.ok) throw new Error(await errorText(response));
    const note = response.headers.get("X-Etude-Note");
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice && choice.delta.reasoning_content) {
        reasoning += choice.delta.reasoning_content;
        thoughts.textContent = reasoning;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice && choice.delta.content) {
        answer += choice.delta.content;
        body.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
      }
      if (chunk.usage) {
        const u = chunk.usage;
        $("status").textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} answer tokens` +
          (note ? ` (${note})` : "");
      }
    }
    bubble.dataset.state = "done";
    history.push({ role: "assistant", content: answer });
  } catch (error) {
    if (error.name === "AbortError") {
      bubble.dataset.state = "stopped";           // keep what came, so the chat can go on
      history.push({ role: "assistant", content: answer });
    } else {
      history.pop();                              // the message was not answered: forget it
      bubble.remove();
      addMessage("error", `Error: ${error.message}`);
    }
  } finally {
    controller = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller && controller.abort());

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  $("status").textContent = "";
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  sessionStorage.setItem("etude-api-key", apiKey);
  $("api-key").value = "";
  loadModel();
});

function loadModel() {
  fetch("/v1/models", { headers: apiHeaders() })
    .then((response) => {
      if (response.status === 401) {
        askForKey(apiKey ? "the API key was refused; enter it again" : "enter the server's API key");
        return null;
      }
      return response.json();
    })
    .then((body) => {
      if (!body) return;
      $("key-form").hidden = true;
      modelName = body.data[0].id;
      $("model-name").textContent = `${modelName} · context ${body.data[0].max_model_len} tokens`;
    })
    .catch(() => { $("model-name").textContent = "server unreachable"; });
}

loadModel();

$("show-thinking").addEventListener("change", (event) => {
  document.body.classList.toggle("hide-thinking", !event.target.checked);
});
