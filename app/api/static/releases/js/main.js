// Releases: every release endpoint with its split and current decision; one release's numbers, statistical
// comparisons, charts over time, shadow answers and decision history; pause / resume / promote / roll back.
// Plain DOM and ES modules through the public Keel API, refreshed every few seconds.

import { ApiError } from "../common/api.js";
import { $, ago as agoMs, chip, el, replaceKeepingFocus, showAlert, timeEl as timeElMs, toast } from "../common/dom.js";
import { coalesce, errorText, keyLogin, liveRefresh } from "../common/page.js";
import { releases, session } from "./api.js";
import { ChartGrid, fmt, variantColor } from "./charts.js";

const LIVE_EVERY_MS = 5000;
// "auto": the smallest of these that draws the release's whole life in at most MAX_AUTO_POINTS buckets.
const AUTO_BUCKETS = [2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400];
const MAX_AUTO_POINTS = 90;
const FINISHED = new Set(["promoted", "rolled_back", "stopped"]);
const STRATEGIES = { ab: "A/B test", canary: "canary", shadow: "shadow", bluegreen: "blue/green" };
const RATE_METRICS = new Set(["errors", "guardrail_blocks", "negative_feedback"]);

const ACTIONS = {
  pause: {
    title: (n) => `Pause ${n}`, confirm: "Pause release", done: "Paused",
    text: "Traffic stays at its current split and the controller stops advancing it; a canary whose numbers turn " +
      "significantly worse is still rolled back.",
  },
  resume: {
    title: (n) => `Resume ${n}`, confirm: "Resume release", done: "Resumed",
    text: "The controller judges the release again from where it was paused.",
  },
  promote: {
    title: (n) => `Promote ${n}`, confirm: "Promote", done: "Promoted",
    text: "All traffic goes to the chosen variant now, and the release is finished.",
  },
  rollback: {
    title: (n) => `Roll back ${n}`, confirm: "Roll back", done: "Rolled back",
    text: "All traffic goes back to the baseline now, and the release is finished (allowed after a promotion too).",
  },
};

const state = {
  list: [],
  name: null, // the selected release
  report: null,
  points: [],
  pairs: [],
  bucketS: null,
  seq: 0, // detail loads: a response for an older selection is dropped
  action: null, // the action its dialog asks a reason for
  updatedAt: null,
};
let charts = null;
let live = null; // liveRefresh(), once the page is set up

// ----------------------------------------------------------------------------------- helpers

function statusChip(status) {
  return chip(status.replace("_", " "), `status-chip status-${status}`);
}

function actionChip(action) {
  return chip(action, `action-chip action-${action}`);
}

// The releases API gives times in seconds since the epoch.
function ago(at) {
  return at == null ? "" : agoMs(at * 1000);
}

function timeEl(at) {
  return timeElMs(at * 1000);
}

function pct(w) {
  return `${Number(w).toFixed(Number.isInteger(Number(w)) ? 0 : 1)}%`;
}

/** "stable 90% · canary 10%", in the spec's variant order when given. */
function splitText(weights, order = null) {
  const names = order ? [...order, ...Object.keys(weights).filter((v) => !order.includes(v))] : Object.keys(weights);
  return names.filter((v) => v in weights).map((v) => `${v} ${pct(weights[v])}`).join(" · ");
}

// ------------------------------------------------------------------------------------ session

