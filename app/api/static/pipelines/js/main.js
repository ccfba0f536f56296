// Pipelines: Keel's continuous-training pipelines with their last runs; one pipeline's runs; one run as a graph of
// its steps (state, attempts, duration), a step's log and artifacts, the run's trigger, decision and audit; start a
// run, approve or reject one that waits for a person, cancel an open one, retry one that failed on an error.
// Plain DOM and ES modules through the public Keel API, refreshed every few seconds while a run is open.

import { ApiError } from "../common/api.js";
import { $, ago as agoMs, chip, el, replaceKeepingFocus, showAlert, timeEl as timeElMs, toast } from "../common/dom.js";
import { coalesce, errorText as commonErrorText, keyLogin, liveRefresh } from "../common/page.js";
import { pipelines, session } from "./api.js";
import { artifactsView, duration, graphKeys, orderedSteps, renderGraph, stepChip, stepLabel, stepMeta } from "./graph.js";

const LIVE_EVERY_MS = 3000;
const OPEN = new Set(["queued", "running", "waiting"]);
const TRIGGERS = { manual: "manual", drift: "drift", feedback: "feedback", eval_regression: "eval regression",
  schedule: "schedule" };
const OUTCOMES = { promoted: "promoted", rolled_back: "rolled back", rejected: "rejected", gate_failed: "gate failed",
  contract_failed: "contract failed", error: "error", cancelled: "cancelled" };
const ACTIONS = {
  approve: { busy: "Approving…", done: "Approved: the run goes on to promote the new version." },
  reject: { busy: "Rejecting…", done: "Rejected: the run ends without promoting, and its canary rolls back." },
  cancel: { busy: "Cancelling…", done: "Cancelled: the run and what it started are stopped." },
  retry: { busy: "Retrying…", done: "Retried: the run resumes at its failed step." },
};

const state = {
  list: [], // GET /v1/pipelines's data
  errors: {}, // definition files that do not load
  name: null, // the selected pipeline
  runs: [], // its runs (newest first, without logs)
  runsFor: null, // the pipeline those runs are of
  runId: null, // the selected run
  run: null, // its GET (with logs and audit)
  step: null, // the step whose detail is shown
  stepPicked: false, // a person picked it (it stays); else it follows the run to the step it is at
  seq: 0, // run loads: a response for an older selection is dropped
  busy: false, // an action under way
  polling: false, // the live refresh is scheduled
  updatedAt: null,
};
let live = null; // liveRefresh(), once the page is set up

function errorText(exc) {
  return commonErrorText(exc, { forbidden: " — the Pipelines page needs a key with the finetune scope (approving, "
    + "rejecting and cancelling a run also need releases)." });
}

/** An action's error: the server's message says what scope is missing. */
function actionErrorText(exc) {
  return commonErrorText(exc);
}

// The pipelines API gives times in seconds since the epoch.
function ago(at) {
  return at == null ? "" : agoMs(at * 1000);
}

function timeEl(at) {
  return timeElMs(at * 1000);
}

function isOpen(run) {
  return Boolean(run) && OPEN.has(run.state);
}

function runChip(s) {
  return chip(s, `run-chip run-${s}`);
}

/** An outcome's chip (none when it says what the state's chip says: cancelled). */
function outcomeChip(outcome, runState = null) {
  return outcome && outcome !== runState ? chip(OUTCOMES[outcome] || outcome, `outcome-chip outcome-${outcome}`) : null;
}

/** A pipeline's triggers in a few words ("drift (topic_mix) · 50+ ratings · every 7.0 days"). */
function triggersText(triggers) {
  if (!triggers || !triggers.length) return "manual only";
  return triggers.map((t) => {
    if (t.kind === "schedule") return `every ${duration(t.every)}`;
    if (t.kind === "drift") return `drift${t.checks && t.checks.length ? ` (${t.checks.join(", ")})` : ""}`;
    if (t.kind === "feedback") return `${t.min_new}+ ratings${t.min_score != null ? ` ≥ ${t.min_score}` : ""}`;
    if (t.kind === "eval_regression") return `eval regression (${t.suite})`;
    return t.kind;
  }).join(" · ");
}

