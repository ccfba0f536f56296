// "Waiting for approval": the runs whose agent proposed an action that waits for a person (GET /v1/agents/approvals,
// any workflow), each with its tool, arguments and reason, and Approve / Reject. The list is re-read every few
// seconds: an item already shown stays the same element (a reason being typed, focus and a decision under way stay),
// new ones are added and decided ones leave.

import { ago, chip, el, showAlert } from "../common/dom.js";
import { argsText } from "./run.js";

function slug(text) {
  return String(text).replace(/[^\w-]/g, "_");
}

/**
 * The list in `list` (a <ul>). `onDecide(item, action, reason)`: approve / reject one (returns a promise).
 * Returns { render(rows), item(runId), clear() }; an item is { node, row, busy(bool, text), error(message) }.
 */
export function approvalList(list, { onDecide }) {
  const items = new Map(); // run_id -> item

  function create(row) {
    const id = slug(row.run_id);
    const reasonId = `approval-reason-${id}`;
    const whyId = `approval-why-${id}`;
    const since = el("span", { class: "approval-since" });
    const reason = el("input", { id: reasonId, type: "text", maxlength: "2000", autocomplete: "off",
      placeholder: "Why — told to the agent on a reject", "data-focus-key": `reason-${row.run_id}` });
    const status = el("p", { class: "muted small-text approval-status", role: "status" });
    const error = el("div", { class: "alert error approval-error", role: "alert", hidden: true });
    const approve = el("button", { type: "button", class: "btn primary small", "aria-describedby": whyId,
      onclick: () => onDecide(item, "approve", reason.value.trim()) }, "Approve");
    const reject = el("button", { type: "button", class: "btn danger small", "aria-describedby": whyId,
      onclick: () => onDecide(item, "reject", reason.value.trim()) }, "Reject");
    const node = el("li", { class: "approval", "data-run-id": row.run_id, "data-tool": row.tool || "",
      "data-workflow": row.workflow || "" },
    el("div", { class: "approval-top" },
      el("span", { class: "tool-name mono", text: row.tool || "(no tool)" }),
      chip(row.workflow || "agent", "chip-muted workflow-chip")),
    el("p", { class: "approval-reason", id: whyId, text: row.reason || "No reason given." }),
    row.question ? el("p", { class: "approval-question muted small-text" }, "Asked: ",
      el("q", { text: row.question })) : null,
    el("pre", { class: "approval-args", "aria-label": "Arguments", text: JSON.stringify(row.args || {}, null, 2) }),
    el("p", { class: "muted small-text approval-meta" }, el("span", { class: "mono", text: row.run_id }), " · ",
      since),
    el("label", { for: reasonId }, "Reason (optional)"), reason,
    el("div", { class: "row gap approval-buttons" }, approve, reject),
    status, error);
    const item = {
      node, row,
      busy(on, text = "") {
        approve.disabled = on;
        reject.disabled = on;
        reason.disabled = on;
        status.textContent = text;
        if (on) showAlert(error, "");
      },
      error(message) {
        showAlert(error, message);
      },
      update(fresh) {
        item.row = fresh;
        const at = Number(fresh.since) * 1000;
        since.textContent = Number.isFinite(at) && at > 0 ? `waiting since ${ago(at)}` : "";
        if (Number.isFinite(at) && at > 0) since.title = new Date(at).toLocaleString();
      },
    };
    item.update(row);
    approve.title = `Approve ${row.tool || "the call"}: ${argsText(row.args)}`;
    return item;
  }

  /** Show `rows` (the API's order): known items stay as they are, new ones come in, gone ones leave. */
  function render(rows) {
    const seen = new Set();
    const wanted = rows.map((row) => {
      seen.add(row.run_id);
      let item = items.get(row.run_id);
      if (item) item.update(row);
      else {
        item = create(row);
        items.set(row.run_id, item);
      }
      return item.node;
    });
    for (const [runId, item] of items) {
      if (!seen.has(runId)) {
        item.node.remove();
        items.delete(runId);
      }
    }
    // reorder only when the order changed (moving an element takes the focus away from it)
    const current = [...list.children];
    if (current.length !== wanted.length || current.some((node, i) => node !== wanted[i])) {
      const active = document.activeElement;
      list.append(...wanted);
      if (active && list.contains(active)) active.focus({ preventScroll: true });
    }
  }

  function remove(runId) {
    const item = items.get(runId);
    if (item) {
      item.node.remove();
      items.delete(runId);
    }
  }

  function clear() {
    items.clear();
    list.replaceChildren();
  }

  return { render, item: (runId) => items.get(runId), remove, clear, size: () => items.size };
}
