// Prompt Studio: list, edit, preview, run, diff, label and audit prompt templates through the
// public Keel API. No framework and no build step: plain DOM and ES modules.

import { $, chip, el, showAlert, toast } from "../common/dom.js";
import { errorText as commonErrorText, keyLogin } from "../common/page.js";
import { models, prompts, session, streamChat } from "./api.js";
import { renderDiff } from "./diff.js";
import { createEditor, usedVariables } from "./editor.js";

const VAR_TYPES = ["string", "integer", "number", "boolean", "list", "object"];
const ROLES = ["system", "user", "assistant"];
const PREVIEW_DELAY_MS = 300;

const state = {
  templates: [],
  name: null, // open template
  versions: [], // newest first (VersionSummaryOut)
  labels: {},
  base: null, // the version a save is based on (optimistic concurrency)
  loaded: null, // the version whose content is in the editor
  dirty: false,
  editors: [], // message editors, in order
  varValues: {}, // preview / run variable values, raw strings (or booleans) by name
  lastPreview: null, // RenderOut of the current draft, when it rendered
  previewTimer: null,
  previewSeq: 0,
  previewAbort: null,
  runAbort: null,
  searchTimer: null,
};

// ----------------------------------------------------------------------------------- helpers

function labelClass(label) {
  if (label === "production") return "chip-prod";
  if (label === "staging") return "chip-staging";
  return "chip-label";
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return d.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function shortHash(hash) {
  return hash ? hash.replace(/^sha256:/, "").slice(0, 12) : "";
}

function errorText(exc) {
  return commonErrorText(exc, { codes: false, forbidden: "." });
}

// ------------------------------------------------------------------------------------ session

const { handleAuth, start } = keyLogin({
  session,
  probe: () => prompts.list(),
  onConnect: async () => {
    await refreshList();
    loadModels();
  },
  onLogout: () => {
    state.name = null;
  },
  errorText,
  confirmLogout: () => confirmDiscard(),
});

async function loadModels() {
  try {
    const list = await models();
    const opts = (list.data || []).map((m) => m.id);
    $("model-options").replaceChildren(...opts.map((id) => el("option", { value: id })));
    const select = $("run-model");
    select.replaceChildren(el("option", { value: "", text: "template default" }), ...opts.map((id) => el("option", { value: id, text: id })));
  } catch {
    // A key without the chat scope cannot list models; the fields stay free text / default.
  }
}

// ------------------------------------------------------------------------------ template list

async function refreshList() {
  const q = $("search").value.trim();
  $("list-status").textContent = "Loading…";
  try {
    const list = await prompts.list(q || undefined);
    state.templates = list.data;
    renderList();
    $("list-status").textContent = list.data.length
      ? `${list.data.length} template${list.data.length === 1 ? "" : "s"}${q ? ` matching “${q}”` : ""}`
      : q ? `No template matches “${q}”.` : "No templates yet.";
  } catch (exc) {
    if (!handleAuth(exc)) $("list-status").textContent = errorText(exc);
  }
}

function renderList() {
  const ul = $("template-list");
  ul.replaceChildren(
    ...state.templates.map((t) => {
      const labels = Object.entries(t.labels || {}).map(([l, v]) => chip(`${l} → v${v}`, labelClass(l)));
      const button = el(
        "button",
        {
          type: "button",
          class: "template-item",
          "aria-current": t.name === state.name ? "true" : null,
          "aria-label": `Open template ${t.name}`,
          onclick: () => openTemplate(t.name),
        },
        el("span", { class: "template-name", text: t.name }),
        el("span", { class: "template-version", text: `v${t.latest_version}` }),
        t.description ? el("span", { class: "template-desc", text: t.description }) : null,
        labels.length ? el("span", { class: "chips" }, labels) : null,
      );
      return el("li", {}, button);
    }),
  );
}

// ---------------------------------------------------------------------------- open / load

function confirmDiscard() {
  return !state.dirty || window.confirm("Discard your unsaved changes?");
}

async function openTemplate(name, version = "latest", { reload = false } = {}) {
  if (name === state.name && !reload) return; // already open: keep the draft
  if (!confirmDiscard()) return;
  try {
    const [versions, full] = await Promise.all([prompts.versions(name), prompts.version(name, version)]);
    if (name !== state.name) state.varValues = {};
    state.name = name;
    state.versions = versions.data;
    state.labels = await prompts.labels(name);
    state.base = state.versions[0].version;
    loadContent(full);
    $("empty").hidden = true;
    $("template-view").hidden = false;
    $("template-title").textContent = name;
    renderMeta();
    renderList();
    resetRun();
    $("diff-output").replaceChildren();
    $("diff-changed").replaceChildren();
    $("label-result").replaceChildren();
    showAlert($("diff-error"), "");
    if (currentTab() === "history") loadHistory();
  } catch (exc) {
    if (!handleAuth(exc)) toast(errorText(exc), "error");
  }
}

function loadContent(version) {
  const c = version.content;
  state.loaded = version.version;
  $("description").value = c.description || "";
  $("messages").replaceChildren();
  state.editors = [];
  for (const m of c.messages) addMessage(m.role, m.content, false);
  const p = c.params || {};
  $("param-model").value = p.model ?? "";
  $("param-temperature").value = p.temperature ?? "";
  $("param-max-tokens").value = p.max_tokens ?? "";
  $("param-stop").value = (p.stop || []).join("\n");
  $("param-schema").value = p.response_schema ? JSON.stringify(p.response_schema, null, 2) : "";
  $("variables").replaceChildren();
  for (const v of c.variables || []) addVariable(v, false);
  renderVarForm();
  setDirty(false);
  $("open-version").value = String(version.version);
  $("save-status").replaceChildren();
  schedulePreview(0);
}

/** Refresh version pickers and label chips; `resetPickers` puts the pickers back to their defaults. */
function renderMeta(resetPickers = true) {
  const latest = state.versions[0];
  $("template-labels").replaceChildren(
    chip(`latest v${latest.version}`, "chip-muted"),
    ...Object.entries(state.labels).map(([l, v]) => chip(`${l} → v${v}`, labelClass(l))),
  );
  const option = (v) => {
    const tags = [v.version === latest.version ? "latest" : null, ...(v.labels || [])].filter(Boolean);
    return el("option", { value: String(v.version), text: `v${v.version}${tags.length ? ` (${tags.join(", ")})` : ""}${v.message ? ` — ${v.message}` : ""}` });
  };
  for (const id of ["open-version", "run-ref", "diff-from", "diff-to", "label-version"]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(...state.versions.map(option));
    if (keep && state.versions.some((v) => String(v.version) === keep)) select.value = keep;
  }
  $("open-version").value = String(state.loaded);
  if (resetPickers) {
    $("run-ref").value = String(latest.version);
    $("label-version").value = String(latest.version);
    $("diff-to").value = String(latest.version);
    $("diff-from").value = String(state.versions[1] ? state.versions[1].version : latest.version);
  }
  updateBaseInfo();
}

function updateBaseInfo() {
  const latest = state.versions[0].version;
  $("base-info").textContent =
    state.loaded === latest ? `editing v${state.loaded}` : `editing a copy of v${state.loaded} (saves after v${state.base})`;
}

function setDirty(dirty) {
  state.dirty = dirty;
  $("dirty").hidden = !dirty;
}

// ------------------------------------------------------------------------------- messages

function addMessage(role = "user", content = "", markDirty = true) {
  const li = el("li", { class: "message" });
  const roleSelect = el("select", { class: "role-select" }, ROLES.map((r) => el("option", { value: r, text: r })));
  roleSelect.value = role;
  roleSelect.addEventListener("change", () => {
    li.dataset.role = roleSelect.value;
    edited();
  });
  li.dataset.role = role;
  const editor = createEditor({ id: `msg-${crypto.randomUUID()}`, label: "", value: content, placeholder: "Message text (Jinja2)", onInput: edited });
  const up = el("button", { type: "button", class: "icon-btn", title: "Move up", onclick: () => moveMessage(li, -1) }, "↑");
  const down = el("button", { type: "button", class: "icon-btn", title: "Move down", onclick: () => moveMessage(li, 1) }, "↓");
  const remove = el("button", { type: "button", class: "icon-btn danger", title: "Remove message", onclick: () => removeMessage(li) }, "✕");
  li.append(el("div", { class: "message-head" }, roleSelect, el("span", { class: "spacer" }), up, down, remove), editor.element);
  li._editor = editor;
  li._parts = { roleSelect, up, down, remove };
  $("messages").append(li);
  relabelMessages();
  if (markDirty) {
    edited();
    editor.focus();
  }
}

function relabelMessages() {
  const items = [...$("messages").children];
  state.editors = items.map((li) => li._editor);
  items.forEach((li, i) => {
    const n = i + 1;
    li._parts.roleSelect.setAttribute("aria-label", `Message ${n} role`);
    li._editor.textarea.setAttribute("aria-label", `Message ${n} content`);
    li._parts.up.setAttribute("aria-label", `Move message ${n} up`);
    li._parts.down.setAttribute("aria-label", `Move message ${n} down`);
    li._parts.remove.setAttribute("aria-label", `Remove message ${n}`);
    li._parts.up.disabled = i === 0;
    li._parts.down.disabled = i === items.length - 1;
    li._parts.remove.disabled = items.length === 1;
  });
}

function moveMessage(li, delta) {
  const list = $("messages");
  if (delta < 0 && li.previousElementSibling) list.insertBefore(li, li.previousElementSibling);
  if (delta > 0 && li.nextElementSibling) list.insertBefore(li.nextElementSibling, li);
  relabelMessages();
  edited();
}

function removeMessage(li) {
  li.remove();
  relabelMessages();
  edited();
}

// ------------------------------------------------------------------------------ variables

function addVariable(spec = {}, markDirty = true) {
  const tr = el("tr");
  const name = el("input", { class: "var-name", value: spec.name || "", autocomplete: "off", spellcheck: "false", placeholder: "name" });
  const type = el("select", { class: "var-type" }, VAR_TYPES.map((t) => el("option", { value: t, text: t })));
  type.value = spec.type || "string";
  const required = el("input", { type: "checkbox", class: "var-required" });
  required.checked = spec.required ?? true;
  const def = el("input", {
    class: "var-default",
    autocomplete: "off",
    placeholder: "—",
    value: spec.default === undefined || spec.default === null ? "" : typeof spec.default === "string" ? spec.default : JSON.stringify(spec.default),
  });
  const desc = el("input", { class: "var-desc", value: spec.description || "", autocomplete: "off", placeholder: "what it is" });
  const remove = el("button", { type: "button", class: "icon-btn danger", title: "Remove variable" }, "✕");
  remove.addEventListener("click", () => {
    tr.remove();
    relabelVariables();
    renderVarForm();
    edited();
  });
  for (const input of [name, def, desc]) input.addEventListener("input", onVarChange);
  for (const input of [type, required]) input.addEventListener("change", onVarChange);
  tr._parts = { name, type, required, def, desc, remove };
  tr.append(el("td", {}, name), el("td", {}, type), el("td", { class: "center" }, required), el("td", {}, def), el("td", {}, desc), el("td", {}, remove));
  $("variables").append(tr);
  relabelVariables();
  if (markDirty) {
    renderVarForm();
    edited();
    name.focus();
  }
}

function onVarChange() {
  renderVarForm();
  edited();
}

function relabelVariables() {
  [...$("variables").children].forEach((tr, i) => {
    const n = i + 1;
    const p = tr._parts;
    p.name.setAttribute("aria-label", `Variable ${n} name`);
    p.type.setAttribute("aria-label", `Variable ${n} type`);
    p.required.setAttribute("aria-label", `Variable ${n} required`);
    p.def.setAttribute("aria-label", `Variable ${n} default`);
    p.desc.setAttribute("aria-label", `Variable ${n} description`);
    p.remove.setAttribute("aria-label", `Remove variable ${n}`);
  });
}

function readVariables(errors) {
  const out = [];
  [...$("variables").children].forEach((tr, i) => {
    const p = tr._parts;
    const name = p.name.value.trim();
    if (!name) {
      if (p.def.value || p.desc.value) errors.push(`variable ${i + 1} has no name`);
      return;
    }
    const spec = { name, type: p.type.value, required: p.required.checked, description: p.desc.value };
    const raw = p.def.value;
    if (raw.trim() !== "") {
      const parsed = parseTyped(p.type.value, raw);
      if (parsed.error) errors.push(`default of ${name}: ${parsed.error}`);
      else spec.default = parsed.value;
    }
    out.push(spec);
  });
  return out;
}

function parseTyped(type, raw) {
  const text = typeof raw === "string" ? raw.trim() : raw;
  switch (type) {
    case "string":
      return { value: raw };
    case "integer":
      return /^[-+]?\d+$/.test(text) ? { value: Number(text) } : { error: `“${text}” is not an integer` };
    case "number":
      return text !== "" && Number.isFinite(Number(text)) ? { value: Number(text) } : { error: `“${text}” is not a number` };
    case "boolean":
      if (text === true || text === "true") return { value: true };
      if (text === false || text === "false") return { value: false };
      return { error: "use true or false" };
    default:
      try {
        const value = JSON.parse(text);
        const ok = type === "list" ? Array.isArray(value) : value !== null && typeof value === "object" && !Array.isArray(value);
        return ok ? { value } : { error: `expected a JSON ${type === "list" ? "array" : "object"}` };
      } catch {
        return { error: `not valid JSON (a ${type === "list" ? "JSON array" : "JSON object"} is expected)` };
      }
  }
}

function renderVarForm() {
  const container = $("preview-vars");
  const errors = [];
  const specs = readVariables(errors);
  container.replaceChildren();
  if (!specs.length) {
    container.append(el("p", { class: "muted small-text", text: "This template declares no variables." }));
  }
  for (const spec of specs) {
    const id = `value-${spec.name}`;
    const label = el("label", { for: id }, `Value of ${spec.name}`, spec.required && spec.default === undefined ? el("span", { class: "req", text: " *", "aria-hidden": "true" }) : null);
    let input;
    const current = state.varValues[spec.name];
    if (spec.type === "boolean") {
      input = el("select", { id }, el("option", { value: "", text: "(unset)" }), el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
      input.value = current === undefined ? "" : String(current);
    } else {
      const multiline = spec.type === "string" || spec.type === "list" || spec.type === "object";
      input = multiline ? el("textarea", { id, rows: "1", class: "autogrow" }) : el("input", { id, type: "number", step: spec.type === "integer" ? "1" : "any" });
      input.value = current ?? "";
      const hint = spec.default !== undefined ? `default: ${typeof spec.default === "string" ? spec.default : JSON.stringify(spec.default)}` : spec.type === "list" ? '["a", "b"]' : spec.type === "object" ? '{"key": "value"}' : spec.type;
      input.placeholder = hint;
    }
    if (spec.required && spec.default === undefined) input.setAttribute("aria-required", "true");
    if (spec.description) input.title = spec.description;
    const onChange = () => {
      state.varValues[spec.name] = input.value;
      autogrow(input);
      schedulePreview();
      renderRunVars();
    };
    input.addEventListener("input", onChange);
    input.addEventListener("change", onChange);
    container.append(el("div", { class: "var-value" }, label, el("span", { class: "type-tag", text: spec.type }), input));
    autogrow(input);
  }
  renderRunVars();
}

function autogrow(node) {
  if (node.tagName !== "TEXTAREA") return;
  node.style.height = "auto";
  node.style.height = `${Math.min(node.scrollHeight + 2, 200)}px`;
}

/** Values for render/run: typed per the schema; empty fields are left out (defaults apply). */
function variableValues(errors = []) {
  const specs = readVariables([]);
  const values = {};
  for (const spec of specs) {
    const raw = state.varValues[spec.name];
    if (raw === undefined || raw === "") continue;
    const parsed = parseTyped(spec.type, raw);
    if (parsed.error) errors.push(`value of ${spec.name}: ${parsed.error}`);
    else values[spec.name] = parsed.value;
  }
  return values;
}

function renderRunVars() {
  const errors = [];
  const values = variableValues(errors);
  $("run-vars").textContent = errors.length ? errors.join("; ") : JSON.stringify(values);
}

function declareUsedVariables() {
  const errors = [];
  const declared = new Set(readVariables(errors).map((v) => v.name));
  const used = new Set();
  for (const editor of state.editors) for (const n of usedVariables(editor.value)) used.add(n);
  const missing = [...used].filter((n) => !declared.has(n));
  if (!missing.length) {
    toast("Every variable the messages use is declared.");
    return;
  }
  for (const name of missing) addVariable({ name, type: "string", required: true }, false);
  renderVarForm();
  edited();
  toast(`Declared ${missing.join(", ")}`);
}

// ---------------------------------------------------------------------------------- draft

/** The editor's content as a TemplateContent body, plus any problems found before sending. */
function collectDraft() {
  const errors = [];
  const messages = [...$("messages").children].map((li) => ({ role: li._parts.roleSelect.value, content: li._editor.value }));
  const params = {};
  const model = $("param-model").value.trim();
  if (model) params.model = model;
  const temperature = $("param-temperature").value.trim();
  if (temperature !== "") {
    const t = Number(temperature);
    if (!Number.isFinite(t) || t < 0 || t > 2) errors.push("temperature must be between 0 and 2");
    else params.temperature = t;
  }
  const maxTokens = $("param-max-tokens").value.trim();
  if (maxTokens !== "") {
    if (!/^\d+$/.test(maxTokens) || Number(maxTokens) < 1) errors.push("max tokens must be a whole number ≥ 1");
    else params.max_tokens = Number(maxTokens);
  }
  const stop = $("param-stop").value.split("\n").filter((s) => s !== "");
  if (stop.length > 4) errors.push("at most 4 stop sequences");
  if (stop.length) params.stop = stop;
  const schema = $("param-schema").value.trim();
  if (schema) {
    try {
      const parsed = JSON.parse(schema);
      if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) errors.push("the response JSON schema must be a JSON object");
      else params.response_schema = parsed;
    } catch (exc) {
      errors.push(`the response JSON schema is not valid JSON (${exc.message})`);
    }
  }
  const variables = readVariables(errors);
  return {
    content: { description: $("description").value, messages, params, variables },
    errors,
  };
}

function edited() {
  setDirty(true);
  $("save-status").replaceChildren();
  schedulePreview();
}

// -------------------------------------------------------------------------------- preview

function schedulePreview(delay = PREVIEW_DELAY_MS) {
  clearTimeout(state.previewTimer);
  $("preview-status").textContent = "Rendering…";
  state.previewTimer = setTimeout(runPreview, delay);
}

async function runPreview() {
  if (!state.name) return null;
  const seq = ++state.previewSeq;
  if (state.previewAbort) state.previewAbort.abort();
  const { content, errors } = collectDraft();
  const values = variableValues(errors);
  if (errors.length) {
    state.lastPreview = null;
    showPreviewError(errors.join("\n"));
    $("preview-status").textContent = "Fix the draft to see the preview";
    return null;
  }
  const abort = new AbortController();
  state.previewAbort = abort;
  try {
    const out = await prompts.preview(content, values, state.name, abort.signal);
    if (seq !== state.previewSeq) return null;
    state.lastPreview = out;
    showPreviewError("");
    renderPreview(out);
    $("preview-status").textContent = `Up to date · ${shortHash(out.hash)}`;
    return out;
  } catch (exc) {
    if (exc.name === "AbortError" || seq !== state.previewSeq) return null;
    if (handleAuth(exc)) return null;
    state.lastPreview = null;
    showPreviewError(errorText(exc));
    $("preview-status").textContent = "Cannot render";
    return null;
  }
}

function showPreviewError(message) {
  showAlert($("preview-error"), message);
  $("preview-output").classList.toggle("stale", Boolean(message));
}

function renderPreview(out) {
  $("preview-output").replaceChildren(
    ...out.messages.map((m, i) =>
      el(
        "div",
        { class: `rendered rendered-${m.role}`, "aria-label": `Rendered message ${i + 1} (${m.role})` },
        el("div", { class: "rendered-role", text: m.role }),
        el("pre", { class: "rendered-text", text: m.content }),
      ),
    ),
  );
}

// ----------------------------------------------------------------------------------- save

async function save() {
  const { content, errors } = collectDraft();
  const status = $("save-status");
  if (errors.length) {
    status.replaceChildren(el("span", { class: "error-text", text: `Cannot save: ${errors.join("; ")}` }));
    return;
  }
  const message = $("save-message").value.trim();
  const button = $("save");
  button.disabled = true;
  status.replaceChildren(el("span", { class: "muted", text: "Saving…" }));
  try {
    const v = await prompts.save(state.name, content, state.base, message);
    const [versions, labels] = await Promise.all([prompts.versions(state.name), prompts.labels(state.name)]);
    state.versions = versions.data;
    state.labels = labels;
    state.base = v.version;
    state.loaded = v.version;
    setDirty(false);
    $("save-message").value = "";
    renderMeta();
    status.replaceChildren(el("span", { class: "ok-text", text: `Saved ${v.ref} · ${shortHash(v.hash)}` }));
    toast(`Saved ${v.ref}`);
    refreshList();
    if (currentTab() === "history") loadHistory();
  } catch (exc) {
    if (handleAuth(exc)) return;
    if (exc.status === 409) {
      const reload = el("button", { type: "button", class: "btn small", onclick: () => reloadLatest() }, "Reload latest version");
      status.replaceChildren(
        el(
          "div",
          { class: "alert warn conflict" },
          el("strong", { text: "Someone saved a newer version. " }),
          `Your draft is based on v${state.base}, which is no longer the latest: ${exc.message} `,
          "Reload to get the latest version (copy your changes first — reloading replaces the draft), then apply your edits again. ",
          reload,
        ),
      );
    } else {
      status.replaceChildren(el("span", { class: "error-text", text: `Not saved: ${errorText(exc)}` }));
    }
  } finally {
    button.disabled = false;
  }
}

async function reloadLatest() {
  setDirty(false);
  await openTemplate(state.name, "latest", { reload: true });
  refreshList();
  toast("Reloaded the latest version");
}

async function openVersion(version) {
  if (!confirmDiscard()) {
    $("open-version").value = String(state.loaded);
    return;
  }
  try {
    const [full, versions, labels] = await Promise.all([
      prompts.version(state.name, String(version)),
      prompts.versions(state.name),
      prompts.labels(state.name),
    ]);
    state.versions = versions.data;
    state.labels = labels;
    // Editing an older version means starting the next version from its content: the save is
    // based on the newest version this page knows of, so a concurrent save is still caught.
    state.base = state.versions[0].version;
    loadContent(full);
    renderMeta();
  } catch (exc) {
    if (!handleAuth(exc)) toast(errorText(exc), "error");
  }
}

// ------------------------------------------------------------------------------------ run

function resetRun() {
  if (state.runAbort) state.runAbort.abort();
  $("run-output").textContent = "";
  $("run-meta").replaceChildren();
  $("run-status").textContent = "";
  showAlert($("run-error"), "");
}

function meta(term, value, cls) {
  return [el("dt", { text: term }), el("dd", { class: cls, text: value })];
}

async function run() {
  resetRun();
  const errors = [];
  const variables = variableValues(errors);
  if (errors.length) {
    showAlert($("run-error"), errors.join("; "));
    return;
  }
  const source = document.querySelector('input[name="run-source"]:checked').value;
  const body = {};
  const model = $("run-model").value;
  const maxTokens = $("run-max-tokens").value.trim();
  if (model) body.model = model;
  if (maxTokens) body.max_tokens = Number(maxTokens);
  let label;
  if (source === "saved") {
    const version = $("run-ref").value;
    body.prompt = { ref: `${state.name}@${version}`, variables };
    body.messages = [];
    label = `${state.name}@${version}`;
  } else {
    clearTimeout(state.previewTimer);
    const rendered = await runPreview();
    if (!rendered) {
      showAlert($("run-error"), "The draft does not render; see the preview in the Editor tab.");
      return;
    }
    const p = rendered.params || {};
    body.messages = rendered.messages;
    if (!body.model && p.model) body.model = p.model;
    if (!body.max_tokens && p.max_tokens) body.max_tokens = p.max_tokens;
    if (p.temperature !== null && p.temperature !== undefined) body.temperature = p.temperature;
    if (p.stop && p.stop.length) body.stop = p.stop;
    if (p.response_schema) body.response_format = { type: "json_schema", json_schema: { name: state.name.replace(/[^A-Za-z0-9_-]/g, "_"), schema: p.response_schema } };
    label = `${state.name}@draft (${shortHash(rendered.hash)})`;
  }
  const abort = new AbortController();
  state.runAbort = abort;
  $("run").disabled = true;
  $("run-stop").disabled = false;
  const output = $("run-output");
  output.classList.add("streaming");
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let finish = null;
  let announced = false;
  $("run-status").textContent = `Running ${label}…`;
  try {
    for await (const chunk of streamChat(body, abort.signal)) {
      if (chunk.prompt || !announced) {
        // The first chunk names the resolved prompt version and its hash (saved prompts only).
        announced = true;
        const info = chunk.prompt;
        $("run-meta").replaceChildren(
          ...meta("Prompt", info ? info.ref : label, "mono"),
          ...meta("Hash", info ? info.hash : source === "draft" ? state.lastPreview?.hash || "" : "", "mono"),
          ...meta("Model", chunk.model || "", "mono"),
        );
        $("run-meta").dataset.ref = info ? info.ref : "";
      }
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        const text = choice.delta && choice.delta.content;
        if (text) {
          if (first === null) first = performance.now();
          output.append(document.createTextNode(text));
          chunks += 1;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      $("run-status").textContent = `Streaming… ${chunks} chunk${chunks === 1 ? "" : "s"}`;
    }
    const total = ((performance.now() - started) / 1000).toFixed(1);
    const ttft = first !== null ? `${Math.round(first - started)} ms to first token · ` : "";
    $("run-status").textContent = `Done · ${chunks} chunks · ${ttft}${total} s · finish: ${finish || "?"}`;
  } catch (exc) {
    if (exc.name === "AbortError") {
      $("run-status").textContent = "Stopped";
    } else if (!handleAuth(exc)) {
      showAlert($("run-error"), errorText(exc));
      $("run-status").textContent = "Failed";
    }
  } finally {
    output.classList.remove("streaming");
    $("run").disabled = false;
    $("run-stop").disabled = true;
    state.runAbort = null;
  }
}

// ----------------------------------------------------------------------------------- diff

async function compare() {
  const from = $("diff-from").value;
  const to = $("diff-to").value;
  showAlert($("diff-error"), "");
  try {
    const d = await prompts.diff(state.name, from, to);
    $("diff-changed").replaceChildren(
      ...(d.changed.length ? d.changed.map((c) => chip(`${c} changed`, "chip-warn")) : [chip("no changes", "chip-muted")]),
    );
    renderDiff($("diff-output"), d.diff, d.from_ref, d.to_ref);
  } catch (exc) {
    if (!handleAuth(exc)) showAlert($("diff-error"), errorText(exc));
  }
}

// --------------------------------------------------------------------------------- labels

function renderLabels() {
  const rows = Object.entries(state.labels).sort(([a], [b]) => a.localeCompare(b));
  const tbody = $("labels-table");
  if (!rows.length) {
    tbody.replaceChildren(el("tr", {}, el("td", { colspan: "3", class: "muted", text: "No labels yet: move one to a version." })));
    return;
  }
  tbody.replaceChildren(
    ...rows.map(([label, version]) =>
      el(
        "tr",
        {},
        el("td", {}, chip(label, labelClass(label))),
        el("td", { text: `v${version}` }),
        el(
          "td",
          { class: "right" },
          el("button", { type: "button", class: "btn ghost small", "aria-label": `Remove label ${label}`, onclick: () => removeLabel(label) }, "Remove"),
        ),
      ),
    ),
  );
}

function verdictBox(kind, title, lines) {
  return el("div", { class: `alert ${kind}` }, el("strong", { text: title }), ...lines.map((l) => el("div", { text: l })));
}

async function moveLabel(event) {
  event.preventDefault();
  const label = $("label-name").value.trim();
  const version = Number($("label-version").value);
  const reason = $("label-override").value.trim();
  const out = $("label-result");
  out.replaceChildren(el("span", { class: "muted", text: "Asking the promotion gate…" }));
  try {
    const move = await prompts.moveLabel(state.name, label, version, reason || undefined);
    const lines = [];
    const from = move.from_version ? `v${move.from_version}` : "(none)";
    if (!move.changed) lines.push(`${label} already points at v${move.to_version}; nothing changed.`);
    else lines.push(`${label}: ${from} → v${move.to_version}`);
    let kind = "ok";
    let title = `Moved ${label} to v${move.to_version}`;
    if (move.verdict) {
      lines.push(`Gate verdict: ${move.verdict.passed ? "passed" : "refused"} — ${move.verdict.reason}`);
      if (move.overridden) {
        kind = "warn";
        title = `Moved ${label} to v${move.to_version} by admin override`;
        lines.push(`Override reason: ${reason}`);
      }
    } else if (move.changed) {
      lines.push("Not a protected label: no gate check.");
    }
    if (!move.changed) title = "Unchanged";
    out.replaceChildren(verdictBox(kind, title, lines));
    $("label-override").value = "";
    await refreshLabels();
  } catch (exc) {
    if (handleAuth(exc)) return;
    if (exc.code === "promotion_gate_failed") {
      out.replaceChildren(verdictBox("error", `Gate refused ${state.name}@${version} for ${label}`, [exc.message]));
    } else {
      out.replaceChildren(verdictBox("error", "Label not moved", [errorText(exc)]));
    }
  }
}

async function removeLabel(label) {
  if (!window.confirm(`Remove the label “${label}”?`)) return;
  const reason = $("label-override").value.trim();
  try {
    await prompts.removeLabel(state.name, label, reason || undefined);
    $("label-result").replaceChildren(verdictBox("ok", `Removed ${label}`, []));
    await refreshLabels();
  } catch (exc) {
    if (!handleAuth(exc)) $("label-result").replaceChildren(verdictBox("error", "Label not removed", [errorText(exc)]));
  }
}

async function refreshLabels() {
  const [versions, labels] = await Promise.all([prompts.versions(state.name), prompts.labels(state.name)]);
  state.versions = versions.data;
  state.labels = labels;
  renderMeta(false);
  renderLabels();
  refreshList();
}

// -------------------------------------------------------------------------------- history

async function loadHistory() {
  if (!state.name) return;
  try {
    const [versions, audit] = await Promise.all([prompts.versions(state.name), prompts.audit(state.name)]);
    state.versions = versions.data;
    $("versions-table").replaceChildren(
      ...versions.data.map((v) =>
        el(
          "tr",
          {},
          el("td", { class: "mono", text: `v${v.version}` }),
          el("td", {}, (v.labels || []).map((l) => chip(l, labelClass(l)))),
          el("td", { text: v.message || "—" }),
          el("td", { text: v.author }),
          el("td", { class: "nowrap", text: when(v.created_at) }),
          el("td", { class: "mono", title: v.hash, text: shortHash(v.hash) }),
        ),
      ),
    );
    $("audit-table").replaceChildren(
      ...audit.data.map((e) => {
        const gate = e.details && e.details.gate;
        const reasonTerm = e.action.startsWith("version.") ? "message" : "reason";
        const notes = [e.reason ? `${reasonTerm}: ${e.reason}` : "", gate ? `gate ${gate.passed ? "passed" : "refused"}: ${gate.reason}` : ""].filter(Boolean);
        const fromTo = e.from_version || e.to_version ? `${e.from_version ? `v${e.from_version}` : "—"} → ${e.to_version ? `v${e.to_version}` : "—"}` : "";
        return el(
          "tr",
          { class: `audit-${e.action.replace(/\W/g, "-")}` },
          el("td", { class: "nowrap", text: when(e.at) }),
          el("td", { text: e.actor }),
          el("td", {}, chip(e.action, e.action.startsWith("label") ? "chip-label" : "chip-muted")),
          el("td", { text: e.label || "" }),
          el("td", { class: "mono nowrap", text: fromTo }),
          el("td", { text: notes.join(" · ") }),
        );
      }),
    );
    if (!audit.data.length) $("audit-table").replaceChildren(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No entries." })));
  } catch (exc) {
    if (!handleAuth(exc)) toast(errorText(exc), "error");
  }
}

// ----------------------------------------------------------------------------------- tabs

const TABS = ["editor", "run", "diff", "labels", "history"];

function currentTab() {
  return TABS.find((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
}

function selectTab(name, focus = false) {
  for (const t of TABS) {
    const selected = t === name;
    const tab = $(`tab-${t}`);
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`panel-${t}`).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  if (name === "labels") renderLabels();
  if (name === "history") loadHistory();
  if (name === "run") renderRunVars();
}

// ---------------------------------------------------------------------------------- create

async function createTemplate(event) {
  event.preventDefault();
  const name = $("new-name").value.trim();
  const description = $("new-description").value.trim();
  const content = {
    description,
    messages: [
      { role: "system", content: "You are a helpful assistant. Answer briefly." },
      { role: "user", content: "{{ question }}" },
    ],
    params: { max_tokens: 64 },
    variables: [{ name: "question", type: "string", required: true, description: "The user's question" }],
  };
  try {
    await prompts.create(name, content, "created in Prompt Studio");
    $("new-form").hidden = true;
    $("new-form").reset();
    $("new-error").textContent = "";
    await refreshList();
    setDirty(false);
    await openTemplate(name);
    toast(`Created ${name}@1`);
  } catch (exc) {
    if (!handleAuth(exc)) $("new-error").textContent = errorText(exc);
  }
}

// ------------------------------------------------------------------------------------ init

function init() {
  $("search").addEventListener("input", () => {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(refreshList, 200);
  });
  $("new-template").addEventListener("click", () => {
    $("new-form").hidden = false;
    $("new-name").focus();
  });
  $("new-cancel").addEventListener("click", () => {
    $("new-form").hidden = true;
    $("new-error").textContent = "";
  });
  $("new-form").addEventListener("submit", createTemplate);
  $("add-message").addEventListener("click", () => addMessage("user", ""));
  $("add-variable").addEventListener("click", () => addVariable({}));
  $("detect-variables").addEventListener("click", declareUsedVariables);
  for (const id of ["description", "param-model", "param-temperature", "param-max-tokens", "param-stop", "param-schema"]) {
    $(id).addEventListener("input", edited);
  }
  $("open-version").addEventListener("change", (e) => openVersion(e.target.value));
  $("save").addEventListener("click", save);
  $("save-message").addEventListener("keydown", (e) => {
    if (e.key === "Enter") save();
  });
  $("run").addEventListener("click", run);
  $("run-stop").addEventListener("click", () => state.runAbort && state.runAbort.abort());
  $("diff-run").addEventListener("click", compare);
  $("label-form").addEventListener("submit", moveLabel);
  $("history-refresh").addEventListener("click", loadHistory);
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "s" && state.name && !$("template-view").hidden) {
      e.preventDefault();
      save();
    }
  });
  const tablist = document.querySelector('[role="tablist"]');
  for (const t of TABS) $(`tab-${t}`).addEventListener("click", () => selectTab(t));
  tablist.addEventListener("keydown", (e) => {
    const i = TABS.indexOf(currentTab());
    if (e.key === "ArrowRight") selectTab(TABS[(i + 1) % TABS.length], true);
    else if (e.key === "ArrowLeft") selectTab(TABS[(i + TABS.length - 1) % TABS.length], true);
    else return;
    e.preventDefault();
  });

  start();
}

init();
