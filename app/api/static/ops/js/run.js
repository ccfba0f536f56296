// One agent run on the Ops page, as a card: the question, its status, the tool calls as they happen (name,
// arguments, ok / failed), the answer as it streams and then the final one, and the action it proposes (the
// `interrupt` it ended in) with Approve / Reject. Everything the server sent is shown as text, never as HTML.

import { chip, el, showAlert, timeEl } from "../common/dom.js";

// What a node of a workflow is doing, while it runs (ops, research and rag-qa's nodes; others by name).
const NODES = {
  triage: "Reading the question…",
  investigate: "Investigating with the lifecycle tools…",
  write: "Writing the answer…",
  propose: "Deciding whether to propose an action…",
  tools: "Running the tool call…",
  finish: "Finishing the answer…",
  supervisor: "Deciding the next step…",
  retrieve: "Searching the documents…",
  answer: "Writing the answer…",
  verify: "Checking the answer…",
};

export const STATUS = {
  starting: "starting",
  running: "running",
  interrupted: "waiting for approval",
  completed: "completed",
  step_limit: "step limit reached",
  blocked: "blocked",
  failed: "failed",
  timed_out: "timed out",
  cancelled: "cancelled",
  stopped: "stopped",
  not_started: "not started",
};

export function statusChip(status) {
  return chip(STATUS[status] || status, `status-chip status-${status}`);
}

/** Arguments as one line of JSON. */
export function argsText(args) {
  if (!args || (typeof args === "object" && !Object.keys(args).length)) return "{}";
  return JSON.stringify(args);
}

function slug(text) {
  return String(text).replace(/[^\w-]/g, "_");
}

let panels = 0;

/**
 * A run's card. `question`, `workflow`: what was asked (for a run first seen in the approvals list, what that
 * list said); `onDecide(panel, action, reason)`: approve / reject its proposal (returns a promise).
 * Returns { node, runId, status, apply(event), applyResult(result), fail(message), proposalBusy(bool, text),
 * proposalError(message), resolved(text) }.
 */
