// Traces: recent traces of this server (newest first, filtered by span name or completion id, paged back),
// one trace as a waterfall with the selected span's details, and a chat answer's lineage. Plain DOM and ES
// modules through the public Keel API; the list refreshes every few seconds and keeps the selection.

import { $, chip, el, replaceKeepingFocus, showAlert, timeEl, when } from "../common/dom.js";
import { errorText as commonErrorText, keyLogin, liveRefresh } from "../common/page.js";
import { lineage, session, traces } from "./api.js";
import { ms, nsToMs, short } from "./dom.js";
import { renderLineage } from "./lineage.js";
import { renderSpan } from "./span.js";
import { axis, layout, onKeys, renderRows } from "./waterfall.js";

const LIVE_EVERY_MS = 5000;
const PAGE = 50;
// Reading traces (this page's own refreshes, `keel traces`) is traced too; hidden by default, and the list then
// reads more at a time so that a page of other traces remains.
const OWN_READS = /^GET \/v1\/traces(\/\{trace_id\})?$/;
const PAGE_HIDING = 200;

const state = {
  list: [], // trace summaries shown, newest first (the first page, then any older pages loaded)
  more: false, // the last page read was full: older traces may exist
  pagedBack: false,
  filters: { name: "", responseId: "" },
  traceId: null, // the selected trace
  trace: null, // its spans (GET /v1/traces/{id})
  model: null, // layout(spans)
  loadedKey: null, // the summary (spans, duration, errors) the loaded spans match: re-read when it changes
  spanId: null,
  collapsed: new Set(),
  responseId: null, // the completion id of the selected trace's answer, if it is a chat
  lineageOpen: false, // stays open from one trace to the next once a person opened it
  lineageFor: null,
  seq: 0, // trace loads: a response for an older selection is dropped
  lineageSeq: 0,
  refreshing: null,
  updatedAt: null,
};
let live = null; // liveRefresh(), once the page is set up

// ----------------------------------------------------------------------------------- helpers

function errorText(exc) {
  return commonErrorText(exc, { forbidden: " — the Traces page needs a key with the monitor scope." });
}

function summaryKey(t) {
  return t ? `${t.spans}|${t.duration_ms}|${t.errors}|${t.root}` : null;
}

function writeHash() {
  const parts = [];
  if (state.traceId) parts.push(`trace=${encodeURIComponent(state.traceId)}`);
  if (state.traceId && state.spanId) parts.push(`span=${encodeURIComponent(state.spanId)}`);
  if (state.filters.responseId) parts.push(`completion=${encodeURIComponent(state.filters.responseId)}`);
  if (state.filters.name) parts.push(`name=${encodeURIComponent(state.filters.name)}`);
  history.replaceState(null, "", parts.length ? `#${parts.join("&")}` : location.pathname);
}