const { handleAuth, start } = keyLogin({
  session,
  probe: () => releases.list(),
  onConnect: async (list) => {
    state.list = ordered(list.data);
    renderList();
    const wanted = decodeURIComponent(location.hash.replace(/^#release=/, ""));
    if (location.hash.startsWith("#release=") && wanted) await select(wanted);
    live.schedule();
  },
  onLogout: () => {
    state.name = null;
    state.report = null;
    live.stop();
    if (charts) charts.clear();
    if ($("action-dialog").open) $("action-dialog").close();
  },
  errorText,
});

// ------------------------------------------------------------------------------------ refresh

/** Re-read the list and the selected release; the selection, focus and open dialog stay as they are.
 * `force`: after a change, wait for a read already under way and read again (it may predate the change). */
const refresh = coalesce(async () => {
  if (!session.key) return;
  try {
    const list = await releases.list();
    state.list = ordered(list.data);
    renderList();
    if (state.name) await loadDetail();
    state.updatedAt = Date.now();
    listStatus();
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = `Not updated: ${errorText(exc)}`;
  }
});

function listStatus() {
  const n = state.list.length;
  const shown = filtered().length;
  const count = n ? `${n} release${n === 1 ? "" : "s"}${shown !== n ? ` (${shown} shown)` : ""}` : "No releases yet.";
  if ($("list-status").textContent !== count) $("list-status").textContent = count;
  $("updated").textContent = state.updatedAt ? `· updated ${new Date(state.updatedAt).toLocaleTimeString()}` : "";
}

/** Releases still deciding first (running, paused), then finished ones; by name within each. */
function ordered(list) {
  const done = (r) => (FINISHED.has(r.status) ? 1 : 0);
  return [...list].sort((a, b) => done(a) - done(b) || a.name.localeCompare(b.name));
}

function filtered() {
  const q = $("search").value.trim().toLowerCase();
  if (!q) return state.list;
  return state.list.filter((r) => `${r.name} ${r.strategy} ${r.status}`.toLowerCase().includes(q));
}

function splitBar(weights, variants) {
  const bar = el("div", { class: "split-bar", "aria-hidden": "true" });
  variants.forEach((v, i) => {
    const w = Number(weights[v] || 0);
    if (w <= 0) return;
    const seg = el("span", { class: "split-seg", title: `${v} ${pct(w)}` });
    seg.style.width = `${w}%`;
    seg.style.background = variantColor(i);
    bar.append(seg);
  });
  return bar;
}

function renderList() {
  const items = filtered().map((r) => {
    const variants = r.spec.variants.map((v) => v.name);
    const descId = `rel-desc-${r.id}`;
    const button = el(
      "button",
      {
        type: "button",
        class: "release-item",
        "aria-current": r.name === state.name ? "true" : null,
        "aria-label": `Open release ${r.name}`,
        "aria-describedby": descId,
        "data-focus-key": r.name,
        onclick: () => select(r.name),
      },
      el("span", { class: "release-name", text: r.name }),
      el("span", { class: "chips" }, chip(STRATEGIES[r.strategy] || r.strategy, "chip-muted"), statusChip(r.status)),
      el("span", { class: "release-desc", id: descId },
        el("span", { class: "release-split" }, splitBar(r.weights, variants),
          el("span", { class: "split-text", text: splitText(r.weights, variants) })),
        r.decision
          ? el("span", { class: "release-decision", title: r.decision.reason },
            el("span", { class: "decision-action", text: `${r.decision.action}: ` }), r.decision.reason)
          : null),
    );
    return el("li", { "data-release": r.name }, button);
  });
  replaceKeepingFocus($("release-list"), items);
  listStatus();
}

// ---------------------------------------------------------------------------------- detail

async function select(name) {
  if (name !== state.name) {
    state.name = name;
    state.report = null;
    state.points = [];
    state.pairs = [];
    if (charts) charts.clear();
    showAlert($("action-error"), "");
    showAlert($("detail-error"), "");
    $("action-result").textContent = "";
    history.replaceState(null, "", `#release=${encodeURIComponent(name)}`);
    // Nothing of the previous release stays on screen under this one's name while it loads.
    $("detail-body").hidden = true;
    $("release-chips").replaceChildren();
    $("release-meta").textContent = "";
    for (const a of Object.keys(ACTIONS)) $(`act-${a}`).disabled = true;
    $("detail-loading").textContent = `Loading ${name}…`;
    $("detail-loading").hidden = false;
  }
  renderList();
  $("empty").hidden = true;
  $("release-view").hidden = false;
  $("release-title").textContent = name;
  await loadDetail();
}

function bucketFor(report) {
  const chosen = $("bucket").value;
  if (chosen !== "auto") return Number(chosen);
  const span = Math.max(1, Date.now() / 1000 - report.created_at);
  return AUTO_BUCKETS.find((b) => span / b <= MAX_AUTO_POINTS) || AUTO_BUCKETS[AUTO_BUCKETS.length - 1];
}

async function loadDetail() {
  const name = state.name;
  const seq = ++state.seq;
  try {
    const report = await releases.report(name);
    const bucketS = bucketFor(report);
    const [series, shadow] = await Promise.all([
      releases.series(name, bucketS),
      report.strategy === "shadow" ? releases.shadow(name) : Promise.resolve(null),
    ]);
    if (seq !== state.seq || name !== state.name) return; // another release was selected meanwhile
    state.report = report;
    state.bucketS = bucketS;
    state.points = series.points;
    state.pairs = shadow ? shadow.data : [];
    showAlert($("detail-error"), "");
    $("detail-loading").hidden = true;
    $("detail-body").hidden = false;
    renderDetail();
  } catch (exc) {
    if (seq !== state.seq || handleAuth(exc)) return;
    const message = exc instanceof ApiError && exc.status === 404
      ? `Release ${name} was not found: ${exc.message}`
      : `Could not load ${name}${state.report ? " (showing the last numbers read)" : ""}: ${errorText(exc)}`;
    showAlert($("detail-error"), message);
    $("detail-loading").hidden = true;
  }
}

function renderDetail() {
  const r = state.report;
  $("release-title").textContent = r.name;
  $("release-chips").replaceChildren(
    chip(STRATEGIES[r.strategy] || r.strategy, "chip-muted"), statusChip(r.status),
    el("span", { class: "sr-only", text: `status ${r.status}` }),
  );
  const hash = (r.spec_hash || "").slice(0, 12);
  $("release-meta").replaceChildren(
    `baseline ${r.baseline} · ${r.strategy === "ab" ? "variant" : "candidate"} ${r.candidate} · unit ${r.unit} · `,
    `created by ${r.created_by || "—"} `, timeEl(r.created_at), ` · spec ${hash} · revision ${r.revision}`,
  );
  renderButtons(r);
  renderDecision(r);
  renderSplit(r);
  renderVariants(r);
  renderComparisons(r);
  renderCharts(r);
  renderShadow(r);
  renderHistory(r);
}

function renderButtons(r) {
  const finished = FINISHED.has(r.status);
  $("act-pause").disabled = r.status !== "running";
  $("act-resume").disabled = r.status !== "paused";
  $("act-promote").disabled = finished;
  $("act-rollback").disabled = r.status === "rolled_back" || r.status === "stopped";
  $("act-promote").textContent = r.strategy === "bluegreen" ? "Promote (switch)" : "Promote";
}

function renderDecision(r) {
  const d = r.decision;
  const box = $("decision");
  if (!d) {
    box.replaceChildren(el("p", { class: "muted", text: "No decision yet." }));
  } else {
    box.replaceChildren(
      el("div", { class: "decision-line" }, actionChip(d.action), statusChip(r.status),
        el("span", { class: "muted small-text" }, d.actor ? `by ${d.actor} · ` : "", timeEl(d.at), ` (${ago(d.at)})`)),
      el("p", { class: "decision-reason", id: "decision-reason", text: d.reason || "(no reason given)" }),
    );
  }
  // Why it holds where it is now: the controller's latest reading (a note, not a change).
  if (r.note) {
    box.append(el("p", { class: "last-change small-text", id: "decision-note" },
      el("span", { class: "muted", text: "Now: " }), el("span", { class: "note-text", text: r.note })));
  }
  const steps = r.steps || null;
  $("steps").hidden = !steps;
  if (steps) {
    const last = steps.length - 1;
    $("steps-list").replaceChildren(...steps.map((s, i) => {
      const done = r.status === "promoted" || i < r.step;
      const current = !FINISHED.has(r.status) && i === r.step;
      const cls = done ? "done" : current ? "current" : "next";
      const label = `Step ${i + 1}: ${pct(s)}${i === last ? " (promotion)" : ""}`;
      return el("li", { class: `step ${cls}`, "aria-current": current ? "step" : null, title: label },
        el("span", { class: "step-share", text: pct(s) }),
        el("span", { class: "sr-only", text: ` ${label}, ${cls === "next" ? "to come" : cls}` }));
    }));
    if (!FINISHED.has(r.status)) {
      $("steps-list").append(el("li", { class: "step-note muted small-text" },
        `step ${r.step + 1} of ${steps.length} since `, timeEl(r.step_started_at)));
    }
  }
}

function renderSplit(r) {
  const variants = r.spec.variants.map((v) => v.name);
  $("split").replaceChildren(
    splitBar(r.weights, variants),
    el("ul", { class: "split-legend", "aria-label": "Traffic split" }, variants.map((v, i) => {
      const sw = el("span", { class: "swatch", "aria-hidden": "true" });
      sw.style.background = variantColor(i);
      const role = v === r.baseline ? "baseline" : r.strategy === "ab" ? "" : "candidate";
      return el("li", { "data-variant": v }, sw, el("span", { class: "mono", text: v }),
        el("strong", { class: "weight", text: ` ${pct(r.weights[v] || 0)}` }),
        role ? el("span", { class: "muted small-text", text: ` ${role}` }) : null);
    })),
  );
  const srm = r.sample_ratio;
  $("srm").replaceChildren(srm
    ? el("p", { class: srm.mismatch ? "alert warn" : "muted small-text" },
      el("strong", { text: srm.mismatch ? "Sample ratio mismatch. " : "Sample ratio OK. " }),
      `p = ${srm.p_value == null ? "—" : Number(srm.p_value).toPrecision(2)}${srm.reason ? ` — ${srm.reason}` : ""}`)
    : el("p", { class: "muted small-text", text: "Sample-ratio check: not yet (it needs traffic on two variants)." }));
}

/** What a variant answers with, one part a line: model (or workflow), prompt, collection, policy. */
function serves(v) {
  const parts = [v.workflow ? `workflow ${v.workflow}` : `model ${v.model || "(default)"}`];
  if (v.prompt) parts.push(`prompt ${v.prompt}`);
  if (v.rag) parts.push(`rag ${v.rag}`);
  if (v.policy) parts.push(`policy ${v.policy}`);
  return parts.map((p) => el("span", { class: "serves-part", text: p }));
}

function rateCell(rate, count) {
  return el("td", { class: "num" }, fmt.pct(rate), count ? el("span", { class: "muted small-text", text: ` (${count})` }) : null);
}

function renderVariants(r) {
  const names = r.spec.variants.map((v) => v.name);
  $("variants-table").replaceChildren(...names.map((name, i) => {
    const v = r.variants[name];
    const sw = el("span", { class: "swatch", "aria-hidden": "true" });
    sw.style.background = variantColor(i);
    const role = name === r.baseline ? chip("baseline", "chip-muted") : name === r.candidate && r.strategy !== "ab"
      ? chip("candidate") : null;
    const fb = v.feedback || {};
    return el("tr", { "data-variant": name },
      el("th", { scope: "row" }, el("span", { class: "variant-name" }, sw, el("span", { class: "mono", text: name })),
        role),
      el("td", { class: "small-text serves" }, serves(v)),
      el("td", { class: "num", text: pct(v.weight) }),
      el("td", { class: "num" }, el("span", { class: "requests", text: fmt.count(v.requests) }),
        el("span", { class: "sub-num", text: `${fmt.count(v.units)} unit${v.units === 1 ? "" : "s"}` })),
      rateCell(v.error_rate, v.errors),
      rateCell(v.block_rate, v.guardrail_blocks),
      el("td", { class: "num" }, fmt.pct(fb.negative_rate),
        el("span", { class: "muted small-text", text: ` of ${fb.rated || 0} rated` })),
      el("td", { class: "num", text: `${fmt.ms(v.latency_ms.p50)} / ${fmt.ms(v.latency_ms.p95)}` }),
      el("td", { class: "num", text: `${fmt.ms(v.ttft_ms.p50)} / ${fmt.ms(v.ttft_ms.p95)}` }),
      el("td", { class: "num", text: `${fmt.count(v.prompt_tokens)} / ${fmt.count(v.completion_tokens)}` }),
    );
  }));
}

function signed(value, metric) {
  if (value == null) return "—";
  if (RATE_METRICS.has(metric)) {
    const pp = value * 100;
    return `${pp > 0 ? "+" : pp < 0 ? "−" : "±"}${Math.abs(pp).toFixed(Math.abs(pp) < 10 ? 2 : 1)} pp`;
  }
  return `${value > 0 ? "+" : value < 0 ? "−" : "±"}${fmt.ms(Math.abs(value))}`;
}

function renderComparisons(r) {
  const rows = [];
  for (const [variant, metrics] of Object.entries(r.comparisons || {})) {
    for (const [metric, c] of Object.entries(metrics)) {
      const ci = c.diff_ci ? `[${signed(c.diff_ci[0], metric)}, ${signed(c.diff_ci[1], metric)}]` : "—";
      rows.push(el("tr", { "data-variant": variant, "data-metric": metric },
        el("td", { class: "mono", text: variant }),
        el("td", { class: "mono", text: metric }),
        el("td", {}, chip(c.state, `state-chip state-${c.state}`)),
        el("td", { class: "num", text: signed(c.diff, metric) }),
        el("td", { class: "num", text: ci }),
        el("td", { class: "small-text", text: c.reason || "" })));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "Nothing to compare." })));
  $("comparisons-table").replaceChildren(...rows);
}