export function runPanel({ question, workflow = "ops", onDecide }) {
  const n = ++panels;
  const titleId = `run-title-${n}`;
  const statusEl = el("span", { class: "run-status" }, statusChip("starting"));
  const idEl = el("span", { class: "mono run-id" });
  const started = el("span", { class: "run-started" }, " · asked ", timeEl(Date.now()));
  const progress = el("p", { class: "muted small-text run-progress", role: "status" }, "Starting the run…");
  const errorBox = el("div", { class: "alert error run-error", role: "alert", hidden: true });
  const guardBox = el("div", { class: "alert warn run-guardrail", role: "alert", hidden: true });
  const tools = el("ol", { class: "tool-calls", "aria-label": "Tool calls" });
  const toolsEmpty = el("p", { class: "muted small-text tools-empty" }, "No tool calls yet.");
  const answer = el("div", { class: "answer", role: "region", "aria-label": "Answer" });
  const answerHint = el("p", { class: "muted small-text answer-hint", hidden: true });
  const proposalSlot = el("div", { class: "proposal-slot" });
  const node = el("article", { class: "card run", "aria-labelledby": titleId, "data-status": "starting" },
    el("div", { class: "run-head" },
      el("div", { class: "run-head-text" },
        el("h2", { class: "run-question", id: titleId, text: question }),
        el("p", { class: "muted small-text run-info" }, el("span", { class: "run-workflow", text: workflow }),
          " agent · run ", idEl, started)),
      statusEl),
    progress, errorBox, guardBox,
    el("h3", { class: "sub" }, "Tool calls"), toolsEmpty, tools,
    el("h3", { class: "sub" }, "Answer"), answer, answerHint,
    proposalSlot);

  const calls = new Map(); // call_id -> its row
  const proposed = new Map(); // call_id -> the arguments of a call this card proposed
  const rejected = new Set(); // call_ids a person rejected
  let streamed = ""; // the answer's tokens so far
  let proposal = null; // the proposal card's parts, while one is shown
  const panel = { node, runId: null, status: "starting", question, workflow };

  function setStatus(status) {
    panel.status = status;
    node.dataset.status = status;
    statusEl.replaceChildren(statusChip(status));
    answer.classList.toggle("streaming", status === "running" && streamed !== "");
  }

  function setRunId(id) {
    if (!id || panel.runId === id) return;
    panel.runId = id;
    node.dataset.runId = id;
    idEl.textContent = id;
  }

  function toolCall(e) {
    toolsEmpty.hidden = true;
    const state = el("span", { class: "tool-state" }, chip("running", "tool-running"));
    const detail = el("div", { class: "tool-output", hidden: true });
    const row = el("li", { class: "tool-call", "data-tool": e.tool, "data-call-id": e.call_id, "data-state": "running" },
      el("div", { class: "tool-line" },
        el("span", { class: "tool-name mono", text: e.tool }),
        el("code", { class: "tool-args", title: argsText(e.args), text: argsText(e.args) }),
        state),
      detail);
    calls.set(e.call_id, { row, state, detail });
    tools.append(row);
  }

  function toolResult(e) {
    let call = calls.get(e.call_id);
    if (!call) { // a result whose call this card did not see (a proposed call a person rejected)
      toolCall({ tool: e.tool, call_id: e.call_id, args: proposed.get(e.call_id) || null });
      call = calls.get(e.call_id);
    }
    const ok = Boolean(e.ok);
    const outcome = ok ? "ok" : rejected.has(e.call_id) ? "rejected" : "failed";
    call.row.dataset.state = outcome;
    const ms = typeof e.duration_ms === "number" && outcome !== "rejected"
      ? ` · ${e.duration_ms < 10 ? e.duration_ms.toFixed(1) : Math.round(e.duration_ms)} ms` : "";
    call.state.replaceChildren(chip(outcome, `tool-${outcome}`), el("span", { class: "muted small-text", text: ms }));
    if (!ok) {
      call.detail.textContent = String(e.output || "").replace(/^error: /, "");
      call.detail.hidden = false;
    }
  }

  function setAnswer(text, { final = false } = {}) {
    answer.textContent = text;
    answer.classList.toggle("streaming", !final);
    answer.classList.toggle("is-final", final);
  }

  function showProposal(e) {
    clearProposal();
    if (e.call_id) proposed.set(e.call_id, e.args || {});
    const reasonId = `proposal-reason-${n}-${slug(e.call_id || "")}`;
    const whyId = `proposal-why-${n}`;
    const reason = el("textarea", { id: reasonId, rows: "2", maxlength: "2000",
      placeholder: "Why — a rejection's reason is told to the agent" });
    const status = el("p", { class: "muted small-text proposal-status", role: "status" });
    const error = el("div", { class: "alert error proposal-error", role: "alert", hidden: true });
    const approve = el("button", { type: "button", class: "btn primary", "aria-describedby": whyId,
      onclick: () => onDecide(panel, "approve", reason.value.trim()) }, "Approve");
    const reject = el("button", { type: "button", class: "btn danger", "aria-describedby": whyId,
      onclick: () => onDecide(panel, "reject", reason.value.trim()) }, "Reject");
    const buttons = el("div", { class: "row gap proposal-buttons" }, approve, reject);
    const label = el("label", { for: reasonId }, "Reason (optional)");
    const card = el("section", { class: "proposal", "aria-labelledby": `proposal-title-${n}`,
      "data-tool": e.tool },
    el("h3", { class: "proposal-title", id: `proposal-title-${n}` }, "Proposed action — waiting for your approval"),
    el("dl", { class: "kv proposal-kv" },
      el("div", { class: "kv-row" }, el("dt", { text: "Tool" }), el("dd", { class: "mono proposal-tool", text: e.tool })),
      el("div", { class: "kv-row" }, el("dt", { text: "Why" }), el("dd", { class: "proposal-reason", id: whyId,
        text: e.reason || "—" })),
      el("div", { class: "kv-row" }, el("dt", { text: "Arguments" }),
        el("dd", {}, el("pre", { class: "proposal-args", text: JSON.stringify(e.args || {}, null, 2) })))),
    label, reason, buttons, status, error);
    proposal = { card, label, reason, approve, reject, buttons, status, error, callId: e.call_id };
    proposalSlot.replaceChildren(card);
  }

  function clearProposal() {
    proposal = null;
    proposalSlot.replaceChildren();
  }

  /** One event of the run (streamed, or from a resumed run's result). */
  function apply(e) {
    setRunId(e.run_id);
    switch (e.type) {
      case "run.started":
        setStatus("running");
        progress.textContent = e.resumed ? "Resumed…" : "Started…";
        if (e.workflow) node.querySelector(".run-workflow").textContent = e.workflow;
        break;
      case "node.started":
        progress.textContent = NODES[e.node] || `Running ${e.node}…`;
        break;
      case "node.finished":
        break;
      case "tool.call":
        toolCall(e);
        break;
      case "tool.result":
        toolResult(e);
        break;
      case "token":
        streamed += e.text || "";
        setAnswer(streamed);
        break;
      case "guardrail":
        showAlert(guardBox, `Guardrail (${e.stage}) ${e.action}: ${e.reason || e.validator || ""}`.trim());
        break;
      case "interrupt":
        setStatus("interrupted");
        progress.textContent = "The run is paused: it proposes an action that waits for a person's approval.";
        answer.classList.remove("streaming");
        answerHint.textContent = streamed ? "The agent's analysis so far; its answer with the findings comes once the proposal is approved or rejected."
          : "The answer with the findings comes once the proposal is approved or rejected.";
        answerHint.hidden = false;
        showProposal(e);
        break;
      case "final":
        setStatus(e.status || "completed");
        progress.textContent = e.status === "completed" ? "Done." : `Ended: ${STATUS[e.status] || e.status}.`;
        answerHint.hidden = true;
        setAnswer(e.answer || "", { final: true });
        break;
      case "error":
        setStatus(e.code === "run_timeout" ? "timed_out" : "failed");
        progress.textContent = "The run failed.";
        answerHint.hidden = true;
        answer.classList.remove("streaming");
        answer.classList.toggle("no-answer", !answer.textContent);
        showAlert(errorBox, `The run failed: ${e.message || "unknown error"}${e.code ? ` (${e.code})` : ""}`);
        break;
      default:
        break;
    }
  }

  /** A resumed run's RunResult (stream: false): its events, in order. */
  function applyResult(result) {
    setRunId(result.run_id);
    for (const e of result.events || []) apply(e);
    if (result.status === "interrupted" && !proposal && result.interrupt) apply(result.interrupt);
  }

  /** Something went wrong outside the run's own events (a refused request, a lost stream). */
  function fail(message, status = null) {
    if (status) setStatus(status);
    answer.classList.remove("streaming");
    answer.classList.toggle("no-answer", !answer.textContent);
    progress.textContent = "";
    showAlert(errorBox, message);
  }

  function proposalBusy(busy, text = "") {
    if (!proposal) return;
    proposal.approve.disabled = busy;
    proposal.reject.disabled = busy;
    proposal.reason.disabled = busy;
    proposal.status.textContent = text;
    if (busy) showAlert(proposal.error, "");
  }

  function proposalError(message) {
    if (proposal) showAlert(proposal.error, message);
    else showAlert(errorBox, message);
  }

  /** The proposal was decided (`action`: approve / reject, here; null: elsewhere): the card says how, without
   * buttons. */
  function resolved(text, action = null) {
    if (!proposal) return;
    if (action === "reject" && proposal.callId) rejected.add(proposal.callId);
    const { card, buttons, label, reason, status } = proposal;
    for (const part of [buttons, label, reason]) part.remove();
    card.classList.add("is-resolved");
    card.querySelector(".proposal-title").textContent = "Proposed action";
    status.textContent = text;
    proposal = null;
  }

  return Object.assign(panel, { apply, applyResult, fail, proposalBusy, proposalError, resolved,
    hasProposal: () => proposal !== null, focusAnswer: () => node.scrollIntoView({ block: "nearest" }) });
}