function shortHash(h) {
  return (h || "").slice(0, 12);
}

// ------------------------------------------------------------------------------------ location

function readHash() {
  const q = new URLSearchParams(location.hash.replace(/^#/, ""));
  return { pipeline: q.get("pipeline"), run: q.get("run") };
}

function writeHash() {
  const q = new URLSearchParams();
  if (state.name) q.set("pipeline", state.name);
  if (state.runId) q.set("run", state.runId);
  const hash = q.toString();
  history.replaceState(null, "", hash ? `#${hash}` : location.pathname + location.search);
}

// ------------------------------------------------------------------------------------ session

const { handleAuth, start } = keyLogin({
  session,
  probe: () => pipelines.list(),
  onConnect: async (list) => {
    applyList(list);
    state.updatedAt = Date.now();
    listStatus();
    const wanted = readHash();
    const first = wanted.pipeline && state.list.some((p) => p.name === wanted.pipeline) ? wanted.pipeline
      : state.list.length ? state.list[0].name : null;
    if (first) await selectPipeline(first, wanted.pipeline === first ? wanted.run : null);
    follow();
  },
  onLogout: () => {
    live.stop();
    state.polling = false;
    Object.assign(state, { list: [], errors: {}, name: null, runs: [], runsFor: null, runId: null, run: null,
      step: null, stepPicked: false, busy: false, updatedAt: null });
    state.seq += 1;
    $("pipeline-list").replaceChildren();
    $("run-list").replaceChildren();
    $("pipeline-panel").hidden = true;
    $("pipeline-view").hidden = true;
    $("run-view").hidden = true;
    $("empty").hidden = false;
    $("list-status").textContent = "";
    $("updated").textContent = "";
    $("live-note").textContent = "";
    for (const id of ["start-reason", "approval-reason", "action-reason"]) $(id).value = "";
    clearMessages();
  },
  errorText,
});

function clearMessages() {
  for (const id of ["start-error", "action-error", "approval-error", "detail-error", "definition-errors"]) {
    showAlert($(id), "");
  }
  $("start-status").textContent = "";
  $("action-status").textContent = "";
}

// ------------------------------------------------------------------------------------ refresh

/** Re-read the pipelines, the selected pipeline's runs and (while it may change) the selected run; the selection,
 * the selected step, focus and what is typed stay. `force`: after a change, wait for a read already under way and
 * read again (it may predate the change). */
const refresh = coalesce(async () => {
  if (!session.key) return;
  try {
    applyList(await pipelines.list());
    if (state.name) await loadRuns();
    if (state.runId && runMayHaveChanged()) await loadRun();
    state.updatedAt = Date.now();
    listStatus();
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = `Not updated: ${errorText(exc)}`;
  } finally {
    follow();
  }
});

/** The selected run is read again while it is open, and when the list says it changed (a retry elsewhere). */
function runMayHaveChanged() {
  if (!state.run || state.run.id !== state.runId || isOpen(state.run)) return true;
  const row = state.runs.find((r) => r.id === state.runId);
  return Boolean(row) && (row.updated_at !== state.run.updated_at || row.state !== state.run.state);
}

/** Live refresh runs while a run on the page is open, and stops once they have all finished. */
function follow() {
  if (!session.key) return;
  const open = state.list.some((p) => isOpen(p.last_run)) || state.runs.some(isOpen) || isOpen(state.run);
  const on = $("live").checked;
  if (open && on && !state.polling) {
    live.schedule();
    state.polling = true;
  } else if (!open && state.polling) {
    live.stop();
    state.polling = false;
  }
  const note = !on ? "Live refresh is off."
    : open ? "Following the open runs." : "No run is open: live refresh is paused (Refresh now looks again).";
  if ($("live-note").textContent !== note) $("live-note").textContent = note;
}

function listStatus() {
  const n = state.list.length;
  const text = n ? `${n} pipeline${n === 1 ? "" : "s"}` : "No pipelines on this server.";
  if ($("list-status").textContent !== text) $("list-status").textContent = text;
  $("updated").textContent = state.updatedAt ? `· updated ${new Date(state.updatedAt).toLocaleTimeString()}` : "";
}

// ------------------------------------------------------------------------------------ pipelines

function applyList(list) {
  state.list = list.data || [];
  state.errors = list.errors || {};
  renderList();
  renderDefinitionErrors();
  if (state.name) renderPipeline();
}

function renderDefinitionErrors() {
  const entries = Object.entries(state.errors);
  const box = $("definition-errors");
  if (!entries.length) {
    if (!box.hidden) showAlert(box, "");
    return;
  }
  const text = entries.map(([path, message]) => `${path}: ${message}`).join("\n");
  if (box.dataset.text === text && !box.hidden) return;
  box.dataset.text = text;
  box.replaceChildren(
    el("strong", { text: `${entries.length} definition file${entries.length === 1 ? " does" : "s do"} not load` }),
    el("ul", { class: "error-files" }, entries.map(([path, message]) =>
      el("li", {}, el("span", { class: "mono", text: path }), ": ",
        message.startsWith(path) ? message.slice(path.length).replace(/^[\s:]+/, "") : message))));
  box.hidden = false;
}

function renderList() {
  const items = state.list.map((p) => {
    const last = p.last_run;
    const descId = `pipeline-desc-${p.name}`;
    const button = el("button", {
      type: "button",
      class: "pipeline-item",
      "aria-label": `Pipeline ${p.name}`,
      "aria-current": p.name === state.name ? "true" : null,
      "aria-describedby": descId,
      "data-focus-key": `pipeline-${p.name}`,
      onclick: () => selectPipeline(p.name),
    },
    el("span", { class: "pipeline-item-name", text: p.name }),
    el("span", { class: "pipeline-item-desc", id: descId },
      el("span", { class: "pipeline-model" }, "model ", el("span", { class: "mono", text: p.model })),
      el("span", { class: "pipeline-triggers", title: "Triggers" }, "triggers: ", triggersText(p.triggers)),
      el("span", { class: "chips" },
        chip(p.approval === "auto" ? "auto approval" : "approval required",
          p.approval === "auto" ? "chip-muted" : "chip-warn"),
        p.canary ? chip(`canary ${p.canary}`, "chip-muted") : null),
      el("span", { class: "pipeline-last" },
        last ? ["last run ", runChip(last.state), " ", outcomeChip(last.outcome, last.state), " ",
          el("span", { class: "muted", text: ago(last.created_at) })] : el("span", { class: "muted", text: "no runs yet" }))));
    return el("li", { "data-pipeline": p.name }, button);
  });
  replaceKeepingFocus($("pipeline-list"), items);
}

async function selectPipeline(name, runId = null) {
  const changed = name !== state.name;
  state.name = name;
  if (changed) {
    state.runs = [];
    state.runsFor = null;
    $("run-list").replaceChildren();
    $("runs-status").textContent = "Loading runs…";
    showAlert($("start-error"), "");
    $("start-status").textContent = "";
    $("start-reason").value = "";
    state.runId = null;
    state.run = null;
    state.step = null;
    state.stepPicked = false;
    state.seq += 1;
    $("run-view").hidden = true;
    showAlert($("detail-error"), "");
  }
  renderList();
  renderPipeline();
  $("pipeline-panel").hidden = false;
  $("start-name").textContent = name;
  $("empty").hidden = true;
  try {
    await loadRuns();
  } catch (exc) {
    if (!handleAuth(exc)) $("runs-status").textContent = `Could not read the runs: ${errorText(exc)}`;
    return;
  }
  const wanted = runId || (changed || !state.runId ? (state.runs[0] || {}).id : state.runId);
  if (wanted) await selectRun(wanted);
  else writeHash();
  follow();
}

function renderPipeline() {
  const p = state.list.find((x) => x.name === state.name);
  $("pipeline-view").hidden = !p;
  if (!p) return;
  $("pipeline-name").textContent = p.name;
  $("pipeline-chips").replaceChildren(
    chip(p.approval === "auto" ? "auto approval" : "approval required", p.approval === "auto" ? "chip-muted" : "chip-warn"),
    p.canary ? chip(`canary on ${p.canary}`, "chip-muted") : chip("no canary", "chip-muted"));
  $("pipeline-description").textContent = p.description || "";
  $("pipeline-description").hidden = !p.description;
  const facts = [
    ["Model", el("span", { class: "mono", text: p.model })],
    ["Triggers", triggersText(p.triggers)],
    ["Cooldown", duration(p.cooldown_s)],
    ["Eval gate", (p.evals || []).join(", ") || "—"],
    ["Job spec", el("span", { class: "mono", text: p.job })],
    ["Definition", el("span", {}, el("span", { class: "mono", text: p.source }), " · ",
      el("span", { class: "mono", title: p.hash, text: shortHash(p.hash) }))],
  ];
  replaceKeepingFocus($("pipeline-facts"), facts.map(([k, v]) =>
    el("div", { class: "kv-row" }, el("dt", { text: k }), el("dd", {}, v))));
}

// ------------------------------------------------------------------------------------ runs

async function loadRuns() {
  const name = state.name;
  const filter = $("run-filter").value;
  const list = await pipelines.runs(name, filter || undefined);
  if (name !== state.name) return;
  state.runs = list.data || [];
  state.runsFor = name;
  reconcile();
  renderRuns();
}

/** The list, the runs and the run are read one after the other: what was read last of a run is shown everywhere
 * (the pipeline's last run in the list, the run's row), so the sidebar never says "running" of a finished run. */
function reconcile() {
  if (state.run && state.run.id === state.runId) {
    const i = state.runs.findIndex((r) => r.id === state.run.id);
    if (i >= 0 && state.runs[i].updated_at <= state.run.updated_at) {
      const row = { ...state.run };
      delete row.audit;
      state.runs[i] = row;
    }
  }
  const p = state.list.find((x) => x.name === state.runsFor);
  const newest = state.runs[0];
  if (!p || !newest || $("run-filter").value) return;
  const last = p.last_run;
  const newer = !last || (last.id === newest.id ? last.updated_at < newest.updated_at
    : last.created_at <= newest.created_at);
  if (newer) {
    p.last_run = newest;
    renderList();
  }
}

function renderRuns() {
  const n = state.runs.length;
  const filter = $("run-filter").value;
  const text = n ? `${n}${n === 50 ? "+" : ""} run${n === 1 ? "" : "s"}${filter ? ` ${filter}` : ""}`
    : filter ? `No ${filter} runs.` : "No runs yet: start one above.";
  if ($("runs-status").textContent !== text) $("runs-status").textContent = text;
  const items = state.runs.map((r) => {
    const trigger = r.trigger || {};
    const button = el("button", {
      type: "button",
      class: "run-item",
      "aria-current": r.id === state.runId ? "true" : null,
      "data-focus-key": `run-${r.id}`,
      onclick: () => selectRun(r.id),
    },
    el("span", { class: "run-item-top" }, el("span", { class: "mono run-item-id", text: r.id }),
      el("span", { class: "chips" }, runChip(r.state), outcomeChip(r.outcome, r.state))),
    el("span", { class: "run-item-meta muted small-text" },
      el("span", { class: "run-trigger", text: TRIGGERS[trigger.kind] || trigger.kind || "?" }),
      isOpen(r) && r.current_step ? ` · at ${r.current_step}` : "",
      ` · ${ago(r.created_at)}`));
    return el("li", { "data-run-id": r.id, "data-state": r.state }, button);
  });
  replaceKeepingFocus($("run-list"), items);
}

async function selectRun(runId) {
  if (runId !== state.runId) {
    state.runId = runId;
    state.run = null;
    state.step = null;
    state.stepPicked = false;
    $("approval-reason").value = "";
    $("action-reason").value = "";
    showAlert($("action-error"), "");
    showAlert($("approval-error"), "");
    $("action-status").textContent = "";
    $("detail-loading").textContent = `Loading run ${runId}…`;
    $("detail-loading").hidden = false;
  }
  writeHash();
  renderRuns();
  await loadRun();
  follow();
}

async function loadRun() {
  const runId = state.runId;
  const seq = ++state.seq;
  try {
    const run = await pipelines.run(runId);
    if (seq !== state.seq || runId !== state.runId) return; // another run was selected meanwhile
    state.run = run;
    const names = orderedSteps(run).map((s) => s.name);
    if (!state.stepPicked || !names.includes(state.step)) state.step = defaultStep(run);
    showAlert($("detail-error"), "");
    $("detail-loading").hidden = true;
    renderRun();
    reconcile();
    renderRuns();
  } catch (exc) {
    if (seq !== state.seq || handleAuth(exc)) return;
    const message = exc instanceof ApiError && exc.status === 404 ? `Run ${runId} was not found: ${exc.message}`
      : `Could not read run ${runId}${state.run ? " (showing what was read last)" : ""}: ${errorText(exc)}`;
    showAlert($("detail-error"), message);
    $("detail-loading").hidden = true;
  }
}

/** The step shown until a person picks one: the one the run runs, waits or failed at; else the last it got to. */
function defaultStep(run) {
  const steps = orderedSteps(run);
  const live = steps.find((s) => ["running", "waiting", "failed"].includes(s.state)
    || (s.state === "cancelled" && s.attempts > 0)); // where a cancelled run stopped
  if (live) return live.name;
  const reached = steps.filter((s) => !["pending", "skipped", "cancelled"].includes(s.state));
  return reached.length ? reached[reached.length - 1].name : steps[0].name;
}

function selectStep(name) {
  if (!state.run) return;
  state.step = name;
  state.stepPicked = true;
  renderGraphNow();
  renderStep();
}

// ------------------------------------------------------------------------------------ one run

function renderRun() {
  const r = state.run;
  $("run-view").hidden = false;
  $("run-view").dataset.runId = r.id;
  $("run-view").dataset.state = r.state;
  $("run-view").dataset.outcome = r.outcome || "";
  $("run-title").textContent = `Run ${r.id}`;
  $("run-chips").replaceChildren(runChip(r.state), outcomeChip(r.outcome, r.state) || "",
    el("span", { class: "sr-only", text: `state ${r.state}${r.outcome ? `, outcome ${r.outcome}` : ""}` }));
  const took = r.finished_at != null ? ` · took ${duration(r.finished_at - r.created_at)}` : "";
  $("run-meta").replaceChildren(...[
    `pipeline ${r.pipeline} · model ${r.model} · started by ${r.created_by || "—"} `, timeEl(r.created_at),
    ` (${ago(r.created_at)})`, r.finished_at != null ? [" · finished ", timeEl(r.finished_at)] : [], took,
    ` · definition ${shortHash(r.definition_hash)}`, r.job_id ? ` · job ${r.job_id}` : ""].flat());
  renderActions(r);
  const errorBox = $("run-error");
  const message = r.error ? `${r.outcome ? `${OUTCOMES[r.outcome] || r.outcome}: ` : ""}${r.error}` : "";
  if (errorBox.textContent !== message || errorBox.hidden === Boolean(message)) showAlert(errorBox, message);
  renderGraphNow();
  renderApproval(r);
  renderStep();
  renderFacts(r);
  renderAudit(r);
}

function renderGraphNow() {
  const r = state.run;
  renderGraph($("graph"), r, { selected: state.step, waiting: r.state === "waiting", onSelect: selectStep });
}

function renderActions(r) {
  const canCancel = isOpen(r);
  const canRetry = r.state === "failed" && r.outcome === "error";
  $("act-cancel").hidden = !canCancel;
  $("act-retry").hidden = !canRetry;
  $("action-reason").hidden = !canCancel && !canRetry;
  for (const id of ["act-cancel", "act-retry", "approve", "reject"]) $(id).disabled = state.busy;
  $("act-cancel").setAttribute("aria-label", `Cancel run ${r.id}`);
  $("act-retry").setAttribute("aria-label", `Retry run ${r.id} at its failed step`);
}

function renderApproval(r) {
  const approval = orderedSteps(r).find((s) => s.name === "approval");
  const waiting = r.state === "waiting" && approval && approval.state === "waiting";
  $("approval").hidden = !waiting;
  if (!waiting) return;
  const steps = Object.fromEntries(orderedSteps(r).map((s) => [s.name, s.artifacts || {}]));
  const trained = steps.finetune;
  const gate = steps.evaluate.gate;
  const canary = steps.canary;
  const version = trained.model ? `${trained.model} version ${trained.version}` : `a new version of ${r.model}`;
  $("approval-text").textContent = `Run ${r.id} of ${r.pipeline} waits for a person: approve to promote ${version}, `
    + "or reject to end the run.";
  const facts = [
    ["Trained", trained.model ? `${trained.model} v${trained.version}` : "—"],
    ["Eval gate", gate ? `${gate.passed ? "passed" : "refused"}${gate.reason ? ` — ${gate.reason}` : ""}` : "—"],
    ["Canary", canary.release ? `${canary.release}: ${canary.status || "running"}${canary.candidate
      ? ` (${canary.baseline || "baseline"} vs ${canary.candidate})` : ""}` : "none"],
  ];
  replaceKeepingFocus($("approval-facts"), facts.map(([k, v]) =>
    el("div", { class: "kv-row" }, el("dt", { text: k }), el("dd", { text: v }))));
}

function renderStep() {
  const r = state.run;
  const steps = orderedSteps(r);
  const step = steps.find((s) => s.name === state.step);
  if (!step) return;
  const view = $("step-view");
  view.dataset.step = step.name;
  view.dataset.state = step.state;
  $("step-title").textContent = `Step ${steps.indexOf(step) + 1} of ${steps.length}: ${step.name} (${stepLabel(step.name)})`;
  $("step-chips").replaceChildren(stepChip(step.state));
  $("step-meta").replaceChildren(...stepMeta(step));
  const error = step.error || "";
  if ($("step-error").textContent !== error || $("step-error").hidden === Boolean(error)) showAlert($("step-error"), error);
  const logBox = $("step-log");
  const log = step.log || "";
  const text = log || (step.state === "pending" ? "(this step has not run yet)" : "(no log lines)");
  if (logBox.textContent !== text) {
    const atEnd = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 4;
    logBox.textContent = text;
    logBox.classList.toggle("is-empty", !log);
    if (atEnd) logBox.scrollTop = logBox.scrollHeight;
  }
  const box = $("step-artifacts");
  const signature = `${step.name}\n${JSON.stringify(step.artifacts || {})}`;
  if (box.dataset.signature !== signature) { // keep an opened "As JSON" open while nothing changed
    box.dataset.signature = signature;
    box.replaceChildren(...artifactsView(step.artifacts));
  }
}

function factRow(name, value, cls = "") {
  return el("div", { class: `kv-row ${cls}`.trim() }, el("dt", { text: name }), el("dd", {}, value));
}

function renderFacts(r) {
  const t = r.trigger || {};
  const extra = Object.entries(t).filter(([k]) => !["kind", "reason", "by"].includes(k));
  const rows = [
    factRow("Trigger", [chip(TRIGGERS[t.kind] || t.kind || "?", "chip-muted trigger-chip"), " ",
      el("span", { class: "trigger-reason", text: t.reason || "(no reason given)" })], "fact-trigger"),
    t.by ? factRow("Started by", t.by) : factRow("Started by", r.created_by || "—"),
    ...extra.map(([k, v]) => factRow(k, typeof v === "object" ? JSON.stringify(v) : String(v))),
  ];
  const d = r.decision;
  if (d) {
    rows.push(factRow("Decision", [
      chip(d.approved ? "approved" : "rejected", d.approved ? "decision-approved" : "decision-rejected"), " by ",
      el("span", { class: "decision-by", text: d.by }), d.at ? [" · ", timeEl(d.at)] : "",
      el("p", { class: "decision-reason", text: d.reason ? `“${d.reason}”` : "(no reason given)" })], "fact-decision"));
  } else {
    rows.push(factRow("Decision", el("span", { class: "muted", text: r.state === "waiting" ? "waiting for a person"
      : "none (no one has approved or rejected this run)" }), "fact-decision"));
  }
  rows.push(factRow("Outcome", r.outcome ? outcomeChip(r.outcome) : el("span", { class: "muted", text: isOpen(r)
    ? "not finished" : "—" })));
  replaceKeepingFocus($("run-facts"), rows);
}

function renderAudit(r) {
  const events = r.audit || [];
  const rows = events.length ? events.map((e) => el("tr", { "data-action": e.action },
    el("td", { class: "nowrap" }, timeEl(e.at)),
    el("td", {}, chip(e.action, "chip-muted audit-action"), e.to_ref ? el("span", { class: "muted small-text",
      text: ` → ${e.to_ref}` }) : ""),
    el("td", { class: "audit-actor", text: e.actor || "—" }),
    el("td", { class: "audit-reason", text: e.reason || "" })))
    : [el("tr", {}, el("td", { colspan: "4", class: "muted", text: "No audit events." }))];
  $("audit").replaceChildren(...rows);
}

// ------------------------------------------------------------------------------------ actions

async function startRun(event) {
  event.preventDefault();
  const name = state.name;
  if (!name || state.busy) return;
  const reason = $("start-reason").value.trim();
  showAlert($("start-error"), "");
  $("start").disabled = true;
  $("start-status").textContent = `Starting a run of ${name}…`;
  try {
    const run = await pipelines.start(name, reason);
    $("start-reason").value = "";
    $("start-status").textContent = `Started run ${run.id}.`;
    toast(`Started run ${run.id} of ${name}.`);
    await loadRuns();
    await selectRun(run.id);
  } catch (exc) {
    $("start-status").textContent = "";
    if (handleAuth(exc)) return;
    showStartError(name, exc);
  } finally {
    $("start").disabled = false;
  }
  await refresh(true);
}

function showStartError(name, exc) {
  const box = $("start-error");
  if (exc instanceof ApiError && exc.code === "pipeline_run_open") {
    const open = (state.list.find((p) => p.name === name) || {}).last_run;
    const openId = (exc.message.match(/\((pr-[0-9a-z]+)/) || [])[1] || (isOpen(open) ? open.id : null);
    box.replaceChildren(
      el("strong", { text: `${name} already has an open run: one run at a time.` }),
      el("span", { class: "start-error-message", text: `${exc.message} (${exc.code})` }),
      openId ? el("button", { type: "button", class: "btn small", onclick: () => selectRun(openId) },
        `Show run ${openId}`) : null);
    box.hidden = false;
    return;
  }
  showAlert(box, `Could not start a run of ${name}: ${actionErrorText(exc)}`);
}

async function act(action) {
  const r = state.run;
  if (!r || state.busy) return;
  const deciding = action === "approve" || action === "reject";
  const reasonBox = deciding ? $("approval-reason") : $("action-reason");
  const errorBox = deciding ? $("approval-error") : $("action-error");
  const reason = reasonBox.value.trim();
  state.busy = true;
  renderActions(r);
  showAlert($("action-error"), "");
  showAlert($("approval-error"), "");
  $("action-status").textContent = `${ACTIONS[action].busy} run ${r.id}`;
  try {
    await pipelines.act(r.id, action, reason);
    reasonBox.value = "";
    $("action-status").textContent = `${ACTIONS[action].done}${reason ? ` Reason: “${reason}”.` : ""}`;
  } catch (exc) {
    $("action-status").textContent = "";
    if (handleAuth(exc)) return;
    showAlert(errorBox, `Could not ${action} run ${r.id}: ${actionErrorText(exc)}`);
  } finally {
    state.busy = false;
    if (state.run) renderActions(state.run);
  }
  await refresh(true);
}

// ------------------------------------------------------------------------------------ init

function init() {
  live = liveRefresh(refresh, LIVE_EVERY_MS);
  // liveRefresh's own handler (added first) has started or stopped the timer; the next refresh decides whether
  // there is anything open to follow.
  $("live").addEventListener("change", () => {
    state.polling = $("live").checked;
    follow();
  });
  $("start-form").addEventListener("submit", startRun);
  $("run-filter").addEventListener("change", async () => {
    if (!state.name) return;
    try {
      await loadRuns();
    } catch (exc) {
      if (!handleAuth(exc)) $("runs-status").textContent = `Could not read the runs: ${errorText(exc)}`;
    }
  });
  $("approve").addEventListener("click", () => act("approve"));
  $("reject").addEventListener("click", () => act("reject"));
  $("act-cancel").addEventListener("click", () => act("cancel"));
  $("act-retry").addEventListener("click", () => act("retry"));
  graphKeys($("graph"), selectStep);
  start();
}

init();
