// The Keel REST API as Keel's pages call it: a page has no privileges beyond the key it is given, kept in the
// tab's sessionStorage under the page's own name.

export class ApiError extends Error {
  constructor(status, body, fallback) {
    const err = (body && body.error) || {};
    super(err.message || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

/**
 * A client of the API for one page. `storageKey`: where the page keeps its key; `cache`: fetch's cache mode of
 * its requests (undefined: the browser's default); `parseJson`: how a response body is read (JSON.parse).
 * Returns { session (its key: get/set, null forgets it), headers(extra), parse(response), request(method, path,
 * { body, query, signal }) }: a response that is not 2xx is thrown as an ApiError with the server's message, a
 * network failure as an ApiError with status 0 (an abort is rethrown as it is).
 */
export function apiClient(storageKey, { cache, parseJson = JSON.parse } = {}) {
  const session = {
    get key() {
      return sessionStorage.getItem(storageKey);
    },
    set key(value) {
      if (value) sessionStorage.setItem(storageKey, value);
      else sessionStorage.removeItem(storageKey);
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
        body = parseJson(text);
      } catch {
        body = { error: { message: text.slice(0, 500) } };
      }
    }
    if (!response.ok) throw new ApiError(response.status, body, response.statusText);
    return body;
  }

  async function request(method, path, { body, query, signal } = {}) {
    let url = path;
    if (query) {
      const qs = new URLSearchParams();
      for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
      const s = qs.toString();
      if (s) url += `?${s}`;
    }
    const init = { method, headers: headers(), signal };
    if (cache) init.cache = cache;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return parse(await send(url, init));
  }

  return { session, headers, parse, request };
}

/** fetch(), its network failure as an ApiError (status 0); an abort is rethrown as it is. */
export async function send(url, init) {
  try {
    return await fetch(url, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError(0, null, `cannot reach the Keel server (${exc.message})`);
  }
}

export const enc = encodeURIComponent;
