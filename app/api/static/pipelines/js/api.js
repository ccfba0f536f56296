// Thin client for Keel's pipelines API: the page has no privileges beyond the key it is given.
// Reading pipelines and runs, starting and retrying runs need the `finetune` scope; approving, rejecting and
// cancelling a run also need `releases` (they move production traffic). An `admin` key has both.

import { apiClient, enc } from "../common/api.js";

const client = apiClient("keel.pipelines.apiKey", { cache: "no-store" });
const { request } = client;
export const session = client.session;

export const pipelines = {
  /** Every definition with its last run; `errors`: definition files that do not load, and why. */
  list: () => request("GET", "/v1/pipelines"),
  /** Start a run now (409 pipeline_run_open while one is open). */
  start: (name, reason) => request("POST", `/v1/pipelines/${enc(name)}/runs`, { body: { reason: reason || "" } }),
  /** Runs newest first, without their step logs. */
  runs: (pipeline, state, limit = 50) => request("GET", "/v1/pipelines/runs", { query: { pipeline, state, limit } }),
  /** One run with its step logs and audit events. */
  run: (runId) => request("GET", `/v1/pipelines/runs/${enc(runId)}`),
  /** approve | reject | cancel | retry, with the reason (recorded in the audit trail). */
  act: (runId, action, reason) =>
    request("POST", `/v1/pipelines/runs/${enc(runId)}/${action}`, { body: { reason: reason || "" } }),
};
