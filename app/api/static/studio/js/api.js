// Thin client for the Keel REST API: the studio has no privileges beyond the key it is given.

const KEY_STORAGE = "keel.studio.apiKey";

export class ApiError extends Error {
  constructor(status, body, fallback) {
    const err = (body && body.error) || {};
    super(err.message || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_STORAGE);
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_STORAGE, value);
    else sessionStorage.removeItem(KEY_STORAGE);
  },
};

function headers(extra = {}) {
  const h = { Accept: "application/json", ...extra };
  if (session.key) h.Authorization = `Bearer ${session.key}`;
  return h;
}

async function parse(response) {
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = { error: { message: text.slice(0, 500) } };
    }
  }
  if (!response.ok) throw new ApiError(response.status, body, response.statusText);
  return body;
}

export async function request(method, path, { body, query, signal } = {}) {
  let url = path;
  if (query) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
    const s = qs.toString();
    if (s) url += `?${s}`;
  }
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, null, `cannot reach the Keel server (${exc.message})`);
  }
  return parse(response);
}

const enc = encodeURIComponent;

export const prompts = {
  list: (q) => request("GET", "/v1/prompts", { query: { q } }),
  create: (name, content, message) => request("POST", "/v1/prompts", { body: { name, content, message } }),
  template: (name) => request("GET", `/v1/prompts/${enc(name)}`),
  versions: (name) => request("GET", `/v1/prompts/${enc(name)}/versions`),
  version: (name, ref) => request("GET", `/v1/prompts/${enc(name)}/versions/${enc(ref)}`),
  save: (name, content, baseVersion, message) =>
    request("POST", `/v1/prompts/${enc(name)}/versions`, { body: { content, base_version: baseVersion, message } }),
  preview: (content, variables, name, signal) =>
    request("POST", "/v1/prompts/preview", { body: { content, variables, name }, signal }),
  diff: (name, from, to) => request("GET", `/v1/prompts/${enc(name)}/diff`, { query: { from, to } }),
  labels: (name) => request("GET", `/v1/prompts/${enc(name)}/labels`),
  moveLabel: (name, label, version, overrideReason) =>
    request("PUT", `/v1/prompts/${enc(name)}/labels/${enc(label)}`, {
      body: overrideReason ? { version, override_reason: overrideReason } : { version },
    }),
  removeLabel: (name, label, overrideReason) =>
    request("DELETE", `/v1/prompts/${enc(name)}/labels/${enc(label)}`, {
      query: { override_reason: overrideReason },
    }),
  audit: (name, limit = 200) => request("GET", `/v1/prompts/${enc(name)}/audit`, { query: { limit } }),
};

export const models = () => request("GET", "/v1/models");

/**
 * POST /v1/chat/completions with stream: true and yield each parsed SSE chunk.
 * Errors before the stream starts are thrown as ApiError; an error event inside the stream is
 * thrown when it arrives.
 */
export async function* streamChat(body, signal) {
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify({ ...body, stream: true }),
      signal,
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, null, `cannot reach the Keel server (${exc.message})`);
  }
  if (!response.ok) await parse(response); // throws with the server's message
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // comments / keep-alive pings
        if (data === "[DONE]") return;
        let chunk;
        try {
          chunk = JSON.parse(data);
        } catch {
          continue;
        }
        if (chunk.error) throw new ApiError(500, chunk, "the stream failed");
        yield chunk;
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new ApiError(0, null, "the stream ended without [DONE]; the answer may be incomplete");
}
