// Thin client for the Keel REST API: the studio has no privileges beyond the key it is given.

import { ApiError, apiClient, enc, send } from "../common/api.js";

const client = apiClient("keel.studio.apiKey");
const { headers, parse, request } = client;
export const session = client.session;

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
  const response = await send("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
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