function renderCharts(r) {
  const variants = r.spec.variants.map((v) => v.name);
  if (!charts) charts = new ChartGrid($("charts"));
  const n = charts.render(state.points, variants, state.bucketS, Date.now() / 1000);
  const label = state.bucketS >= 3600 ? `${state.bucketS / 3600} h` : state.bucketS >= 60 ? `${state.bucketS / 60} min`
    : `${state.bucketS} s`;
  $("charts-status").textContent = state.points.length
    ? `Buckets of ${label}, ${n} point${n === 1 ? "" : "s"}; one line per variant (hover a chart for its values).`
    : `No traffic recorded yet (buckets of ${label}).`;
  $("series-table").replaceChildren(...[...state.points].reverse().slice(0, 500).map((p) => el("tr", {},
    el("td", {}, timeEl(p.t)), el("td", { class: "mono", text: p.variant }),
    el("td", { class: "num", text: fmt.count(p.requests) }), el("td", { class: "num", text: fmt.count(p.errors) }),
    el("td", { class: "num", text: fmt.count(p.blocked) }), el("td", { class: "num", text: fmt.ms(p.latency_ms) }),
    el("td", { class: "num", text: fmt.ms(p.ttft_ms) }), el("td", { class: "num", text: fmt.count(p.feedback_up) }),
    el("td", { class: "num", text: fmt.count(p.feedback_down) }))));
}

