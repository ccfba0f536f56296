"""Tools: the ``Tool`` protocol, a registry, the executor and the built-in tools.

A tool is anything with ``name``, ``description``, ``input_schema`` (a JSON schema of an
object), ``risky`` and ``async run(args, ctx)``; the ML lifecycle tools (model registry,
experiment tracking, drift, feature store) plug in with ``ToolRegistry.register``.

The executor never lets a tool error escape: bad input, a raised exception or a timeout
become an observation (``ok=False``) the agent reads. Exceptions other than bad input are
retried ``retries`` times. Risky tools are paused for approval by the graph's tools node
(``interrupt()``), never here: the executor only runs what was approved.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from agents.arithmetic import evaluate
from agents.errors import ToolInputError, ToolNotFound
from agents.events import ToolCall, ToolResult

MAX_OBSERVATION_CHARS = 2000


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


class ToolRegistry:
    def __init__(self, tools: list[Tool] | None = None, risky: set[str] | None = None) -> None:
        self._tools: dict[str, Tool] = {}
        self.extra_risky = set(risky or ())
        for t in tools or []:
            self.register(t)

    def register(self, tool: Tool, *, replace: bool = False) -> None:
        if not isinstance(tool, Tool):
            raise TypeError(f"{tool!r} does not implement the Tool protocol")
        if tool.name in self._tools and not replace:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> Tool:
        tool = self._tools.get(name)
        if tool is None:
            raise ToolNotFound(f"no tool named {name!r}; available: {', '.join(sorted(self._tools)) or 'none'}")
        return tool

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def is_risky(self, name: str) -> bool:
        tool = self._tools.get(name)
        return name in self.extra_risky or bool(tool and tool.risky)

    def specs(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"name": t.name, "description": t.description, "input_schema": t.input_schema,
                 "risky": self.is_risky(t.name)}
                for n, t in sorted(self._tools.items()) if names is None or n in names]


def validate_args(schema: dict[str, Any], args: Any) -> dict[str, Any]:
    """A small JSON-schema subset: object, required keys, property types, enums; no unknown keys."""
    if not isinstance(args, dict):
        raise ToolInputError(f"arguments must be a JSON object, got {type(args).__name__}")
    props: dict[str, Any] = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ToolInputError(f"missing argument(s): {', '.join(missing)}")
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(args) - set(props))
        if unknown:
            raise ToolInputError(f"unknown argument(s): {', '.join(unknown)}")
    types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict,
             "array": list}
    for key, value in args.items():
        spec = props.get(key)
        if not spec:
            continue
        want = types.get(spec.get("type", ""))
        if want is not None and (not isinstance(value, want) or (spec.get("type") in ("integer", "number")
                                                                  and isinstance(value, bool))):
            raise ToolInputError(f"argument {key!r} must be {spec['type']}, got {type(value).__name__}")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolInputError(f"argument {key!r} must be one of {spec['enum']}")
        if spec.get("type") == "string" and "maxLength" in spec and len(value) > spec["maxLength"]:
            raise ToolInputError(f"argument {key!r} is longer than {spec['maxLength']} characters")
    return args


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
    try:
        tool = registry.get(tool_name)
        validate_args(tool.input_schema, args)
    except (ToolNotFound, ToolInputError) as e:
        obs = ToolObservation(call_id, tool_name, args, False, f"error: {e}", None, e.code, 0)
    else:
        while True:
            attempts += 1
            try:
                result = await asyncio.wait_for(tool.run(args, ctx), timeout_s)
            except ToolInputError as e:
                obs = ToolObservation(call_id, tool_name, args, False, f"error: {e}", None, e.code, attempts)
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
                     _obj({"query": s, "top_k": {"type": "integer"}}, ["query"]), _retrieve),
        FunctionTool("memory_search", "Search long-term memory shared by this user and team.",
                     _obj({"query": s, "limit": {"type": "integer"}}, ["query"]), _memory_search),
        FunctionTool("memory_write", "Store a fact worth keeping in long-term memory.",
                     _obj({"text": s, "kind": {"type": "string"}, "key": {"type": "string"}}, ["text"]),
                     _memory_write),
        FunctionTool("prompt_read", "Read a prompt template from the registry by reference (name@label).",
                     _obj({"ref": {"type": "string", "maxLength": 200}}, ["ref"]), _prompt_read),
        FunctionTool("calculator", "Evaluate an arithmetic expression such as '2 * (3 + 4) / 5'.",
                     _obj({"expression": {"type": "string", "maxLength": 200}}, ["expression"]), _calculator),
    ]


ToolFn = Callable[[dict[str, Any], ToolContext], Any | Awaitable[Any]]
__all__ = ["FunctionTool", "Tool", "ToolContext", "ToolObservation", "ToolOutput", "ToolRegistry", "builtin_tools",
           "execute", "validate_args"]
