// Thin client for Keel's traces and lineage API: the page has no privileges beyond the key it is given.
// GET /v1/traces and /v1/traces/{id} need the `admin` scope (traces span every key's requests);
// GET /v1/lineage/{completion_id} needs `chat` (a key's own answers) or `admin` (any).

const KEY_STORAGE = "keel.traces.apiKey";

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

// Nanosecond timestamps (~1.8e18) are beyond a double's exact integers (2^53): read them as strings, so the
// waterfall's offsets (BigInt arithmetic) and the list's paging cursor (before_ns) stay exact.
const NS_FIELDS = /"(start_ns|end_ns|at_ns)":\s*(-?\d+)/g;

export function parseJson(text) {
  return JSON.parse(text.replace(NS_FIELDS, '"$1":"$2"'));
}

async function parse(response) {
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = parseJson(text);
    } catch {
      body = { error: { message: text.slice(0, 500) } };
    }
  }
  if (!response.ok) throw new ApiError(response.status, body, response.statusText);
  return body;
}

export async function request(method, path, { query, signal } = {}) {
  let url = path;
  if (query) {
    const qs = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
    const s = qs.toString();
    if (s) url += `?${s}`;
  }
  const init = { method, headers: { Accept: "application/json" }, signal, cache: "no-store" };
  if (session.key) init.headers.Authorization = `Bearer ${session.key}`;
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

export const traces = {
  /** Newest first: {trace_id, root, start_ns, duration_ms, spans, errors, response_id, request_id}. */
  list: ({ limit, beforeNs, name, responseId } = {}) =>
    request("GET", "/v1/traces", { query: { limit, before_ns: beforeNs, name, response_id: responseId } }),
  get: (traceId) => request("GET", `/v1/traces/${enc(traceId)}`),
};

export const lineage = {
  get: (completionId) => request("GET", `/v1/lineage/${enc(completionId)}`),
};
