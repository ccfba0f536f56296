// A pipeline run as a graph: its seven steps as boxes joined by arrows (trigger -> dataset -> finetune -> evaluate ->
// canary -> approval -> promote), each coloured by its state with its attempts and duration; and one step's detail:
// its log, error and artifacts. Everything the server sent is shown as text, never as HTML.

import { chip, el, timeEl } from "../common/dom.js";

/** The steps of every run, in order (lifecycle/pipeline/spec.py STEPS). */
export const STEPS = ["trigger", "dataset", "finetune", "evaluate", "canary", "approval", "promote"];

export const STEP_LABELS = {
  trigger: "Trigger", dataset: "Dataset", finetune: "Fine-tune", evaluate: "Eval gate", canary: "Canary",
  approval: "Approval", promote: "Promote",
};

const STEP_STATES = {
  pending: "pending", running: "running", waiting: "waiting", succeeded: "succeeded", failed: "failed",
  skipped: "skipped", cancelled: "cancelled",
};

const SVG = "http://www.w3.org/2000/svg";

/** A duration in seconds as a person reads it: 0.4 s, 12 s, 3 min 4 s, 2 h 5 min, 1.5 days. */
export function duration(s) {
  if (s == null || !Number.isFinite(s)) return "";
  s = Math.max(0, s);
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${(s / 86400).toFixed(1)} days`;
}

/** How long a step took (or has taken so far, while it runs or waits); null before it started. */
export function stepSeconds(step, now = Date.now() / 1000) {
  if (step.started_at == null) return null;
  const end = step.finished_at != null ? step.finished_at
    : step.state === "running" || step.state === "waiting" ? now : null;
  return end == null ? null : end - step.started_at;
}

export function stepChip(state) {
  return chip(STEP_STATES[state] || state, `step-chip step-${state}`);
}

function attemptsText(n) {
  return n ? `${n} attempt${n === 1 ? "" : "s"}` : "not run";
}

/** The steps of `run` in the graph's order (a step the server did not send is shown pending). */
export function orderedSteps(run) {
  const byName = new Map((run.steps || []).map((s) => [s.name, s]));
  const extra = (run.steps || []).filter((s) => !STEPS.includes(s.name));
  return [...STEPS.map((name) => byName.get(name) || { name, state: "pending", attempts: 0, artifacts: {} }), ...extra];
}

function arrow(passed) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", `graph-arrow${passed ? " is-passed" : ""}`);
  svg.setAttribute("viewBox", "0 0 28 12");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS(SVG, "path");
  path.setAttribute("d", "M1 6H25M19 1.5L25.5 6L19 10.5");
  svg.append(path);
  return svg;
}

/**
 * The graph's items (one <li> a step, arrows between them), for the <ol> that holds them. `selected`: the step
 * whose detail is shown; `waiting`: the run waits for a person (its approval step is highlighted);
 * `onSelect(name)`: a step was picked.
 */
export function graphItems(run, { selected, waiting, onSelect }) {
  const steps = orderedSteps(run);
  return steps.map((step, i) => {
    const secs = stepSeconds(step);
    const meta = [attemptsText(step.attempts), secs != null ? duration(secs) : null].filter(Boolean).join(" · ");
    const needsYou = waiting && step.name === "approval" && step.state === "waiting";
    const button = el("button", {
      type: "button",
      class: "graph-step",
      "aria-pressed": step.name === selected ? "true" : "false",
      "data-focus-key": `step-${step.name}`,
      title: step.error || null,
      onclick: () => onSelect(step.name),
    },
    el("span", { class: "graph-step-name", text: step.name }),
    el("span", { class: "graph-step-state", text: needsYou ? "waiting for you" : STEP_STATES[step.state] || step.state }),
    el("span", { class: "graph-step-meta", text: meta }));
    const passed = step.state === "succeeded" || step.state === "skipped";
    return el("li", {
      class: `graph-node${needsYou ? " needs-you" : ""}`,
      "data-step": step.name,
      "data-state": step.state,
    }, button, i < steps.length - 1 ? arrow(passed) : null);
  });
}

/** Arrow keys, Home and End move between the graph's steps (and pick the one they land on). */
export function graphKeys(list, onSelect) {
  list.addEventListener("keydown", (event) => {
    const buttons = [...list.querySelectorAll(".graph-step")];
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0,
      End: buttons.length - 1 }[event.key];
    if (to === undefined || to < 0 || to >= buttons.length) return;
    event.preventDefault();
    const name = buttons[to].closest(".graph-node").dataset.step;
    onSelect(name);
    const again = list.querySelector(`.graph-node[data-step="${name}"] .graph-step`);
    if (again) again.focus();
  });
}

function isPlainObject(v) {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

function scalarText(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
  return String(v);
}

/** A value of the artifacts: a scalar as text, a list of scalars joined, an object as a nested key/value list (two
 * levels), anything deeper as pretty JSON. */
function valueNode(v, depth) {
  if (isPlainObject(v)) {
    if (!Object.keys(v).length) return el("span", { class: "muted", text: "(empty)" });
    if (depth < 2) return kvList(v, depth + 1);
    return el("pre", { class: "json", text: JSON.stringify(v, null, 2) });
  }
  if (Array.isArray(v)) {
    if (!v.length) return el("span", { class: "muted", text: "(none)" });
    if (v.every((x) => !isPlainObject(x) && !Array.isArray(x))) return el("span", { text: v.map(scalarText).join(", ") });
    return el("pre", { class: "json", text: JSON.stringify(v, null, 2) });
  }
  const text = scalarText(v);
  return el("span", { class: typeof v === "string" && text.length > 120 ? "long-text" : null, text });
}

function kvList(obj, depth) {
  return el("dl", { class: `kv artifact-kv depth-${depth}` }, Object.entries(obj).map(([k, v]) =>
    el("div", { class: "kv-row", "data-key": k }, el("dt", { text: k }), el("dd", {}, valueNode(v, depth)))));
}

/** A step's artifacts: a readable key/value view, and the same as JSON. */
export function artifactsView(artifacts) {
  if (!isPlainObject(artifacts) || !Object.keys(artifacts).length) {
    return [el("p", { class: "muted small-text", text: "No artifacts recorded." })];
  }
  return [
    kvList(artifacts, 0),
    el("details", { class: "artifacts-json" }, el("summary", { text: "As JSON" }),
      el("pre", { class: "json", text: JSON.stringify(artifacts, null, 2) })),
  ];
}

/** The line under a step's title: attempts, when it started and finished, how long it took. */
export function stepMeta(step) {
  const parts = [attemptsText(step.attempts)];
  if (step.started_at != null) parts.push(" · started ", timeEl(step.started_at * 1000));
  if (step.finished_at != null) parts.push(" · finished ", timeEl(step.finished_at * 1000));
  const secs = stepSeconds(step);
  if (secs != null) parts.push(` · ${step.finished_at != null ? "took" : "so far"} ${duration(secs)}`);
  return parts;
}

export function stepLabel(name) {
  return STEP_LABELS[name] || name;
}

/**
 * Draw `run` into the graph's <ol>: the first time (or another set of steps) as new elements; after that the boxes
 * already there are updated in place, so focus, a running step's animation and the selection stay put.
 */
export function renderGraph(list, run, opts) {
  const fresh = graphItems(run, opts);
  const old = [...list.children];
  const same = old.length === fresh.length && old.every((n, i) => n.dataset.step === fresh[i].dataset.step);
  if (!same) {
    list.replaceChildren(...fresh);
    return;
  }
  old.forEach((node, i) => {
    const next = fresh[i];
    node.className = next.className;
    node.dataset.state = next.dataset.state;
    const [button, nextButton] = [node.querySelector(".graph-step"), next.querySelector(".graph-step")];
    button.setAttribute("aria-pressed", nextButton.getAttribute("aria-pressed"));
    if (nextButton.title) button.title = nextButton.title;
    else button.removeAttribute("title");
    for (const part of ["graph-step-state", "graph-step-meta"]) {
      const [a, b] = [button.querySelector(`.${part}`), nextButton.querySelector(`.${part}`)];
      if (a.textContent !== b.textContent) a.textContent = b.textContent;
    }
    const [arrowNow, arrowNext] = [node.querySelector(".graph-arrow"), next.querySelector(".graph-arrow")];
    if (arrowNow && arrowNext) arrowNow.setAttribute("class", arrowNext.getAttribute("class"));
  });
}
