// A small code editor: a real <textarea> (accessible, native undo, form-fillable) laid exactly
// over a <pre> that shows the same text with Jinja2 syntax highlighting.

const KEYWORDS = new Set([
  "if", "elif", "else", "endif", "for", "endfor", "in", "not", "and", "or", "is", "include", "import",
  "from", "as", "with", "without", "context", "endwith", "set", "endset", "macro", "endmacro", "call",
  "endcall", "filter", "endfilter", "raw", "endraw", "block", "endblock", "extends", "recursive",
  "ignore", "missing", "true", "false", "none", "True", "False", "None", "loop",
]);

export function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function span(cls, text) {
  return `<span class="${cls}">${escapeHtml(text)}</span>`;
}

// Tokens inside {{ }} or {% %}.
const INNER = /("(?:[^"\\]|\\.)*"?|'(?:[^'\\]|\\.)*'?)|(\d+(?:\.\d+)?)|(\|\s*[A-Za-z_]\w*)|([A-Za-z_]\w*)|(\s+)|([^\w\s"'|]+|\|)/g;

function highlightInner(code) {
  let out = "";
  for (const m of code.matchAll(INNER)) {
    const [text, str, num, filter, ident, ws] = m;
    if (str) out += span("tok-string", text);
    else if (num) out += span("tok-number", text);
    else if (filter) out += span("tok-op", "|") + span("tok-filter", filter.slice(1));
    else if (ident) out += span(KEYWORDS.has(ident) ? "tok-keyword" : "tok-var", text);
    else if (ws) out += escapeHtml(text);
    else out += span("tok-op", text);
  }
  return out;
}

const BLOCKS = /(\{#[\s\S]*?(?:#\}|$))|(\{%-?)([\s\S]*?)(-?%\}|$)|(\{\{-?)([\s\S]*?)(-?\}\}|$)/g;

export function highlightJinja(text) {
  let out = "";
  let last = 0;
  for (const m of text.matchAll(BLOCKS)) {
    out += escapeHtml(text.slice(last, m.index));
    if (m[1] !== undefined) {
      out += span("tok-comment", m[1]);
    } else if (m[2] !== undefined) {
      out += `<span class="tok-block">${span("tok-delim", m[2])}${highlightInner(m[3])}${span("tok-delim", m[4])}</span>`;
    } else {
      out += `<span class="tok-expr">${span("tok-delim", m[5])}${highlightInner(m[6])}${span("tok-delim", m[7])}</span>`;
    }
    last = m.index + m[0].length;
  }
  out += escapeHtml(text.slice(last));
  // A trailing newline needs a character after it, or the <pre> is one line shorter than the textarea.
  return out + "\u200b";
}

/** Names a template uses that look like input variables (a helper for "declare used variables"). */
export function usedVariables(text) {
  const names = new Set();
  const local = new Set();
  for (const m of text.matchAll(/\{%-?\s*(?:for\s+([\w\s,]+?)\s+in\b|set\s+(\w+)|macro\s+\w+\s*\(([^)]*)\))/g)) {
    for (const part of (m[1] || m[2] || m[3] || "").split(",")) {
      const n = part.split("=")[0].trim();
      if (n) local.add(n);
    }
  }
  for (const m of text.matchAll(/\{\{-?([\s\S]*?)-?\}\}|\{%-?([\s\S]*?)-?%\}/g)) {
    let code = (m[1] ?? m[2] ?? "")
      .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'/g, " ")
      .replace(/\|\s*[A-Za-z_]\w*/g, " ")
      .replace(/\bis\s+(?:not\s+)?[A-Za-z_]\w*/g, " ");
    if (m[2] !== undefined) code = code.replace(/^\s*(?:for\s+[\w\s,]+?\s+in\b|set\s+\w+\s*=|macro\s+\w+\s*\([^)]*\)|include\b|import\b)/, " ");
    for (const id of code.matchAll(/(?<![\w.])([A-Za-z_]\w*)(?!\s*=(?!=))/g)) {
      const n = id[1];
      if (!KEYWORDS.has(n) && !local.has(n) && !["range", "lipsum", "dict", "cycler", "joiner", "namespace", "endfor", "endif", "else", "elif"].includes(n)) {
        names.add(n);
      }
    }
  }
  return [...names];
}

/**
 * Create an editor. Returns { element, textarea, get value(), set value(v), focus() }.
 * `onInput(value)` is called on every edit.
 */
export function createEditor({ id, label, value = "", placeholder = "", onInput = () => {} }) {
  const wrap = document.createElement("div");
  wrap.className = "code-editor";
  const pre = document.createElement("pre");
  pre.className = "code-highlight";
  pre.setAttribute("aria-hidden", "true");
  const textarea = document.createElement("textarea");
  textarea.className = "code-input";
  textarea.id = id;
  textarea.spellcheck = false;
  textarea.autocapitalize = "off";
  textarea.setAttribute("autocomplete", "off");
  textarea.setAttribute("aria-label", label);
  textarea.placeholder = placeholder;
  textarea.value = value;
  const render = () => {
    pre.innerHTML = highlightJinja(textarea.value);
  };
  textarea.addEventListener("input", () => {
    render();
    onInput(textarea.value);
  });
  textarea.addEventListener("keydown", (event) => {
    // Tab inserts two spaces; Escape then Tab still leaves the field (keyboard users are not trapped).
    if (event.key === "Tab" && !event.shiftKey && !textarea.dataset.escaped) {
      event.preventDefault();
      document.execCommand("insertText", false, "  ");
    } else if (event.key === "Escape") {
      textarea.dataset.escaped = "1";
    } else {
      delete textarea.dataset.escaped;
    }
  });
  textarea.addEventListener("blur", () => delete textarea.dataset.escaped);
  wrap.append(pre, textarea);
  render();
  return {
    element: wrap,
    textarea,
    get value() {
      return textarea.value;
    },
    set value(v) {
      textarea.value = v;
      render();
    },
    focus() {
      textarea.focus();
    },
  };
}