function renderShadow(r) {
  const card = $("shadow-card");
  card.hidden = r.strategy !== "shadow";
  if (card.hidden) return;
  const t = r.shadow || {};
  const item = (k, v) => el("div", {}, el("dt", { text: k }), el("dd", { text: v }));
  $("shadow-totals").replaceChildren(
    item("Pairs", fmt.count(t.pairs)),
    item("Mean similarity", t.similarity_mean == null ? "—" : `${Number(t.similarity_mean).toFixed(3)} (${t.similarity_n} scored)`),
    item("Mean latency primary / shadow", `${fmt.ms(t.primary_latency_ms_mean)} / ${fmt.ms(t.shadow_latency_ms_mean)}`),
    item("Mean tokens primary / shadow", `${t.primary_tokens_mean == null ? "—" : Math.round(t.primary_tokens_mean)} / ${t.shadow_tokens_mean == null ? "—" : Math.round(t.shadow_tokens_mean)}`),
    item("Blocked primary / shadow", `${fmt.count(t.primary_blocked)} / ${fmt.count(t.shadow_blocked)}`),
    item("Shadow errors", fmt.count(t.shadow_errors)),
  );
  const rows = state.pairs.map((p) => {
    const notes = [p.primary_blocked ? "primary blocked" : "", p.shadow_blocked ? "shadow blocked" : "",
      p.shadow_error ? `shadow error: ${p.shadow_error}` : ""].filter(Boolean).join("; ");
    return el("tr", {},
      el("td", {}, timeEl(p.at)),
      el("td", { class: "pair-text", text: p.question }),
      el("td", {}, el("div", { class: "pair-text", text: p.primary_text })),
      el("td", {}, el("div", { class: "pair-text", text: p.shadow_text })),
      el("td", { class: "num", text: p.similarity == null ? "—" : Number(p.similarity).toFixed(3) }),
      el("td", { class: "num", text: `${fmt.ms(p.primary_latency_ms)} / ${fmt.ms(p.shadow_latency_ms)}` }),
      el("td", { class: "small-text", text: notes }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "7", class: "muted", text: "No shadow answers yet." })));
  $("shadow-table").replaceChildren(...rows);
}

