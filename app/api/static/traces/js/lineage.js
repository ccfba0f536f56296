// The lineage of an answer (GET /v1/lineage/{completion_id}): the prompt version and its hash, the model
// route and adapter, the release variant, the passages given to the model, the guardrail policy and every
// verdict, the eval runs of the prompt version and the feedback on the answer.

import { chip, el, timeEl } from "../common/dom.js";
import { kv, ms, table, valueText } from "./dom.js";

function mono(text, title) {
  return el("span", { class: "mono", text: text ?? "—", title });
}

function section(id, title, ...children) {
  return el("section", { class: "lineage-part", "aria-labelledby": id, "data-part": id.replace("lineage-", "") },
    el("h3", { class: "sub", id, text: title }), children);
}

function outcomeChip(outcome) {
  const ok = outcome === "ok";
  return chip(outcome || "—", ok ? "status-ok" : "status-error");
}

function answer(rec) {
  const usage = rec.usage || {};
  const finish = Object.values(rec.finish_reasons || {});
  return section("lineage-answer", "Answer", kv([
    ["Completion id", mono(rec.id)],
    ["Created", rec.created ? timeEl(rec.created * 1000) : null],
    ["Model asked for", rec.requested_model ? mono(rec.requested_model) : null],
    ["Outcome", outcomeChip(rec.outcome)],
    ["Latency", rec.latency_ms === undefined ? null : ms(rec.latency_ms)],
    ["Tokens in / out", usage.prompt_tokens === undefined ? null
      : `${Number(usage.prompt_tokens).toLocaleString()} / ${Number(usage.completion_tokens).toLocaleString()}`],
    ["Finish reasons", finish.length ? finish.join(", ") : null],
    ["Request id", rec.request_id ? mono(rec.request_id) : null],
  ], { class: "kv" }));
}

function prompt(rec) {
  const p = rec.prompt;
  if (!p) {
    return section("lineage-prompt", "Prompt",
      el("p", { class: "muted small-text", text: "No registry prompt: the messages went to the model as sent." }));
  }
  const runs = p.eval_runs || [];
  const rows = runs.map((r) => el("tr", { "data-run": r.id },
    el("td", { class: "mono", text: r.suite }),
    el("td", {}, r.passed === true ? chip("passed", "status-ok") : r.passed === false ? chip("failed", "status-error")
      : chip("unknown", "chip-muted")),
    el("td", {}, r.finished_at ? timeEl(r.finished_at * 1000) : "—"),
    el("td", { class: "mono small-text", text: r.id })));
  return section("lineage-prompt", "Prompt",
    kv([
      ["Version", mono(p.ref)],
      ["Hash", mono(p.hash ? `${p.hash.slice(0, 16)}…` : "—", p.hash)],
    ], { class: "kv" }),
    el("h4", { class: "msg-title", text: `Eval runs of this version (${runs.length})` }),
    table("Eval runs", ["Suite", "Result", "Finished", "Run"], rows,
      { empty: "No eval suite has run on this prompt version." }));
}

function route(rec) {
  const r = rec.route;
  if (!r) return section("lineage-route", "Route", el("p", { class: "muted small-text", text: "No route recorded." }));
  if (r.workflow) {
    return section("lineage-route", "Route", kv([["Agent workflow", mono(r.workflow)]], { class: "kv" }));
  }
  const av = r.adapter_version;
  return section("lineage-route", "Route", kv([
    ["Alias", mono(r.alias)],
    ["Backend", mono(r.backend)],
    ["Model", mono(r.model)],
    ["Adapter", r.adapter ? mono(r.adapter) : "none"],
    ["Adapter version", av ? mono(`${av.model || ""}${av.version !== undefined && av.version !== null ? ` v${av.version}` : ""}`.trim() || valueText(av)) : null],
    ["Adapter hash", av && av.hash ? mono(String(av.hash).slice(0, 16)) : null],
    ["Adapter evals", av ? ((av.eval_runs || []).map((e) => `${e.suite} ${e.passed ? "passed" : "failed"}`).join(", ") || "none") : null],
    ["Routing", r.owner ? `${r.owner}${r.revision !== undefined && r.revision !== null ? `, revision ${r.revision}` : ""}` : null],
  ], { class: "kv" }));
}

