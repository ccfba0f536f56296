// Ops: ask Keel's `ops` agent a question and watch it investigate (the tool calls as they run, the answer as it is
// written), then approve or reject the action it proposes; and every run waiting for a person's approval, from any
// workflow, refreshed every few seconds. Plain DOM and ES modules through the public Keel API.

import { $, toast } from "../common/dom.js";
import { coalesce, errorText as commonErrorText, keyLogin, liveRefresh } from "../common/page.js";
import { agents, session, streamRun } from "./api.js";
import { approvalList } from "./approvals.js";
import { STATUS, runPanel } from "./run.js";

const LIVE_EVERY_MS = 5000;
const TERMINAL = new Set(["final", "interrupt", "error"]);

const state = {
  updatedAt: null,
  running: null, // the run being streamed: { panel, controller }
  deciding: new Set(), // run ids with a decision under way
};
const panels = new Map(); // run_id -> its card
let live = null; // liveRefresh(), once the page is set up
let approvals = null; // approvalList(), once the page is set up

function errorText(exc) {
  return commonErrorText(exc, { forbidden: " — the Ops page needs a key with the chat scope." });
}

// ------------------------------------------------------------------------------------ session

const { handleAuth, start } = keyLogin({
  session,
  probe: () => agents.approvals(),
  onConnect: (list) => {
    renderApprovals(list, 0);
    live.schedule();
  },
  onLogout: () => {
    live.stop();
    if (state.running) state.running.controller.abort();
    state.running = null;
    state.deciding.clear();
    approvals.clear();
    panels.clear();
    $("runs").replaceChildren();
    $("runs-empty").hidden = false;
    $("list-status").textContent = "";
    $("updated").textContent = "";
    setRunning(false);
  },
  errorText,
});

// ------------------------------------------------------------------------------------ approvals

/** Re-read the approvals. `force`: after a change, wait for a read already under way and read again. */
const refresh = coalesce(async () => {
  if (!session.key) return;
  const asked = Date.now();
  try {
    renderApprovals(await agents.approvals(), asked);
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = `Not updated: ${errorText(exc)}`;
  }
});

/** The list as read at `asked` (ms): the sidebar, and the cards whose proposal was decided elsewhere. */
function renderApprovals(list, asked) {
  const rows = list.data || [];
  approvals.render(rows);
  state.updatedAt = Date.now();
  const n = rows.length;
  const text = n ? `${n} run${n === 1 ? "" : "s"} waiting for approval` : "Nothing is waiting for approval.";
  if ($("list-status").textContent !== text) $("list-status").textContent = text;
  $("updated").textContent = `· updated ${new Date(state.updatedAt).toLocaleTimeString()}`;
  const waiting = new Set(rows.map((r) => r.run_id));
  for (const [runId, panel] of panels) {
    if (panel.hasProposal() && !waiting.has(runId) && !state.deciding.has(runId) && asked > panel.interruptedAt) {
      panel.resolved("No longer waiting: decided elsewhere (the API, the CLI or another page).");
    }
  }
}

// ------------------------------------------------------------------------------------ runs

function addPanel(question, workflow) {
  const panel = runPanel({ question, workflow, onDecide: (p, action, reason) => decide(p.runId, action, reason) });
  $("runs").prepend(panel.node);
  $("runs-empty").hidden = true;
  return panel;
}

function track(panel) {
  if (panel.runId) panels.set(panel.runId, panel);
}

function setRunning(on) {
  $("ask").disabled = on;
  $("ask").textContent = on ? "Asking…" : "Ask";
  $("stop").hidden = !on;
}

