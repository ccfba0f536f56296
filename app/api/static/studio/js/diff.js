// Render a unified diff (from the /diff endpoint) as a two-column, side-by-side table.

function cell(tag, cls, text) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Parse a unified diff into rows: {kind: "hunk"|"context"|"change", left, right}. */
export function sideBySide(diffText) {
  const rows = [];
  let fromFile = "";
  let toFile = "";
  let ln = 0;
  let rn = 0;
  let removed = [];
  let added = [];
  const flush = () => {
    const n = Math.max(removed.length, added.length);
    for (let i = 0; i < n; i++) {
      rows.push({
        kind: "change",
        left: removed[i] ?? null,
        right: added[i] ?? null,
      });
    }
    removed = [];
    added = [];
  };
  for (const line of diffText.split("\n")) {
    if (line.startsWith("--- ") && !fromFile) {
      fromFile = line.slice(4).trim();
    } else if (line.startsWith("+++ ") && !toFile) {
      toFile = line.slice(4).trim();
    } else if (line.startsWith("@@")) {
      flush();
      const m = /^@@ -(\d+)(?:,\d+)? \+(\d+)(?:,\d+)? @@(.*)$/.exec(line);
      if (m) {
        ln = Number(m[1]);
        rn = Number(m[2]);
      }
      rows.push({ kind: "hunk", text: line });
    } else if (line.startsWith("-")) {
      removed.push({ n: ln++, text: line.slice(1) });
    } else if (line.startsWith("+")) {
      added.push({ n: rn++, text: line.slice(1) });
    } else if (line.startsWith(" ") || line === "") {
      if (line === "" && !rows.length && !removed.length && !added.length) continue;
      flush();
      const text = line.slice(1);
      rows.push({ kind: "context", left: { n: ln++, text }, right: { n: rn++, text } });
    } else if (line.startsWith("\\")) {
      // "\ No newline at end of file"
    }
  }
  flush();
  return { fromFile, toFile, rows };
}

export function renderDiff(container, diffText, fromRef, toRef) {
  container.replaceChildren();
  if (!diffText) {
    container.append(cell("p", "muted diff-same", `${fromRef} and ${toRef} are identical.`));
    return;
  }
  const { rows } = sideBySide(diffText);
  const table = cell("table", "diff-table");
  table.setAttribute("aria-label", `Differences between ${fromRef} and ${toRef}`);
  const colgroup = document.createElement("colgroup");
  for (const cls of ["ln", "code", "ln", "code"]) {
    const col = document.createElement("col");
    col.className = `col-${cls}`;
    colgroup.append(col);
  }
  table.append(colgroup);
  const thead = cell("thead");
  const hr = cell("tr");
  const th1 = cell("th", "", fromRef);
  th1.colSpan = 2;
  th1.scope = "col";
  const th2 = cell("th", "", toRef);
  th2.colSpan = 2;
  th2.scope = "col";
  hr.append(th1, th2);
  thead.append(hr);
  table.append(thead);
  const tbody = cell("tbody");
  for (const row of rows) {
    const tr = cell("tr");
    if (row.kind === "hunk") {
      tr.className = "diff-hunk";
      const td = cell("td", "", row.text);
      td.colSpan = 4;
      tr.append(td);
    } else {
      const sides = [
        [row.left, row.kind === "change" ? "diff-del" : "diff-ctx", "−"],
        [row.right, row.kind === "change" ? "diff-add" : "diff-ctx", "+"],
      ];
      for (const [side, cls, sign] of sides) {
        if (side) {
          tr.append(cell("td", `diff-ln ${cls}`, String(side.n)));
          const code = cell("td", `diff-code ${cls}`);
          if (cls !== "diff-ctx") {
            const mark = cell("span", "diff-sign", sign);
            mark.setAttribute("aria-label", cls === "diff-del" ? "removed" : "added");
            code.append(mark);
          }
          code.append(document.createTextNode(side.text));
          tr.append(code);
        } else {
          tr.append(cell("td", "diff-ln diff-empty"), cell("td", "diff-code diff-empty"));
        }
      }
    }
    tbody.append(tr);
  }
  table.append(tbody);
  container.append(table);
}
