// Thin client for Keel's traces and lineage API: the page has no privileges beyond the key it is given.
// GET /v1/traces and /v1/traces/{id} need the `monitor` scope (admin includes it; traces span every key's requests);
// GET /v1/lineage/{completion_id} needs `chat` (a key's own answers) or `admin` (any).

import { apiClient, enc } from "../common/api.js";

// Nanosecond timestamps (~1.8e18) are beyond a double's exact integers (2^53): read them as strings, so the
// waterfall's offsets (BigInt arithmetic) and the list's paging cursor (before_ns) stay exact.
const NS_FIELDS = /"(start_ns|end_ns|at_ns)":\s*(-?\d+)/g;

export function parseJson(text) {
  return JSON.parse(text.replace(NS_FIELDS, '"$1":"$2"'));
}

const client = apiClient("keel.traces.apiKey", { cache: "no-store", parseJson });
const { request } = client;
export const session = client.session;

export const traces = {
  /** Newest first: {trace_id, root, start_ns, duration_ms, spans, errors, response_id, request_id}. */
  list: ({ limit, beforeNs, name, responseId } = {}) =>
    request("GET", "/v1/traces", { query: { limit, before_ns: beforeNs, name, response_id: responseId } }),
  get: (traceId) => request("GET", `/v1/traces/${enc(traceId)}`),
};

export const lineage = {
  get: (completionId) => request("GET", `/v1/lineage/${enc(completionId)}`),
};