function release(rec) {
  const r = rec.release;
  return section("lineage-release", "Release", r
    ? kv([
      ["Release", el("a", { href: `/releases#release=${encodeURIComponent(r.name)}`, class: "mono", text: r.name })],
      ["Variant", mono(r.variant)],
    ], { class: "kv" })
    : el("p", { class: "muted small-text", text: "Not served through a release." }));
}

function guardrails(rec) {
  const policy = rec.guardrails && rec.guardrails.policy;
  const events = rec.guardrail_events || [];
  const verdicts = rec.guardrail_verdicts || [];
  const eventRows = events.map((e) => el("tr", {},
    el("td", {}, chip(e.type || "—", e.type === "blocked" || e.type === "retraction" ? "status-error" : "chip-warn")),
    el("td", { class: "mono", text: e.validator || "—" }),
    el("td", { class: "small-text", text: e.reason || (e.kinds ? valueText(e.kinds) : "") })));
  const verdictRows = verdicts.map((v) => el("tr", { "data-validator": v.validator },
    el("td", { text: v.stage }),
    el("td", { class: "mono", text: v.validator }),
    el("td", {}, chip(v.verdict, `verdict-chip verdict-${v.verdict}`)),
    el("td", {}, v.action && v.action !== "none" ? chip(v.action, `action-${v.action}`) : el("span", { class: "muted", text: v.action || "—" })),
    el("td", { class: "num", text: v.score === undefined || v.score === null ? "—" : Number(v.score).toFixed(3) }),
    el("td", { class: "num", text: ms(v.latency_ms) }),
    el("td", { class: "small-text", text: v.reason || "" })));
  return section("lineage-guardrails", "Guardrails",
    kv([["Policy", policy ? mono(policy) : "none (guardrails off for this request)"]], { class: "kv" }),
    events.length ? [el("h4", { class: "msg-title", text: "What the guards did" }),
      table("Guardrail events", ["Event", "Validator", "Reason"], eventRows)] : null,
    el("h4", { class: "msg-title", text: `Verdicts (${verdicts.length})` }),
    table("Lineage guardrail verdicts", ["Stage", "Validator", "Verdict", "Action", ["Score", "num"], ["Latency", "num"], "Reason"],
      verdictRows, { empty: "No verdict recorded for this request." }));
}

function passages(rec) {
  const list = rec.retrieval;
  if (!list) {
    return section("lineage-passages", "Passages",
      el("p", { class: "muted small-text", text: "Not a grounded answer: no passages were retrieved." }));
  }
  const rows = list.map((p, i) => el("tr", { "data-chunk": p.chunk_id || "" },
    el("td", { class: "num", text: String(p.index ?? i + 1) }),
    el("td", { class: "mono", text: p.doc_id || "—" }),
    el("td", { class: "mono small-text", text: p.chunk_id || "—" }),
    el("td", { class: "mono small-text", text: p.snapshot_id || "—" }),
    el("td", { class: "small-text", text: p.title || p.source || "" }),
    el("td", { class: "num", text: p.score === undefined || p.score === null ? "—" : Number(p.score).toFixed(4) }),
    el("td", {}, p.cited ? chip("cited", "status-ok") : el("span", { class: "muted", text: "no" }))));
  return section("lineage-passages", `Passages (${list.length})`,
    table("Passages", [["#", "num"], "Document", "Chunk", "Snapshot", "Title", ["Score", "num"], "Cited"], rows,
      { empty: "Retrieval found nothing." }));
}

function feedback(rec) {
  const list = rec.feedback || [];
  const rows = list.map((f) => el("tr", {},
    el("td", {}, f.at ? timeEl(f.at * 1000) : "—"),
    // 0 (bad) .. 1 (good); a thumbs up is 1, a thumbs down 0
    el("td", {}, chip(Number(f.score) >= 0.5 ? `good (${Number(f.score).toFixed(2)})` : `bad (${Number(f.score).toFixed(2)})`,
      Number(f.score) >= 0.5 ? "status-ok" : "status-error")),
    el("td", { class: "small-text", text: f.comment || "" }),
    el("td", { class: "mono small-text", text: f.owner || "" })));
  return section("lineage-feedback", `Feedback (${list.length})`,
    table("Feedback", ["When", "Score", "Comment", "Key"], rows, { empty: "No feedback on this answer yet." }));
}

export function renderLineage(rec) {
  return [
    el("div", { class: "lineage-grid" }, answer(rec), route(rec), release(rec)),
    prompt(rec),
    guardrails(rec),
    passages(rec),
    feedback(rec),
  ];
}
