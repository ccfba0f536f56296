// Thin client for Keel's agents API: the page has no privileges beyond the key it is given.
// POST /v1/agents/ops/runs (streamed), GET /v1/agents/approvals and POST /v1/agents/runs/{run_id}/resume need the
// `chat` scope (an `admin` key sees and resumes every key's runs); the ops agent's tools use the key's other scopes.

import { ApiError, apiClient, enc, send } from "../common/api.js";

const client = apiClient("keel.ops.apiKey", { cache: "no-store" });
const { headers, parse, request } = client;
export const session = client.session;

export const agents = {
  /** Runs waiting for a person: {run_id, thread_id, workflow, question, tool, args, call_id, reason, since}. */
  approvals: () => request("GET", "/v1/agents/approvals"),
  /** Approve or reject a run's pending call; the resumed run's RunResult (status, answer, interrupt, events). */
  resume: (runId, action, reason) => request("POST", `/v1/agents/runs/${enc(runId)}/resume`, {
    body: { action, reason: reason || undefined, stream: false },
  }),
};

/** One SSE message ("event:", "data:" lines) as the JSON its data holds; null for a comment or a ping. */
export function parseSse(message) {
  const data = message
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, ""))
    .join("\n");
  if (!data) return null;
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

/**
 * Ask the ops agent: POST /v1/agents/ops/runs with stream: true, yielding each event ({type, seq, run_id, ...}) as
 * it arrives. An error before the run starts (a refused key, a missing scope, a bad body) is thrown as an ApiError
 * with the server's message; the stream itself ends with a `final`, `interrupt` or `error` event.
 */
export async function* streamRun(input, signal) {
  const response = await send("/v1/agents/ops/runs", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ input, stream: true }),
    cache: "no-store",
    signal,
  });
  if (!response.ok) await parse(response); // throws with the server's message
  if (!response.body) throw new ApiError(0, null, "the server sent no event stream");
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // line ends as "\n" (a "\r" at the end may be half of a "\r\n" still to come)
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      buffer = buffer.slice(0, cut).replace(/\r\n?/g, "\n") + buffer.slice(cut);
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseSse(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event && event.type) yield event;
      }
    }
    finished = true;
    const last = parseSse(buffer.replace(/\r\n?/g, "\n"));
    if (last && last.type) yield last;
  } finally {
    // a reader that stops early (an abort, the page moving on) closes the stream: the server cancels the run
    if (!finished) reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