async function ask(event) {
  if (event) event.preventDefault();
  const question = $("question").value.trim();
  if (!question) {
    $("question").focus();
    return;
  }
  if (state.running) return;
  const controller = new AbortController();
  const panel = addPanel(question, "ops");
  state.running = { panel, controller };
  setRunning(true);
  let ended = false;
  try {
    for await (const e of streamRun(question, controller.signal)) {
      panel.apply(e);
      track(panel);
      if (e.type === "interrupt") {
        panel.interruptedAt = Date.now();
        refresh(true);
      }
      if (TERMINAL.has(e.type)) ended = true;
    }
    if (!ended) {
      panel.fail("The stream ended before the run did (the connection was lost or the server stopped). The run "
        + `may still be recorded: GET /v1/agents/runs${panel.runId ? `/${panel.runId}` : ""}.`, "failed");
    }
  } catch (exc) {
    if (exc.name === "AbortError") {
      panel.fail("Stopped: the page stopped reading this run and the server cancels it"
        + (panel.runId ? ` (it can be continued: POST /v1/agents/runs/${panel.runId}/resume with action "continue").`
          : "."), "stopped");
    } else if (!handleAuth(exc)) {
      panel.fail(panel.runId ? `The stream broke: ${errorText(exc)}` : `The run could not start: ${errorText(exc)}`,
        panel.runId ? "failed" : "not_started");
    }
  } finally {
    if (state.running && state.running.panel === panel) {
      state.running = null;
      setRunning(false);
    }
  }
}

/** Approve or reject a run's proposed call (from its card or from the approvals list). */
async function decide(runId, action, reason) {
  if (!runId || state.deciding.has(runId)) return;
  const item = approvals.item(runId);
  const verb = action === "approve" ? "Approving" : "Rejecting";
  const done = action === "approve" ? "Approved" : "Rejected";
  let panel = panels.get(runId);
  state.deciding.add(runId);
  if (item) item.busy(true, `${verb}…`);
  if (panel) panel.proposalBusy(true, `${verb}… the run resumes.`);
  try {
    const result = await agents.resume(runId, action, reason);
    if (!panel) { // a run first seen in the list: its card shows what was proposed, then what became of it
      const row = item ? item.row : { run_id: runId };
      panel = addPanel(row.question || "A run that waited for approval", row.workflow || "agent");
      panel.apply({ type: "interrupt", run_id: runId, tool: row.tool, args: row.args, reason: row.reason,
        call_id: row.call_id });
      track(panel);
    }
    panel.resolved(`${done}${reason ? ` — “${reason}”` : ""}.`, action);
    panel.applyResult(result);
    if (result.status === "interrupted") panel.interruptedAt = Date.now();
    approvals.remove(runId);
    const tool = item ? item.row.tool : "the proposed call";
    toast(`${done}: ${tool} (${runId}) — ${result.status === "interrupted" ? "the run proposes another action"
      : `the run ended: ${STATUS[result.status] || result.status}`}.`);
  } catch (exc) {
    if (handleAuth(exc)) return;
    const message = `Could not ${action} ${runId}: ${errorText(exc)}`;
    if (item) {
      item.busy(false);
      item.error(message);
    }
    if (panel) {
      panel.proposalBusy(false);
      panel.proposalError(message);
    }
    if (!panel) toast(message, "error"); // the item may leave the list at its next read (decided elsewhere)
  } finally {
    state.deciding.delete(runId);
  }
  await refresh(true);
}

// ------------------------------------------------------------------------------------ init

function useExample(event) {
  const button = event.target.closest(".example");
  if (!button) return;
  const q = $("question");
  q.value = button.dataset.question;
  q.focus();
  const blank = q.value.indexOf("<name>");
  if (blank >= 0) q.setSelectionRange(blank, blank + "<name>".length); // type the prompt's name over it
}

function init() {
  live = liveRefresh(refresh, LIVE_EVERY_MS);
  approvals = approvalList($("approval-list"), { onDecide: (item, action, reason) => decide(item.row.run_id, action, reason) });
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("ask-form").addEventListener("click", useExample);
  $("stop").addEventListener("click", () => {
    if (state.running) state.running.controller.abort();
  });
  start();
}

init();
