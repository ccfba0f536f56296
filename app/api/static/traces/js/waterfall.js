// A trace as a waterfall: one row per span, indented under its parent, a bar placed and sized by the span's
// start and duration within the whole trace. Spans come from GET /v1/traces/{id} with their nanosecond
// timestamps as strings (api.js), so offsets are computed exactly with BigInt.

import { chip, el } from "../common/dom.js";
import { ms } from "./dom.js";

const KIND_LABEL = { SERVER: "server", CLIENT: "client", INTERNAL: "internal", PRODUCER: "producer",
  CONSUMER: "consumer" };

/**
 * The spans as a tree, flattened depth-first in start order: [{span, depth, parent, children, offsetNs, durNs}],
 * plus the trace's start and length (ns). A span whose parent is not in the trace (a caller's span, another
 * service's) is a root.
 */
export function layout(spans) {
  const nodes = new Map();
  for (const s of spans) nodes.set(s.span_id, { span: s, children: [], parent: null, depth: 0 });
  const roots = [];
  for (const node of nodes.values()) {
    const parent = node.span.parent_id ? nodes.get(node.span.parent_id) : null;
    if (parent && parent !== node) {
      node.parent = parent;
      parent.children.push(node);
    } else {
      roots.push(node);
    }
  }
  const byStart = (a, b) => {
    const d = BigInt(a.span.start_ns) - BigInt(b.span.start_ns);
    return d < 0n ? -1 : d > 0n ? 1 : a.span.name.localeCompare(b.span.name);
  };
  let t0 = null;
  let t1 = null;
  for (const s of spans) {
    const start = BigInt(s.start_ns);
    const end = BigInt(s.end_ns);
    if (t0 === null || start < t0) t0 = start;
    if (t1 === null || end > t1) t1 = end;
  }
  const rows = [];
  const seen = new Set();
  const walk = (node, depth) => {
    if (seen.has(node)) return; // a malformed parent cycle: each span once
    seen.add(node);
    node.depth = depth;
    node.offsetNs = Number(BigInt(node.span.start_ns) - t0);
    node.durNs = Math.max(0, Number(BigInt(node.span.end_ns) - BigInt(node.span.start_ns)));
    rows.push(node);
    node.children.sort(byStart);
    for (const child of node.children) walk(child, depth + 1);
  };
  roots.sort(byStart);
  for (const root of roots) walk(root, 0);
  // spans caught in a cycle (no root reaches them) still get a row
  for (const node of nodes.values()) if (!seen.has(node)) walk(node, 0);
  const totalNs = t0 === null ? 1 : Math.max(1, Number(t1 - t0));
  return { rows, totalNs, startNs: t0 === null ? null : t0.toString() };
}

/** Left and width of a span's bar, in percent of the trace (a zero-length span still shows as a sliver). */
export function barGeometry(node, totalNs) {
  const left = Math.min(100, (node.offsetNs / totalNs) * 100);
  const width = Math.max(0.35, Math.min(100 - left, (node.durNs / totalNs) * 100));
  return { left: Math.min(left, 100 - width), width };
}

function isError(span) {
  return span.status === "ERROR";
}

function hidden(node, collapsed) {
  for (let p = node.parent; p; p = p.parent) if (collapsed.has(p.span.span_id)) return true;
  return false;
}

/** The time axis over the timeline column: 0, a quarter, ..., the whole trace. */
export function axis(totalNs) {
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
    const t = el("span", { class: "tick", text: f === 0 ? "0" : ms((totalNs * f) / 1e6) });
    t.style.left = `${f * 100}%`;
    return t;
  });
  return el("div", { class: "axis", "aria-hidden": "true" }, ticks);
}

/**
 * Rows of the waterfall table. `selected`: the selected span id; `collapsed`: span ids whose children are
 * hidden; `onSelect(spanId)`, `onToggle(spanId)`.
 */
