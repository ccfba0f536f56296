// Thin client for the Keel releases API: the page has no privileges beyond the key it is given.

import { apiClient, enc } from "../common/api.js";

const client = apiClient("keel.releases.apiKey", { cache: "no-store" });
const { request } = client;
export const session = client.session;

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
