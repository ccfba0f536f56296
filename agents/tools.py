"""Tools: the ``Tool`` protocol, a registry, the executor and the built-in tools.

A tool is anything with ``name``, ``description``, ``input_schema`` (a JSON schema of an
object), ``risky`` and ``async run(args, ctx)``; it may also name the API-key ``scope`` a caller needs
(``lifecycle.tools``: the ML lifecycle tools plug in with ``ToolRegistry.register``).

The executor never lets a tool error escape: bad input, a missing scope, a raised exception or a
timeout become an observation (``ok=False``) the agent reads. Exceptions other than bad input are
retried ``retries`` times. Risky tools are paused for approval by the graph's tools node
(``interrupt()``), never here: the executor only runs what was approved. Every call that reached a
known tool is handed to the registry's ``audit`` hook (the lifecycle's tool audit trail).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from agents.arithmetic import evaluate
from agents.errors import ShadowSkipped, ToolDenied, ToolInputError, ToolNotFound
from agents.events import ToolCall, ToolResult
from app.core.errors import KeelError
from app.security.keys import scope_allows

if TYPE_CHECKING:  # jsonschema is imported on first use: importing it takes over a second
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

log = logging.getLogger("keel.agents")

MAX_OBSERVATION_CHARS = 2000
#: Who a release's shadow run acts as: shadow:<the caller's key>, never the caller (its run, its audit rows).
SHADOW_OWNER = "shadow:"


@dataclass
class ToolContext:
    run_id: str = ""
    thread_id: str = ""
    namespace: tuple[str, ...] = ("users", "anonymous")
    search_namespaces: tuple[tuple[str, ...], ...] = ()
    retriever: Any = None
    collection: str | None = None
    top_k: int = 4
    memory: Any = None  # a langgraph BaseStore (QdrantMemoryStore)
    prompts: Any = None  # PromptRegistry
    #: Who calls (an API key id; "" for the operator's own CLI) and what its key allows: None is unscoped
    #: (the CLI and tests), a set is checked against each tool's ``scope`` before the tool runs.
    principal: str = ""
    scopes: frozenset[str] | None = None
    request_id: str | None = None
    #: A release's shadow run: only tools that change nothing run (:meth:`ToolRegistry.runs_in_shadow`); any
    #: other call is answered "not executed", so a shadow never writes memory or acts on the world.
    shadow: bool = False

    def allows(self, scope: str | None) -> bool:
        return scope is None or self.scopes is None or scope_allows(self.scopes, scope)


@runtime_checkable
class Tool(Protocol):
    name: str
    description: str
    input_schema: dict[str, Any]
    risky: bool

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> Any: ...


@dataclass
class FunctionTool:
    """A tool from a plain function ``fn(args, ctx)``; sync functions run in a worker thread."""

    name: str
    description: str
    input_schema: dict[str, Any]
    fn: Callable[[dict[str, Any], ToolContext], Any]
    risky: bool = False
    read_only: bool = False  # it changes nothing (MCP's readOnlyHint): a shadow run may call it (runs_in_shadow)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> Any:
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(args, ctx)
        result = await asyncio.to_thread(self.fn, args, ctx)
        if inspect.isawaitable(result):
            result = await result
        return result


@dataclass
class ToolObservation:
    call_id: str
    tool: str
    args: dict[str, Any]
    ok: bool
    output: str
    data: Any = None
    error_code: str | None = None
    attempts: int = 1
    duration_ms: float = 0.0

    def to_state(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "tool": self.tool, "args": self.args, "ok": self.ok, "output": self.output,
                "data": self.data, "error_code": self.error_code, "attempts": self.attempts}


AuditHook = Callable[["ToolContext", "ToolObservation"], None]


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None, risky: set[str] | None = None,
                 audit: AuditHook | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Validator] = {}
        self.extra_risky = set(risky or ())
        #: Called with every finished call of a registered tool (never raises into the caller).
        self.audit = audit
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool, *, replace: bool = False) -> None:
        if not isinstance(tool, Tool):
            raise TypeError(f"{tool!r} does not implement the Tool protocol")
        if tool.name in self._tools and not replace:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        try:
            validator = compile_schema(tool.input_schema)
        except ValueError as e:
            raise ValueError(f"tool {tool.name!r} has an invalid input_schema: {e}") from None
        self._tools[tool.name] = tool
        self._validators[tool.name] = validator

    def get(self, name: str) -> Tool:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolNotFound(f"no tool named {name!r}; available: {', '.join(sorted(self._tools)) or 'none'}")
        return tool

    def validate(self, name: str, args: Any) -> dict[str, Any]:
        """Check ``args`` for the tool ``name`` with the validator compiled when it was registered."""
        tool = self.get(name)
        return validate_args(tool.input_schema, args, validator=self._validators[name])

    def names(self, *, without_tag: str | None = None) -> list[str]:
        """The tools' names; ``without_tag``: leave out the tools tagged so (a tool's optional ``tags``)."""
        return sorted(n for n, t in self._tools.items()
                      if without_tag is None or without_tag not in getattr(t, "tags", ()))

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def is_risky(self, name: str) -> bool:
        tool = self._tools.get(name)
        return name in self.extra_risky or bool(tool and tool.risky)

    def changes_nothing(self, name: str) -> bool:
        """Whether a call of ``name`` is known to change nothing: its tool says ``read_only`` (an unmarked tool is
        assumed to act) and no setting made it risky."""
        return bool(getattr(self._tools.get(name), "read_only", False)) and not self.is_risky(name)

    def runs_in_shadow(self, name: str) -> bool:
        """Whether a release's shadow run may call ``name``: it changes nothing, on a word Keel trusts (an external
        MCP server's ``readOnlyHint`` counts only where its settings say ``shadow: true``)."""
        return self.changes_nothing(name) and bool(getattr(self._tools.get(name), "shadow_safe", True))

    def scope(self, name: str) -> str | None:
        return getattr(self._tools.get(name), "scope", None)

    def tools(self, ctx: ToolContext | None = None) -> list[Tool]:
        """The tools, by name; with ``ctx``, only those its scopes allow."""
        return [t for _, t in sorted(self._tools.items())
                if ctx is None or ctx.allows(getattr(t, "scope", None))]

    def specs(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"name": t.name, "description": t.description, "input_schema": t.input_schema,
                 "risky": self.is_risky(t.name), "scope": getattr(t, "scope", None)}
                for n, t in sorted(self._tools.items()) if names is None or n in names]