export function renderRows(model, { selected, collapsed, onSelect, onToggle }) {
  const { rows, totalNs } = model;
  return rows.filter((n) => !hidden(n, collapsed)).map((node) => {
    const s = node.span;
    const id = s.span_id;
    const error = isError(s);
    const open = !collapsed.has(id);
    const { left, width } = barGeometry(node, totalNs);
    const offset = ms(node.offsetNs / 1e6);
    const toggle = node.children.length
      ? el("button", {
        type: "button", class: "tree-toggle", "aria-expanded": open ? "true" : "false",
        "aria-label": `${open ? "Collapse" : "Expand"} ${s.name} (${node.children.length} child span${node.children.length === 1 ? "" : "s"})`,
        tabindex: "-1", onclick: () => onToggle(id),
      }, el("span", { "aria-hidden": "true", text: open ? "▾" : "▸" }))
      : el("span", { class: "tree-leaf", "aria-hidden": "true" });
    const name = el("button", {
      type: "button", class: "span-btn", "data-span-id": id, "data-focus-key": id,
      "aria-current": id === selected ? "true" : null,
      onclick: () => onSelect(id),
    },
    el("span", { class: "span-name", text: s.name }),
    el("span", { class: "sr-only" },
      node.parent ? `, in ${node.parent.span.name}` : ", root span",
      `, starts at +${offset}, lasts ${ms(node.durNs / 1e6)}${error ? ", error" : ""}`));
    const inner = el("div", { class: "span-cell-inner" }, toggle, name);
    inner.style.paddingLeft = `${node.depth * 16}px`;
    const cell = el("th", { scope: "row", class: "span-cell" }, inner);
    const bar = el("span", { class: `bar bar-${(s.kind || "internal").toLowerCase()}${error ? " bar-error" : ""}`,
      title: `${s.name}: +${offset}, ${ms(node.durNs / 1e6)}` });
    bar.style.left = `${left}%`;
    bar.style.width = `${width}%`;
    const label = el("span", { class: "bar-label", text: ms(node.durNs / 1e6) });
    // the duration sits right of the bar; near the right edge, inside a wide bar's end or left of a narrow one
    if (left + width > 82 && width > 14) {
      label.classList.add("inside");
      label.style.right = `${100 - left - width}%`;
    } else if (left + width > 82) {
      label.style.right = `calc(${100 - left}% + 4px)`;
    } else {
      label.style.left = `calc(${left + width}% + 4px)`;
    }
    return el("tr", {
      class: `span-row${error ? " is-error" : ""}${id === selected ? " is-selected" : ""}`,
      "data-span-id": id, "data-name": s.name, "data-depth": String(node.depth),
      "data-parent-id": node.parent ? node.parent.span.span_id : null,
    },
    cell,
    el("td", { class: "kind" }, chip(KIND_LABEL[s.kind] || (s.kind || "").toLowerCase(), `kind-chip kind-${(s.kind || "").toLowerCase()}`)),
    el("td", { class: "status" }, error
      ? chip("error", "status-error")
      : s.status === "OK" ? chip("ok", "status-ok") : el("span", { class: "muted", text: "—", title: "status unset" })),
    el("td", { class: "num offset", text: `+${offset}` }),
    el("td", { class: "num duration", text: ms(node.durNs / 1e6) }),
    el("td", { class: "timeline", "aria-hidden": "true" }, el("div", { class: "track" }, bar, label)));
  });
}

/** Arrow keys over the span buttons: up/down, Home/End, left (collapse or go to the parent), right (expand or go
 * to the first child). Selection follows focus. */
export function onKeys(event, { model, collapsed, onSelect, onToggle }) {
  const btn = event.target.closest && event.target.closest(".span-btn");
  if (!btn) return;
  const buttons = [...btn.closest("tbody").querySelectorAll(".span-btn")];
  const i = buttons.indexOf(btn);
  const id = btn.dataset.spanId;
  const node = model.rows.find((n) => n.span.span_id === id);
  let target = null;
  switch (event.key) {
    case "ArrowDown": target = buttons[i + 1]; break;
    case "ArrowUp": target = buttons[i - 1]; break;
    case "Home": target = buttons[0]; break;
    case "End": target = buttons[buttons.length - 1]; break;
    case "ArrowRight":
      if (node && node.children.length && collapsed.has(id)) {
        event.preventDefault();
        onToggle(id);
        return;
      }
      target = node && node.children.length ? buttons[i + 1] : null;
      break;
    case "ArrowLeft":
      if (node && node.children.length && !collapsed.has(id)) {
        event.preventDefault();
        onToggle(id);
        return;
      }
      target = node && node.parent ? buttons.find((b) => b.dataset.spanId === node.parent.span.span_id) : null;
      break;
    default:
      return;
  }
  event.preventDefault();
  if (target) {
    onSelect(target.dataset.spanId);
  }
}
