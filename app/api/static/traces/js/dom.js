// DOM and formatting helpers shared by the Traces page's modules (those of every page: common/dom.js).

import { el } from "../common/dom.js";

/** A duration in milliseconds, as people read it: 0.42 ms, 3.28 ms, 123 ms, 1.24 s, 2 min 3 s. */
export function ms(value) {
  if (value === null || value === undefined || Number.isNaN(Number(value))) return "—";
  const v = Number(value);
  if (v < 10) return `${v.toFixed(2)} ms`;
  if (v < 1000) return `${v.toFixed(v < 100 ? 1 : 0)} ms`;
  if (v < 60_000) return `${(v / 1000).toFixed(v < 10_000 ? 2 : 1)} s`;
  const s = Math.round(v / 1000);
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

export function count(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString();
}

/** Milliseconds since the epoch of a nanosecond timestamp (a string or a number). */
export function nsToMs(ns) {
  return Number(BigInt(ns) / 1_000_000n);
}

/** An attribute value as text: lists joined, objects as JSON. */
export function valueText(v) {
  if (v === null || v === undefined) return "—";
  if (Array.isArray(v)) return v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(", ");
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

/** A definition list of [label, value] pairs; a value may be a node; empty values are left out. */
export function kv(pairs, attrs = {}) {
  const rows = pairs.filter(([, v]) => v !== undefined && v !== null && v !== "");
  return el("dl", { class: "kv", ...attrs }, rows.map(([k, v]) => el("div", { class: "kv-row" },
    el("dt", { text: k }), el("dd", {}, v instanceof Node ? v : String(v)))));
}

/** A small data table: headers (strings, or [text, class]) and rows of cells (text or nodes). */
export function table(label, headers, rows, { empty = "Nothing.", cls = "" } = {}) {
  const head = el("tr", {}, headers.map((h) => {
    const [text, c] = Array.isArray(h) ? h : [h, null];
    return el("th", { scope: "col", class: c, text });
  }));
  const body = rows.length ? rows : [el("tr", {}, el("td", { colspan: String(headers.length), class: "muted",
    text: empty }))];
  return el("div", { class: "table-wrap" }, el("table", { class: `data-table ${cls}`.trim(), "aria-label": label },
    el("thead", {}, head), el("tbody", {}, body)));
}

export function short(id, n = 12) {
  if (!id) return "";
  return id.length > n + 1 ? `${id.slice(0, n)}…` : id;
}
