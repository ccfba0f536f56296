// The selected span: what it is, the model call in GenAI terms (model, tokens, time to first token, finish
// reasons), every attribute (gen_ai.* first), its events (guardrail verdicts as a table) and, when content
// capture is on, the messages sent to the model and its answer (already PII-masked by the server).

import { chip, el } from "../common/dom.js";
import { kv, ms, table, valueText } from "./dom.js";

const MESSAGE_KEYS = ["gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"];
// The GenAI attributes in the order people look for them.
const GENAI_ORDER = [
  "gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
  "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens", "gen_ai.response.finish_reasons",
  "gen_ai.response.id", "gen_ai.request.max_tokens", "gen_ai.request.temperature", "gen_ai.request.top_p",
  "gen_ai.request.seed", "gen_ai.request.choice.count", "gen_ai.agent.name",
];
const VERDICT_PREFIX = "keel.guardrails.";

function order(keys, first) {
  const rank = (k) => {
    const i = first.indexOf(k);
    return i < 0 ? first.length : i;
  };
  return [...keys].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

function attrRows(attrs, keys) {
  return keys.map((k) => el("tr", { "data-attr": k },
    el("th", { scope: "row", class: "attr-key mono", text: k }),
    el("td", { class: "attr-value" }, el("span", { class: "mono", text: valueText(attrs[k]) }))));
}

/** The model call at a glance: model, tokens in / out, TTFT, finish reasons (only what the span has). */
function modelCall(a) {
  const model = a["gen_ai.response.model"] || a["gen_ai.request.model"];
  const tokensIn = a["gen_ai.usage.input_tokens"];
  const tokensOut = a["gen_ai.usage.output_tokens"];
  const finish = a["gen_ai.response.finish_reasons"];
  const pairs = [
    ["Model", model],
    ["Alias", a["keel.model_alias"]],
    ["Backend", a["keel.backend"]],
    ["Adapter", a["keel.adapter"]],
    ["Input tokens", tokensIn === undefined ? null : Number(tokensIn).toLocaleString()],
    ["Output tokens", tokensOut === undefined ? null : Number(tokensOut).toLocaleString()],
    ["Time to first token", a["keel.ttft_ms"] === undefined ? null : ms(a["keel.ttft_ms"])],
    ["Finish reasons", finish === undefined ? null : valueText(finish)],
    ["Agent", a["gen_ai.agent.name"]],
  ];
  if (!pairs.some(([, v]) => v !== undefined && v !== null)) return null;
  return el("section", { class: "genai", "aria-labelledby": "genai-title" },
    el("h3", { class: "sub", id: "genai-title", text: "Model call (GenAI)" }),
    kv(pairs, { id: "genai-summary", class: "kv kv-grid" }));
}

function eventOffset(span, ev) {
  try {
    return ms(Number(BigInt(ev.at_ns) - BigInt(span.start_ns)) / 1e6);
  } catch {
    return "—";
  }
}

function verdictTable(span, events) {
  const rows = events.map((ev) => {
    const a = ev.attributes || {};
    const verdict = String(a["keel.guardrails.verdict"] ?? "");
    const action = String(a["keel.guardrails.action"] ?? "");
    const score = a["keel.guardrails.score"];
    return el("tr", { "data-validator": a["keel.guardrails.validator"] || "" },
      el("td", { class: "mono", text: a["keel.guardrails.validator"] || "—" }),
      el("td", {}, chip(verdict || "—", `verdict-chip verdict-${verdict}`)),
      el("td", {}, action && action !== "none" ? chip(action, `action-${action}`) : el("span", { class: "muted", text: action || "—" })),
      el("td", { class: "num", text: score === undefined ? "—" : Number(score).toFixed(3) }),
      el("td", { class: "num", text: `+${eventOffset(span, ev)}` }));
  });
  return table("Guardrail verdicts", ["Validator", "Verdict", "Action", ["Score", "num"], ["At", "num"]], rows);
}

function otherEvents(span, events) {
  const rows = events.map((ev) => el("tr", { "data-event": ev.name },
    el("td", { class: "mono", text: ev.name }),
    el("td", { class: "num", text: `+${eventOffset(span, ev)}` }),
    el("td", { class: "mono small-text" }, Object.entries(ev.attributes || {})
      .map(([k, v]) => `${k.startsWith(VERDICT_PREFIX) ? k.slice(VERDICT_PREFIX.length) : k}=${valueText(v)}`)
      .join(", ") || el("span", { class: "muted", text: "—" }))));
  return table("Span events", ["Event", ["At", "num"], "Attributes"], rows);
}

/** gen_ai.*.messages: JSON lists of {role, content | parts}; anything else is shown as it is. */
function messages(title, raw, cls) {
  let list = null;
  try {
    const parsed = typeof raw === "string" ? JSON.parse(raw) : raw;
    list = Array.isArray(parsed) ? parsed : null;
  } catch {
    list = null;
  }
  const body = list === null
    ? [el("pre", { class: "rendered-text", text: String(raw) })]
    : list.map((m) => {
      const role = (m && m.role) || "message";
      let text = m && m.content !== undefined ? m.content : m && m.parts ? m.parts : m;
      if (Array.isArray(text)) text = text.map((p) => (p && p.content !== undefined ? p.content : p && p.text !== undefined ? p.text : JSON.stringify(p))).join("\n");
      if (typeof text !== "string") text = JSON.stringify(text, null, 2);
      return el("div", { class: `rendered rendered-${role}` },
        el("div", { class: "rendered-role", text: role }),
        el("pre", { class: "rendered-text", text }));
    });
  return el("div", { class: `messages-block ${cls}` }, el("h4", { class: "msg-title", text: title }), body);
}

function retrieval(a) {
  const scores = a["keel.rag.scores"];
  const ids = a["keel.rag.chunk_ids"];
  if (!Array.isArray(scores) && !Array.isArray(ids)) return null;
  const n = Math.max((scores || []).length, (ids || []).length);
  const rows = Array.from({ length: n }, (_, i) => el("tr", {},
    el("td", { class: "num", text: String(i + 1) }),
    el("td", { class: "mono", text: ids && ids[i] !== undefined ? String(ids[i]) : "—" }),
    el("td", { class: "num", text: scores && scores[i] !== undefined ? Number(scores[i]).toFixed(4) : "—" })));
  return el("section", { "aria-labelledby": "retrieved-title" },
    el("h3", { class: "sub", id: "retrieved-title", text: "Retrieved chunks" }),
    table("Retrieved chunks", [["#", "num"], "Chunk", ["Score", "num"]], rows, { empty: "No chunk was retrieved." }));
}

/** The detail panel's content for `node` (a layout() row) of a trace that starts at `traceStartNs`. */
export function renderSpan(node, { captureHint = true } = {}) {
  const s = node.span;
  const a = s.attributes || {};
  const keys = Object.keys(a).filter((k) => !MESSAGE_KEYS.includes(k));
  const genai = order(keys.filter((k) => k.startsWith("gen_ai.") || k === "keel.ttft_ms"), [...GENAI_ORDER, "keel.ttft_ms"]);
  const rest = keys.filter((k) => !genai.includes(k)).sort();
  const verdicts = (s.events || []).filter((e) => e.name === "guardrail.verdict");
  const others = (s.events || []).filter((e) => e.name !== "guardrail.verdict");
  const error = s.status === "ERROR";
  const parts = [];

  parts.push(el("div", { class: "span-head" },
    el("h2", { id: "span-title" }, el("span", { class: "muted", text: "Span " }), el("span", { class: "mono", text: s.name })),
    el("div", { class: "chips" }, chip((s.kind || "").toLowerCase(), `kind-chip kind-${(s.kind || "").toLowerCase()}`),
      error ? chip("error", "status-error") : s.status === "OK" ? chip("ok", "status-ok") : null)));
  if (error) {
    parts.push(el("div", { class: "alert error", role: "note" }, el("strong", { text: "This span ended in an error." }),
      s.status_message || (a["error.type"] ? `error type ${a["error.type"]}` : null)
        || (a["http.status_code"] ? `HTTP status ${a["http.status_code"]}` : "(no message)")));
  }
  parts.push(kv([
    ["Starts", `+${ms(node.offsetNs / 1e6)} into the trace`],
    ["Duration", ms(node.durNs / 1e6)],
    ["Parent", node.parent ? node.parent.span.name : s.parent_id ? `${s.parent_id} (outside this trace)` : "— (root)"],
    ["Service", s.service],
    ["Span id", el("span", { class: "mono", text: s.span_id })],
  ], { class: "kv kv-grid span-meta" }));

  const call = modelCall(a);
  if (call) parts.push(call);

  const rag = retrieval(a);
  if (rag) parts.push(rag);

  const groups = [];
  if (genai.length) {
    groups.push(el("tbody", { class: "attr-group", "aria-label": "GenAI attributes" },
      el("tr", {}, el("th", { colspan: "2", scope: "colgroup", class: "group-head", text: "GenAI (gen_ai.*)" })),
      attrRows(a, genai)));
  }
  if (rest.length) {
    groups.push(el("tbody", { class: "attr-group", "aria-label": genai.length ? "Other attributes" : null },
      genai.length ? el("tr", {}, el("th", { colspan: "2", scope: "colgroup", class: "group-head",
        text: "Other attributes" })) : null,
      attrRows(a, rest)));
  }
  parts.push(el("section", { "aria-labelledby": "attrs-title" },
    el("h3", { class: "sub", id: "attrs-title", text: `Attributes (${keys.length})` }),
    keys.length
      ? el("div", { class: "table-wrap" }, el("table", { class: "data-table attr-table", "aria-label": "Span attributes" },
        el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Attribute" }), el("th", { scope: "col", text: "Value" }))),
        groups))
      : el("p", { class: "muted", text: "No attributes." })));

  if (verdicts.length) {
    parts.push(el("section", { "aria-labelledby": "verdicts-title" },
      el("h3", { class: "sub", id: "verdicts-title", text: `Guardrail verdicts (${verdicts.length})` }),
      a["keel.guardrails.policy"] ? el("p", { class: "small-text muted" }, "Policy ",
        el("span", { class: "mono", text: a["keel.guardrails.policy"] }),
        a["keel.guardrails.stage"] ? `, stage ${a["keel.guardrails.stage"]}` : "",
        a["keel.guardrails.blocked"] ? " — blocked" : "") : null,
      verdictTable(s, verdicts)));
  }
  if (others.length) {
    parts.push(el("section", { "aria-labelledby": "events-title" },
      el("h3", { class: "sub", id: "events-title", text: `Events (${others.length})` }),
      otherEvents(s, others)));
  }

  const msgs = MESSAGE_KEYS.filter((k) => a[k] !== undefined);
  if (msgs.length) {
    parts.push(el("section", { class: "captured", "aria-labelledby": "messages-title" },
      el("h3", { class: "sub", id: "messages-title", text: "Captured messages" }),
      el("p", { class: "hint", text: "Recorded with otel.capture_content on; personal data was masked before it was stored." }),
      el("div", { class: "messages-grid" },
        a["gen_ai.system_instructions"] !== undefined ? messages("System instructions", a["gen_ai.system_instructions"], "msg-system") : null,
        a["gen_ai.input.messages"] !== undefined ? messages("Input", a["gen_ai.input.messages"], "msg-input") : null,
        a["gen_ai.output.messages"] !== undefined ? messages("Output", a["gen_ai.output.messages"], "msg-output") : null)));
  } else if (captureHint && s.kind === "CLIENT" && a["gen_ai.operation.name"]) {
    parts.push(el("p", { class: "hint", id: "capture-off",
      text: "No messages on this span: the server records them only with otel.capture_content on." }));
  }
  return parts;
}
