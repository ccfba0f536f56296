// DOM helpers shared by Keel's pages.

export const $ = (id) => document.getElementById(id);

/** An element: attributes (class, text, on<event> handlers; true = present, false/null/undefined = absent), then
 * children (nodes, or anything else as text; arrays are flattened, null/undefined/false left out). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, v);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function chip(text, cls = "") {
  return el("span", { class: `chip ${cls}`.trim(), text });
}

/** An alert element shows a message, or hides when there is none. */
export function showAlert(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

let toastTimer = null;
/** A short message in the page's #toast for four seconds. */
export function toast(message, kind = "ok") {
  const t = $("toast");
  t.textContent = message;
  t.className = `toast toast-${kind}`;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (t.hidden = true), 4000);
}

/** Replace a node's children, keeping keyboard focus on the element with the same data-focus-key. */
export function replaceKeepingFocus(parent, children) {
  const active = document.activeElement;
  const key = active && parent.contains(active) ? active.dataset.focusKey : null;
  parent.replaceChildren(...children);
  if (key) {
    const again = [...parent.querySelectorAll("[data-focus-key]")].find((n) => n.dataset.focusKey === key);
    if (again) again.focus({ preventScroll: true });
  }
}

export function ago(epochMs) {
  const s = Math.max(0, (Date.now() - epochMs) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} days ago`;
}

export function when(epochMs, { seconds = true, millis = false } = {}) {
  return new Date(epochMs).toLocaleString(undefined, {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
    ...(seconds ? { second: "2-digit" } : {}), ...(millis ? { fractionalSecondDigits: 3 } : {}),
  });
}

/** A <time> element: the local date and time, "… ago" as its tooltip. */
export function timeEl(epochMs, opts) {
  return el("time", { datetime: new Date(epochMs).toISOString(), title: ago(epochMs), text: when(epochMs, opts) });
}