function renderHistory(r) {
  const order = r.spec.variants.map((v) => v.name);
  const rows = (r.decisions || []).map((d) => {
    const status = d.action === "create" ? "created" : d.from && d.to ? `${d.from} → ${d.to}` : d.to || "";
    return el("tr", { "data-action": d.action },
      el("td", { class: "nowrap" }, timeEl(d.at)),
      el("td", {}, actionChip(d.action)),
      el("td", { class: "small-text", text: d.actor || "" }),
      el("td", { class: "nowrap small-text", text: status.replaceAll("_", " ") }),
      el("td", { class: "small-text nowrap", text: d.weights ? splitText(d.weights, order) : "" }),
      el("td", { class: "reason", text: d.reason || "" }));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No decisions yet." })));
  $("history-table").replaceChildren(...rows);
}

// ---------------------------------------------------------------------------------- actions

function openAction(action) {
  const r = state.report;
  if (!r) return;
  const a = ACTIONS[action];
  state.action = action;
  $("dialog-title").textContent = a.title(r.name);
  let text = a.text;
  if (action === "promote" && r.strategy === "bluegreen") {
    text = "Blue/green: the switch. Keel first asks the green variant its probe questions; traffic moves only when " +
      "it answers them all (otherwise nothing changes and the reason is shown).";
  }
  $("dialog-text").textContent = text;
  const variants = r.spec.variants.map((v) => v.name);
  $("dialog-variant-row").hidden = action !== "promote";
  $("dialog-variant").replaceChildren(...variants.map((v) => el("option", {
    value: v, selected: v === r.candidate, text: v === r.candidate ? `${v} (candidate)` : v === r.baseline ? `${v} (baseline)` : v,
  })));
  $("dialog-reason").value = "";
  $("dialog-error").textContent = "";
  $("dialog-confirm").textContent = a.confirm;
  $("dialog-confirm").disabled = false;
  $("action-dialog").showModal();
  $("dialog-reason").focus();
}

async function submitAction(event) {
  event.preventDefault();
  const r = state.report;
  const action = state.action;
  if (!r || !action) return;
  const reason = $("dialog-reason").value.trim();
  if (!reason) {
    $("dialog-error").textContent = "Give a reason: it is kept with the decision in the audit trail.";
    $("dialog-reason").focus();
    return;
  }
  const variant = action === "promote" && $("dialog-variant").value !== r.candidate ? $("dialog-variant").value : null;
  const button = $("dialog-confirm");
  button.disabled = true;
  const label = button.textContent;
  button.textContent = action === "promote" && r.strategy === "bluegreen" ? "Probing green…" : "Working…";
  $("dialog-error").textContent = "";
  try {
    const out = await releases.act(r.name, action, reason, variant);
    $("action-dialog").close();
    showAlert($("action-error"), "");
    const order = out.spec.variants.map((v) => v.name);
    const msg = `${ACTIONS[action].done} ${out.name}: now ${out.status.replace("_", " ")} (${splitText(out.weights, order)}).`;
    $("action-result").textContent = msg;
    toast(msg);
    await refresh(true);
  } catch (exc) {
    if (handleAuth(exc)) return;
    // Shown in the dialog (the reason stays typed, to retry or cancel) and on the page once it is closed.
    const text = `${ACTIONS[action].title(r.name)} refused: ${errorText(exc)}`;
    $("dialog-error").textContent = text;
    showAlert($("action-error"), text);
  } finally {
    button.disabled = false;
    button.textContent = label;
  }
}

// ------------------------------------------------------------------------------------ init

function init() {
  live = liveRefresh(refresh, LIVE_EVERY_MS);
  $("search").addEventListener("input", renderList);
  $("bucket").addEventListener("change", () => state.name && loadDetail());
  for (const action of Object.keys(ACTIONS)) $(`act-${action}`).addEventListener("click", () => openAction(action));
  $("action-form").addEventListener("submit", submitAction);
  $("dialog-cancel").addEventListener("click", () => $("action-dialog").close());
  $("action-dialog").addEventListener("close", () => (state.action = null));
  start();
}

init();
