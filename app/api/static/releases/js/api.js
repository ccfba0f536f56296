// Thin client for the Keel releases API: the page has no privileges beyond the key it is given.

const KEY_STORAGE = "keel.releases.apiKey";

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
  const init = { method, headers: { Accept: "application/json" }, signal, cache: "no-store" };
  if (session.key) init.headers.Authorization = `Bearer ${session.key}`;
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

export const releases = {
  list: () => request("GET", "/v1/releases"),
  report: (name) => request("GET", `/v1/releases/${enc(name)}`),
  series: (name, bucketS) => request("GET", `/v1/releases/${enc(name)}/series`, { query: { bucket_s: bucketS } }),
  shadow: (name, limit = 20) => request("GET", `/v1/releases/${enc(name)}/shadow`, { query: { limit } }),
  /** pause | resume | promote | rollback, with the reason (and for promote, optionally the variant). */
  act: (name, action, reason, variant) =>
    request("POST", `/v1/releases/${enc(name)}/${action}`, {
      body: variant ? { reason, variant } : { reason },
    }),
};