function readHash() {
  const out = {};
  for (const part of location.hash.replace(/^#/, "").split("&")) {
    const [k, v] = part.split("=");
    if (k && v !== undefined) out[k] = decodeURIComponent(v);
  }
  return out;
}

// ------------------------------------------------------------------------------------ session

let wanted = {}; // what the address asked for when the page connected

const { handleAuth, start } = keyLogin({
  session,
  probe: () => {
    wanted = readHash();
    state.filters = { name: wanted.name || "", responseId: wanted.completion || "" };
    $("filter-name").value = state.filters.name;
    $("filter-response").value = state.filters.responseId;
    return readPage();
  },
  onConnect: async (page) => {
    setList(page);
    state.updatedAt = Date.now();
    renderList();
    if (wanted.trace) await select(wanted.trace, { span: wanted.span });
    live.schedule();
  },
  onLogout: () => {
    live.stop();
    Object.assign(state, { list: [], traceId: null, trace: null, model: null, spanId: null, responseId: null,
      lineageFor: null, loadedKey: null });
    state.collapsed.clear();
    $("trace-view").hidden = true;
    $("empty").hidden = false;
  },
  errorText,
});

// ------------------------------------------------------------------------------------ the list

function pageSize() {
  return $("hide-own").checked ? PAGE_HIDING : PAGE;
}

function readPage(beforeNs) {
  return traces.list({ limit: pageSize(), beforeNs, name: state.filters.name, responseId: state.filters.responseId });
}

function setList(page) {
  state.list = page.data;
  state.more = page.data.length === pageSize();
  state.pagedBack = false;
}

function isOwnRead(t) {
  return OWN_READS.test(t.root || "") && t.trace_id !== state.traceId;
}

/** The traces the list shows: all of them, or all but the reads of the trace store. */
function shown() {
  return $("hide-own").checked ? state.list.filter((t) => !isOwnRead(t)) : state.list;
}

/** Re-read the newest page (older pages already loaded stay under it) and, if the selected trace grew, the
 * trace; the selection, the selected span, collapsed spans and focus stay. */
async function refresh() {
  if (!session.key) return;
  if (state.refreshing) return state.refreshing;
  state.refreshing = (async () => {
    try {
      const page = await readPage();
      if (state.pagedBack) {
        const fresh = new Set(page.data.map((t) => t.trace_id));
        const last = page.data.length ? BigInt(page.data[page.data.length - 1].start_ns) : null;
        const older = state.list.filter((t) => !fresh.has(t.trace_id) && last !== null && BigInt(t.start_ns) < last);
        state.list = [...page.data, ...older];
      } else {
        setList(page);
      }
      state.updatedAt = Date.now();
      renderList();
      const current = state.list.find((t) => t.trace_id === state.traceId);
      if (current && state.trace && summaryKey(current) !== state.loadedKey) await loadTrace({ quiet: true });
    } catch (exc) {
      if (!handleAuth(exc)) $("list-status").textContent = `Not updated: ${errorText(exc)}`;
    }
  })().finally(() => {
    state.refreshing = null;
  });
  return state.refreshing;
}

async function loadOlder() {
  const last = state.list[state.list.length - 1];
  if (!last) return;
  const button = $("older");
  button.disabled = true;
  try {
    const page = await readPage(last.start_ns);
    const seen = new Set(state.list.map((t) => t.trace_id));
    state.list = [...state.list, ...page.data.filter((t) => !seen.has(t.trace_id))];
    state.more = page.data.length === pageSize();
    state.pagedBack = true;
    renderList();
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = `Not loaded: ${errorText(exc)}`;
  } finally {
    button.disabled = false;
  }
}

async function applyFilters(event) {
  if (event) event.preventDefault();
  state.filters = { name: $("filter-name").value.trim(), responseId: $("filter-response").value.trim() };
  writeHash();
  try {
    setList(await readPage());
    state.updatedAt = Date.now();
    renderList();
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = `Not updated: ${errorText(exc)}`;
  }
}

function listStatus() {
  const n = shown().length;
  const hidden = state.list.length - n;
  const filtered = state.filters.name || state.filters.responseId;
  const text = (n
    ? `${n}${state.more ? "+" : ""} trace${n === 1 ? "" : "s"}${filtered ? " matching the filters" : ""}`
    : filtered ? "No trace matches the filters." : "No traces yet.")
    + (hidden ? ` (${hidden} read${hidden === 1 ? "" : "s"} of the trace store hidden)` : "");
  if ($("list-status").textContent !== text) $("list-status").textContent = text;
  $("updated").textContent = state.updatedAt ? `· updated ${new Date(state.updatedAt).toLocaleTimeString()}` : "";
  $("older").hidden = !state.more;
}

function rootName(t) {
  return t.root || "(root span still open)";
}

function renderList() {
  const items = shown().map((t) => {
    const start = nsToMs(t.start_ns);
    const descId = `trace-desc-${t.trace_id}`;
    const button = el("button", {
      type: "button", class: `trace-item${t.errors ? " has-errors" : ""}`,
      "aria-current": t.trace_id === state.traceId ? "true" : null,
      "aria-label": `Open trace ${rootName(t)} at ${when(start)}`, "aria-describedby": descId,
      "data-focus-key": t.trace_id, onclick: () => select(t.trace_id),
    },
    el("span", { class: "trace-top" }, el("span", { class: "trace-root", text: rootName(t) }),
      t.errors ? chip(`${t.errors} error${t.errors === 1 ? "" : "s"}`, "status-error") : null),
    el("span", { class: "trace-desc", id: descId },
      el("span", { class: "trace-stats" }, el("time", { datetime: new Date(start).toISOString(), text: when(start) }),
        ` · ${ms(t.duration_ms)} · ${t.spans} span${t.spans === 1 ? "" : "s"}`,
        t.errors ? el("span", { class: "sr-only", text: ` · ${t.errors} with errors` }) : null),
      t.response_id ? el("span", { class: "trace-resp", title: t.response_id, text: t.response_id }) : null));
    return el("li", { "data-trace-id": t.trace_id, "data-response-id": t.response_id || null }, button);
  });
  replaceKeepingFocus($("trace-list"), items);
  listStatus();
}

function onListKeys(event) {
  const btn = event.target.closest(".trace-item");
  if (!btn || !["ArrowDown", "ArrowUp", "Home", "End"].includes(event.key)) return;
  const buttons = [...$("trace-list").querySelectorAll(".trace-item")];
  const i = buttons.indexOf(btn);
  const target = { ArrowDown: buttons[i + 1], ArrowUp: buttons[i - 1], Home: buttons[0],
    End: buttons[buttons.length - 1] }[event.key];
  event.preventDefault();
  if (target) target.focus();
}

// ---------------------------------------------------------------------------------- one trace

async function select(traceId, { span = null } = {}) {
  if (traceId !== state.traceId) {
    state.traceId = traceId;
    state.trace = null;
    state.model = null;
    state.loadedKey = null;
    state.spanId = span;
    state.collapsed.clear();
    state.responseId = null;
    state.lineageFor = null;
    // Nothing of the previous trace stays on screen under this one's name while it loads.
    $("trace-body").hidden = true;
    $("trace-title").textContent = "";
    $("trace-chips").replaceChildren();
    $("trace-meta").textContent = "";
    showAlert($("detail-error"), "");
    $("detail-loading").textContent = `Loading trace ${short(traceId)}…`;
    $("detail-loading").hidden = false;
  }
  writeHash();
  renderList();
  $("empty").hidden = true;
  $("trace-view").hidden = false;
  await loadTrace();
}

async function loadTrace({ quiet = false } = {}) {
  const id = state.traceId;
  const seq = ++state.seq;
  try {
    const body = await traces.get(id);
    if (seq !== state.seq || id !== state.traceId) return;
    state.trace = body;
    state.model = layout(body.spans);
    const summary = state.list.find((t) => t.trace_id === id);
    state.loadedKey = summary ? summaryKey(summary) : null;
    if (!state.spanId || !state.model.rows.some((n) => n.span.span_id === state.spanId)) {
      state.spanId = firstSpan(state.model);
    }
    showAlert($("detail-error"), "");
    $("detail-loading").hidden = true;
    $("trace-body").hidden = false;
    renderTrace();
  } catch (exc) {
    if (seq !== state.seq || handleAuth(exc)) return;
    $("detail-loading").hidden = true;
    if (!quiet || !state.trace) {
      $("trace-body").hidden = !state.trace;
      showAlert($("detail-error"), `Trace ${id}: ${errorText(exc)}`);
    }
  }
}

/** What a trace opens on: where an error began (the first failed span none of whose children failed), else the
 * root. */
function firstSpan(model) {
  const failed = (n) => n.span.status === "ERROR";
  const origin = model.rows.find((n) => failed(n) && !n.children.some(failed));
  return (origin || model.rows[0] || { span: {} }).span.span_id || null;
}

function renderTrace() {
  const { spans } = state.trace;
  const model = state.model;
  const root = model.rows[0] ? model.rows[0].span : null;
  const errors = spans.filter((s) => s.status === "ERROR").length;
  const summary = state.list.find((t) => t.trace_id === state.traceId);
  $("trace-title").textContent = summary && summary.root ? summary.root : root ? root.name : state.traceId;
  $("trace-chips").replaceChildren(
    chip(`${spans.length} span${spans.length === 1 ? "" : "s"}`, "chip-muted"),
    chip(ms(model.totalNs / 1e6), "chip-muted"),
    errors ? chip(`${errors} error${errors === 1 ? "" : "s"}`, "status-error") : chip("no errors", "status-ok"),
    ...[...new Set(spans.map((s) => s.service).filter(Boolean))].map((s) => chip(`service ${s}`, "chip-muted")));
  state.responseId = (summary && summary.response_id)
    || (spans.find((s) => s.attributes && s.attributes["gen_ai.response.id"]) || { attributes: {} }).attributes["gen_ai.response.id"]
    || null;
  const started = model.startNs ? nsToMs(model.startNs) : null;
  $("trace-meta").replaceChildren(el("span", {},
    "Trace ", el("span", { class: "mono", id: "trace-id", text: state.traceId }),
    started ? [" · started ", timeEl(started, { millis: true })] : null,
    state.responseId ? [" · answer ", el("span", { class: "mono", id: "trace-response", text: state.responseId })] : null));
  $("axis").replaceChildren(axis(model.totalNs));
  renderWaterfall();
  renderDetail();
  renderLineageCard();
}

function renderWaterfall(focus = false) {
  const rows = renderRows(state.model, {
    selected: state.spanId, collapsed: state.collapsed,
    onSelect: (id) => selectSpan(id),
    onToggle: (id) => toggle(id),
  });
  replaceKeepingFocus($("span-rows"), rows);
  if (focus) {
    const btn = $("span-rows").querySelector(`.span-btn[data-span-id="${CSS.escape(state.spanId)}"]`);
    if (btn) btn.focus();
  }
}

function selectSpan(id, { focus = false } = {}) {
  state.spanId = id;
  writeHash();
  renderWaterfall(focus);
  renderDetail();
}

function toggle(id) {
  if (state.collapsed.has(id)) state.collapsed.delete(id);
  else state.collapsed.add(id);
  // a selected span inside a collapsed subtree: its ancestor that stays visible is selected instead
  const node = state.model.rows.find((n) => n.span.span_id === state.spanId);
  for (let p = node && node.parent; p; p = p.parent) {
    if (state.collapsed.has(p.span.span_id)) state.spanId = p.span.span_id;
  }
  const focusBack = document.activeElement && $("span-rows").contains(document.activeElement);
  renderWaterfall();
  renderDetail();
  if (focusBack) {
    const btn = $("span-rows").querySelector(`.span-btn[data-span-id="${CSS.escape(id)}"]`);
    if (btn) btn.focus();
  }
}

function renderDetail() {
  const node = state.model.rows.find((n) => n.span.span_id === state.spanId);
  $("span-detail").hidden = !node;
  if (node) $("span-detail").replaceChildren(...renderSpan(node));
}

// ---------------------------------------------------------------------------------- lineage

function renderLineageCard() {
  const card = $("lineage-card");
  card.hidden = !state.responseId;
  if (!state.responseId) return;
  $("lineage-hint").replaceChildren("What produced answer ", el("span", { class: "mono", text: state.responseId }),
    ": prompt version and hash, route and adapter, release variant, passages, guardrail policy and verdicts, "
    + "eval runs of the prompt and feedback (GET /v1/lineage/{completion_id}).");
  $("lineage-toggle").setAttribute("aria-expanded", state.lineageOpen ? "true" : "false");
  $("lineage-toggle").textContent = state.lineageOpen ? "Hide lineage" : "Show lineage";
  $("lineage-body").hidden = !state.lineageOpen;
  if (state.lineageOpen && state.lineageFor !== state.responseId) loadLineage();
}

async function loadLineage() {
  const id = state.responseId;
  const seq = ++state.lineageSeq;
  state.lineageFor = id;
  const body = $("lineage-body");
  body.setAttribute("aria-busy", "true");
  body.replaceChildren(el("p", { class: "muted", role: "status", text: `Loading the lineage of ${id}…` }));
  try {
    const rec = await lineage.get(id);
    if (seq !== state.lineageSeq) return;
    body.replaceChildren(...renderLineage(rec));
  } catch (exc) {
    if (seq !== state.lineageSeq || handleAuth(exc)) return;
    state.lineageFor = null; // try again next time it is opened
    body.replaceChildren(el("div", { class: "alert warn", role: "alert", id: "lineage-error" },
      `No lineage for ${id}: ${errorText(exc)}`));
  } finally {
    if (seq === state.lineageSeq) body.removeAttribute("aria-busy");
  }
}

function toggleLineage() {
  state.lineageOpen = !state.lineageOpen;
  if (state.lineageOpen) state.lineageFor = null; // re-read: feedback may have arrived since
  renderLineageCard();
}

// ------------------------------------------------------------------------------------ init

function init() {
  live = liveRefresh(refresh, LIVE_EVERY_MS);
  $("filters").addEventListener("submit", applyFilters);
  $("clear-filters").addEventListener("click", () => {
    $("filter-name").value = "";
    $("filter-response").value = "";
    applyFilters();
  });
  $("older").addEventListener("click", loadOlder);
  $("hide-own").addEventListener("change", () => applyFilters());
  $("trace-list").addEventListener("keydown", onListKeys);
  $("span-rows").addEventListener("keydown", (event) => onKeys(event, {
    model: state.model, collapsed: state.collapsed,
    onSelect: (id) => selectSpan(id, { focus: true }),
    onToggle: (id) => toggle(id),
  }));
  $("lineage-toggle").addEventListener("click", toggleLineage);
  start();
}

init();