# -- argument validation (JSON Schema, by jsonschema) ------------------------------------------------
# A tool's ``input_schema`` is a JSON Schema: Draft 2020-12 unless it names another dialect with ``$schema``.
# It is checked against its dialect's metaschema when the tool is registered (a broken schema fails there,
# not on the first call), and the validator compiled then is the one every call of the tool uses.
# ``format`` is an annotation, as the dialect says (not asserted); no defaults are filled in.
# jsonschema is imported here, not at the top: its import takes over a second (a process that never
# registers a tool never pays it).

_MAX_PROBLEMS = 5


def compile_schema(schema: Any) -> Validator:
    """A validator for ``schema``, which must be a valid JSON Schema; raises :class:`ValueError` otherwise."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, Mapping):
        raise ValueError(f"an input schema must be a JSON object, got {_json_type(schema)}")
    cls = validator_for(schema, default=Draft202012Validator)
    if "$schema" in schema and validator_for(schema, default=_Unknown) is _Unknown:  # type: ignore[arg-type]
        raise ValueError(f"unknown JSON Schema dialect $schema={schema['$schema']!r}")
    try:
        cls.check_schema(schema)
    except SchemaError as e:
        where = "/".join(map(str, e.absolute_path)) or "(root)"
        raise ValueError(f"at {where}: {e.message}") from None
    return cls(schema)


class _Unknown:  # validator_for's answer for a $schema it does not know
    pass


def validate_args(schema: dict[str, Any], args: Any, *, validator: Validator | None = None) -> dict[str, Any]:
    """Check ``args`` against ``schema``; raise :class:`ToolInputError` saying what to fix.

    ``validator`` is a compiled one to reuse (``ToolRegistry.validate`` passes the one compiled when the tool
    was registered); without it ``schema`` is compiled for this one call.
    """
    if not isinstance(args, dict):
        raise ToolInputError(f"arguments must be a JSON object, got {_json_type(args)}")
    errors = list((validator if validator is not None else compile_schema(schema)).iter_errors(args))
    if errors:
        raise ToolInputError(_explain(errors))
    return args


def _explain(errors: list[ValidationError]) -> str:
    """One message for all the problems: missing and unknown keys first (grouped), then each bad value."""
    missing: dict[str, list[str]] = {}
    unknown: dict[str, list[str]] = {}
    problems: list[str] = []
    for e in errors:
        where = _where(e.absolute_path)
        if e.validator == "required" and isinstance(e.instance, dict):
            keys = missing.setdefault(where, [])
            keys += [k for k in e.validator_value if k not in e.instance and k not in keys]
        elif (e.validator == "additionalProperties" and e.validator_value is False and isinstance(e.instance, dict)
              and (extra := _extra_keys(e.instance, e.schema))):
            keys = unknown.setdefault(where, [])
            keys += [k for k in extra if k not in keys]
        else:
            problems.append(_problem(e, where))
    out = [f"missing argument(s): {', '.join(keys)}" if not where else
           f"argument {where!r} is missing key(s): {', '.join(keys)}" for where, keys in missing.items()]
    out += [f"unknown argument(s): {', '.join(sorted(keys))}" if not where else
            f"argument {where!r} has unknown key(s): {', '.join(sorted(keys))}" for where, keys in unknown.items()]
    out += list(dict.fromkeys(problems))
    more = f"; and {len(out) - _MAX_PROBLEMS} more problem(s)" if len(out) > _MAX_PROBLEMS else ""
    return "; ".join(out[:_MAX_PROBLEMS]) + more


def _problem(e: ValidationError, where: str) -> str:
    subject = f"argument {where!r}" if where else "arguments"
    want = e.validator_value
    match e.validator:
        case "type":
            types = [want] if isinstance(want, str) else list(want)
            return f"{subject} must be {' or '.join(types)}, got {_json_type(e.instance)}"
        case "enum":
            return f"{subject} must be one of {want}"
        case "const":
            return f"{subject} must be {json.dumps(want, ensure_ascii=False, default=str)}"
        case "maxLength":
            return f"{subject} is longer than {want} characters"
        case "minLength":
            return f"{subject} is shorter than {want} characters"
        case "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum":
            op = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[e.validator]
            if isinstance(want, bool):  # draft 4: exclusiveMinimum/Maximum is a flag on minimum/maximum
                want = e.schema.get("minimum" if e.validator == "exclusiveMinimum" else "maximum")
            elif e.schema.get(f"exclusive{e.validator.title()}") is True:
                op = op[0]
            return f"{subject} must be {op} {want}, got {e.instance}"
        case "multipleOf":
            return f"{subject} must be a multiple of {want}"
        case "pattern":
            return f"{subject} must match the pattern {want!r}"
        case "minItems" | "maxItems":
            return f"{subject} must have at {'least' if e.validator == 'minItems' else 'most'} {want} item(s)"
        case "uniqueItems":
            return f"{subject} must not repeat items"
        case _:  # jsonschema's own words, less the value they start with ("[...] is not valid under any of ...")
            message, value = e.message, repr(e.instance)
            if message.startswith(value) and len(message) > len(value):
                message = message[len(value):].strip()
            message = message if len(message) <= 200 else message[:200] + "..."
            return f"{subject}: {message} ({e.validator})"


def _where(path: Any) -> str:
    """``deque(['items', 0, 'name'])`` -> ``items[0].name``; the arguments themselves -> ``''``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _extra_keys(instance: dict[str, Any], schema: Mapping[str, Any]) -> list[str]:
    props, patterns = schema.get("properties", {}), schema.get("patternProperties", {})
    return [k for k in instance if k not in props and not any(re.search(p, k) for p in patterns)]


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _render(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + " [truncated]"


Emit = Callable[[Any], None]


async def execute(registry: ToolRegistry, tool_name: str, args: dict[str, Any], ctx: ToolContext, *,
                  emit: Emit | None = None, node: str = "", call_id: str | None = None, retries: int = 1,
                  timeout_s: float = 30.0, backoff_s: float = 0.05) -> ToolObservation:
    """Run one tool call to an observation; emits ``tool.call`` and ``tool.result``."""
    call_id = call_id or f"call_{uuid.uuid4().hex[:12]}"
    emit = emit or (lambda _e: None)
    emit(ToolCall(ctx.run_id, call_id, tool_name, dict(args), node))
    t0 = time.perf_counter()
    attempts = 0
    obs: ToolObservation
    tool: Tool | None = None
    try:
        tool = registry.get(tool_name)
        if not ctx.allows(scope := getattr(tool, "scope", None)):
            raise ToolDenied(f"{tool_name} needs an API key with the {scope!r} scope; this key has "
                             f"{', '.join(sorted(ctx.scopes or ())) or 'none'}")
        registry.validate(tool_name, args)
        if ctx.shadow and not registry.runs_in_shadow(tool_name):
            raise ShadowSkipped(f"not executed: {tool_name} can change something and this is a shadow run, whose "
                                "answer nobody sees; answer without it")
    except (ToolNotFound, ToolInputError, ToolDenied) as e:
        obs = ToolObservation(call_id, tool_name, args, False, f"error: {e}", None, e.code, 0)
    except Exception as e:  # the tool's schema cannot be applied (an unresolvable $ref): its fault, not the input's
        obs = ToolObservation(call_id, tool_name, args, False,
                              _render(f"error: cannot check the arguments of {tool_name}: {type(e).__name__}: {e}"),
                              None, "tool_error", 0)
    else:
        while True:
            attempts += 1
            try:
                result = await asyncio.wait_for(tool.run(args, ctx), timeout_s)
            except KeelError as e:
                if e.status >= 500:  # a backend or store that may answer next time: retried below
                    err, code = f"error: {e}", e.code
                else:  # the caller's mistake (bad input, not found, a conflict, a refused gate): not retried
                    obs = ToolObservation(call_id, tool_name, args, False, _render(f"error: {e}"), None, e.code,
                                          attempts)
                    break
            except TimeoutError:
                err, code = f"error: {tool_name} timed out after {timeout_s:g} s", "tool_timeout"
            except Exception as e:  # any tool failure becomes an observation
                err, code = f"error: {type(e).__name__}: {e}", getattr(e, "code", "tool_error")
            else:
                data = result.data if isinstance(result, ToolOutput) else result
                text = result.text if isinstance(result, ToolOutput) else _render(result)
                obs = ToolObservation(call_id, tool_name, args, True, _render(text), data, None, attempts)
                break
            if attempts > retries:
                obs = ToolObservation(call_id, tool_name, args, False, err, None, code, attempts)
                break
            await asyncio.sleep(backoff_s * attempts)
    obs.duration_ms = round((time.perf_counter() - t0) * 1000, 2)
    emit(ToolResult(ctx.run_id, call_id, tool_name, obs.ok, obs.output, obs.attempts, obs.duration_ms))
    if tool is not None and registry.audit is not None:
        try:
            registry.audit(ctx, obs)
        except Exception:  # the audit trail's failure is logged there; the call's result still stands
            log.exception("tool audit hook failed for %s", tool_name)
    return obs


@dataclass
class ToolOutput:
    """A tool result with a text for the model and structured data for the graph."""

    text: str
    data: Any = None


# -- built-in tools ----------------------------------------------------------------------------


def _passages(result: Any) -> list[dict[str, Any]]:
    out = []
    for ch in result.chunks:
        c = ch.citation
        out.append({"text": ch.text, "title": c.title, "source": c.source, "label": c.label(),
                    "chunk_id": c.chunk_id, "page": c.page, "score": round(float(ch.score), 4)})
    return out


def _retrieve(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    if ctx.retriever is None:
        raise RuntimeError("no document store is configured")
    top_k = int(args.get("top_k") or ctx.top_k)
    result = ctx.retriever.retrieve(args["query"], collection=ctx.collection, top_k=min(max(top_k, 1), 20))
    passages = _passages(result)
    text = "\n".join(f"[{i}] {p['label']}: {p['text'][:300]}" for i, p in enumerate(passages, 1)) or "no passages"
    return ToolOutput(text, passages)


def _memory_search(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    if ctx.memory is None:
        return ToolOutput("no memory store configured", [])
    limit = int(args.get("limit") or 3)
    found = []
    for ns in ctx.search_namespaces or (ctx.namespace,):
        for item in ctx.memory.search(ns, query=args["query"], limit=limit):
            found.append({"namespace": "/".join(item.namespace), "key": item.key,
                          "text": item.value.get("text", ""), "score": item.score})
    found.sort(key=lambda m: -(m["score"] or 0))
    found = found[:limit]
    return ToolOutput("\n".join(f"- {m['text']}" for m in found) or "no memories", found)


def _memory_write(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    if ctx.memory is None:
        raise RuntimeError("no memory store configured")
    key = args.get("key") or f"mem-{uuid.uuid4().hex[:12]}"
    value = {"text": args["text"], "kind": args.get("kind", "fact"), "source_run": ctx.run_id,
             "thread_id": ctx.thread_id}
    stored_key = ctx.memory.put_memory(ctx.namespace, key, value) if hasattr(ctx.memory, "put_memory") else (
        ctx.memory.put(ctx.namespace, key, value) or key)
    return ToolOutput(f"stored memory {stored_key} in {'/'.join(ctx.namespace)}",
                      {"key": stored_key, "namespace": list(ctx.namespace)})


def _prompt_read(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    if ctx.prompts is None:
        raise RuntimeError("no prompt registry configured")
    version = ctx.prompts.resolve(args["ref"])
    content = version.content
    text = f"{version.ref}: {content.description}\n" + "\n".join(
        f"[{m.role}] {m.content}" for m in content.messages)
    return ToolOutput(text, {"ref": version.ref, "hash": version.hash})


def _calculator(args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
    value = evaluate(args["expression"])
    return ToolOutput(f"{args['expression']} = {value}", value)


def _obj(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def builtin_tools() -> list[Tool]:
    s = {"type": "string", "maxLength": 500}
    return [
        FunctionTool("retrieve", "Search the document store; returns numbered passages with citations.",
                     _obj({"query": s, "top_k": {"type": "integer"}}, ["query"]), _retrieve, read_only=True),
        FunctionTool("memory_search", "Search long-term memory shared by this user and team.",
                     _obj({"query": s, "limit": {"type": "integer"}}, ["query"]), _memory_search, read_only=True),
        FunctionTool("memory_write", "Store a fact worth keeping in long-term memory.",
                     _obj({"text": s, "kind": {"type": "string"}, "key": {"type": "string"}}, ["text"]),
                     _memory_write),
        FunctionTool("prompt_read", "Read a prompt template from the registry by reference (name@label).",
                     _obj({"ref": {"type": "string", "maxLength": 200}}, ["ref"]), _prompt_read, read_only=True),
        FunctionTool("calculator", "Evaluate an arithmetic expression such as '2 * (3 + 4) / 5'.",
                     _obj({"expression": {"type": "string", "maxLength": 200}}, ["expression"]), _calculator,
                     read_only=True),
    ]


ToolFn = Callable[[dict[str, Any], ToolContext], Any | Awaitable[Any]]
__all__ = ["SHADOW_OWNER", "FunctionTool", "Tool", "ToolContext", "ToolObservation", "ToolOutput", "ToolRegistry",
           "builtin_tools", "compile_schema", "execute", "validate_args"]
