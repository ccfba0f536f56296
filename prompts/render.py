"""Sandboxed Jinja2 rendering of prompt templates.

Template authors hold ``prompts:write``, not code execution, so every path from a
template to Python internals or to unbounded CPU/memory is closed here:

* ``ImmutableSandboxedEnvironment`` refuses ``__class__``-style attributes and
  mutation of containers; a static AST check refuses them already at save time.
* Globals are cut down to ``range`` (capped), ``dict`` and ``namespace``.
* A step budget counts loop iterations and calls (macros included) per render, so
  nested loops and exponential macro recursion stop early.
* Size-producing operations (``*``, ``**``, ``%``, ``str.format``, ``center`` ...)
  are checked before they allocate, and the total output is capped.
* Includes only name registry templates with literal ``name@ref`` strings, resolved
  before rendering into a frozen map, with cycle and depth limits.
"""

from __future__ import annotations

import contextvars
import functools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, meta, nodes
from jinja2.environment import Template
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from app.core.errors import KeelError, NotFound
from prompts.errors import (
    TemplateInvalid,
    TemplateRenderError,
    TemplateTooLarge,
    UnsafeTemplate,
    VariableError,
)
from prompts.models import Message, TemplateContent, TemplateVersion, parse_ref, type_matches
from prompts.settings import PromptLimits

# Resolves a literal include reference (``name@ref``) to a stored version.
Resolver = Callable[[str], TemplateVersion]

_GUARD = "__keel_loop"
_BLOCKS = (nodes.For, nodes.If, nodes.With, nodes.Macro, nodes.CallBlock, nodes.FilterBlock, nodes.Block)
_SIZED_STR_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
_PCT_SPEC = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_BRACE_SPEC = re.compile(r"\{[^{}]*:([^{}]*)(\{?)")

# Per-render state. Context variables keep concurrent renders (threads, tasks) apart.
_INCLUDES: contextvars.ContextVar[Mapping[str, TemplateVersion] | None] = contextvars.ContextVar(
    "keel_prompt_includes", default=None
)
_STEPS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("keel_prompt_steps", default=None)


@dataclass(frozen=True, slots=True)
class CompiledPrompt:
    """A version ready for the hot path: parsed messages plus the frozen include map."""

    content: TemplateContent
    version: TemplateVersion | None
    templates: tuple[Template, ...]
    includes: Mapping[str, TemplateVersion]


def _format_too_wide(fmt: str, limit: int) -> bool:
    for match in _PCT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*" or (group and int(group) > limit):
                return True
    for match in _BRACE_SPEC.finditer(fmt):
        spec, nested = match.groups()
        if nested or any(int(d) > limit for d in re.findall(r"\d+", spec)):
            return True
    return False


class _RegistryLoader(BaseLoader):
    """Serves includes from the include map frozen for the current render."""

    def get_source(self, environment: Any, template: str) -> tuple[str, str, Callable[[], bool]]:
        includes = _INCLUDES.get() or {}
        found = includes.get(template)
        if found is None:
            raise TemplateNotFound(template)
        stamp = found.hash

        def uptodate() -> bool:
            # Jinja caches compiled includes by name; a label may point elsewhere in the next render.
            current = (_INCLUDES.get() or {}).get(template)
            return current is not None and current.hash == stamp

        return found.content.messages[0].content, found.ref, uptodate


class _KeelSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, limits: PromptLimits) -> None:
        super().__init__(
            loader=_RegistryLoader(),
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=True,
        )
        self.limits = limits
        self.globals.clear()
        self.globals.update(range=self._range, dict=dict, namespace=Namespace, **{_GUARD: self._loop_guard})
        for name in ("center", "indent"):
            self.filters[name] = self._sized_filter(self.filters[name], arg_index=1)
        self.filters["slice"] = self._sized_filter(self.filters["slice"], arg_index=1)
        self.filters["format"] = self._format_filter(self.filters["format"])
        self.filters["replace"] = self._replace_filter(self.filters["replace"])

    # --- budget -------------------------------------------------------------------------------
    def spend(self, steps: int = 1) -> None:
        counter = _STEPS.get()
        if counter is None:
            return
        counter[0] += steps
        if counter[0] > self.limits.max_steps:
            raise SecurityError(
                f"template exceeded its budget of {self.limits.max_steps} loop iterations and calls"
            )

    def _loop_guard(self, iterable: Iterable[Any]) -> Iterator[Any]:
        for item in iterable:
            self.spend()
            yield item

    def _range(self, *args: int) -> range:
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise SecurityError(f"range() is limited to {self.limits.max_range} items in templates")
        return rng

    def _check_size(self, n: Any, what: str) -> None:
        if isinstance(n, int) and abs(n) > self.limits.max_render_chars:
            raise SecurityError(f"{what} of {n} is larger than the render limit")

    # --- hooks the sandbox calls ----------------------------------------------------------------
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        __self.spend()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name in _SIZED_STR_METHODS:
                for value in (*args, *kwargs.values()):
                    __self._check_size(value, f"str.{name} width")
            elif name == "replace" and len(args) >= 2:
                __self._check_replace(owner, args[0], args[1])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        # The sandbox wraps str.format at attribute access, so the width check belongs here too.
        owner = getattr(value, "__self__", None)
        if (
            isinstance(owner, str)
            and getattr(value, "__name__", "") in {"format", "format_map"}
            and _format_too_wide(owner, self.limits.max_render_chars)
        ):
            def refuse(*args: Any, **kwargs: Any) -> str:
                raise SecurityError("format widths must be literal and below the render limit")

            return refuse
        return super().wrap_str_format(value)

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        limit = self.limits.max_render_chars
        if operator_ == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > limit:
                    raise SecurityError(f"repeating a sequence beyond {limit} items is not allowed")
        elif operator_ == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and abs(right) > 64:
                raise SecurityError("integer powers are limited to exponents of 64")
        elif operator_ == "%" and isinstance(left, str) and _format_too_wide(left, limit):
            raise SecurityError("format widths must be literal and below the render limit")
        return super().call_binop(context, operator_, left, right)

    def _check_replace(self, s: Any, old: Any, new: Any) -> None:
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            count = s.count(old) if old else len(s) + 1
            if len(s) + count * len(new) > self.limits.max_render_chars:
                raise SecurityError("replace() result would exceed the render limit")

    def _sized_filter(self, func: Callable[..., Any], arg_index: int) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for value in (*args[arg_index:], *kwargs.values()):
                self._check_size(value, f"{func.__name__} argument")
            return func(*args, **kwargs)

        return wrapper

    def _format_filter(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(value: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(value, str) and _format_too_wide(value, self.limits.max_render_chars):
                raise SecurityError("format widths must be literal and below the render limit")
            return func(value, *args, **kwargs)

        return wrapper

    def _replace_filter(self, func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(eval_ctx: Any, s: Any, old: Any, new: Any, *args: Any) -> Any:
            self._check_replace(str(s), str(old), str(new))
            return func(eval_ctx, s, old, new, *args)

        return wrapper

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        # Every for-loop iterates through the step budget; this is why the AST is rewritten.
        for loop in tree.find_all(nodes.For):
            loop.iter = nodes.Call(
                nodes.Name(_GUARD, "load"), [loop.iter], [], None, None, lineno=loop.lineno
            )
        return tree


class Renderer:
    """Validates template content at save time and renders compiled versions."""

    def __init__(self, limits: PromptLimits) -> None:
        self.limits = limits
        self.env = _KeelSandbox(limits)

    # --- save-time checks ------------------------------------------------------------------------
    def check(self, content: TemplateContent, resolve: Resolver, *, origin: str) -> dict[str, TemplateVersion]:
        """Refuse content that could never render safely; return the resolved includes."""
        self._check_sizes(content)
        declared = {v.name for v in content.variables}
        if content.features:
            if FEATURES in declared:
                raise TemplateInvalid(f"'{FEATURES}' holds the template's feature values; name the variable "
                                      "otherwise", param="variables")
            declared.add(FEATURES)
        for index, message in enumerate(content.messages):
            if _GUARD[:6] in message.content:
                # The loop guard is injected under a '__keel' name; a template must not shadow it.
                raise UnsafeTemplate(f"message {index + 1}: names containing '__keel' are reserved",
                                     param=f"messages[{index}].content")
            tree = self._parse(message.content, index)
            self._check_tree(tree, index)
            undeclared = meta.find_undeclared_variables(tree) - self.env.globals.keys() - declared
            if undeclared:
                names = ", ".join(sorted(undeclared))
                raise TemplateInvalid(
                    f"message {index + 1} uses undeclared variable(s) {names}: add them to 'variables' "
                    "(name, type, required, default)",
                    param=f"messages[{index}].content",
                )
        includes = self.resolve_includes(content, resolve, origin=origin)
        return includes

    def _check_sizes(self, content: TemplateContent) -> None:
        lim = self.limits
        if len(content.messages) > lim.max_messages:
            raise TemplateTooLarge(
                f"a template may have at most {lim.max_messages} messages, this one has "
                f"{len(content.messages)}",
                param="messages",
            )
        if len(content.variables) > lim.max_variables:
            raise TemplateTooLarge(
                f"a template may declare at most {lim.max_variables} variables", param="variables"
            )
        total = 0
        for index, message in enumerate(content.messages):
            total += len(message.content)
            if len(message.content) > lim.max_message_chars:
                raise TemplateTooLarge(
                    f"message {index + 1} has {len(message.content)} characters; the limit is "
                    f"{lim.max_message_chars}",
                    param=f"messages[{index}].content",
                )
        if total > lim.max_template_chars:
            raise TemplateTooLarge(
                f"the template has {total} characters in all; the limit is {lim.max_template_chars}",
                param="messages",
            )

    def _parse(self, source: str, index: int) -> nodes.Template:
        try:
            return self.env.parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateInvalid(
                f"message {index + 1}, line {exc.lineno}: Jinja syntax error: {exc.message}",
                param=f"messages[{index}].content",
            ) from None

    def _check_tree(self, tree: nodes.Template, index: int) -> None:
        param = f"messages[{index}].content"
        for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
            attr: Any = None
            if isinstance(node, nodes.Getattr):
                attr = node.attr
            elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
                attr = node.arg.value
            elif isinstance(node, nodes.Filter) and node.name == "attr" and node.args:
                arg = node.args[0]
                attr = arg.value if isinstance(arg, nodes.Const) else None
            if isinstance(attr, str) and attr.startswith("_"):
                raise UnsafeTemplate(
                    f"message {index + 1}, line {node.lineno}: access to {attr!r} is not allowed; "
                    "templates may only read variables and their public fields",
                    param=param,
                )
        depth = _nesting(tree)
        if depth > self.limits.max_nesting:
            raise TemplateInvalid(
                f"message {index + 1} nests blocks {depth} deep; the limit is {self.limits.max_nesting}: "
                "flatten the template or move parts into a partial",
                param=param,
            )
        for ref in meta.find_referenced_templates(tree):
            if ref is None:
                raise TemplateInvalid(
                    f"message {index + 1}: include/import names must be literal strings like "
                    "'disclaimer@production'",
                    param=param,
                )

    def references(self, content: TemplateContent) -> list[str]:
        refs: list[str] = []
        for index, message in enumerate(content.messages):
            for ref in meta.find_referenced_templates(self._parse(message.content, index)):
                if ref is not None and ref not in refs:
                    refs.append(ref)
        return refs

    def resolve_includes(
        self, content: TemplateContent, resolve: Resolver, *, origin: str
    ) -> dict[str, TemplateVersion]:
        """Walk the include graph once, so rendering never recurses into a cycle."""
        found: dict[str, TemplateVersion] = {}
        declared = {v.name for v in content.variables}

        def visit(current: TemplateContent, path: tuple[str, ...]) -> None:
            for ref in self.references(current):
                parse_ref(ref)  # a malformed name is a clear 400, not a 404
                try:
                    partial = resolve(ref)
                except NotFound as exc:
                    raise TemplateInvalid(f"{path[-1]} includes {ref!r}, which cannot be resolved: {exc}",
                                          param="messages") from None
                chain = " -> ".join((*path, partial.ref))
                if partial.ref in path:
                    raise TemplateInvalid(f"include cycle: {chain}", param="messages")
                if len(path) > self.limits.max_include_depth:
                    raise TemplateInvalid(
                        f"includes nest deeper than {self.limits.max_include_depth}: {chain}", param="messages"
                    )
                if len(partial.content.messages) != 1:
                    raise TemplateInvalid(
                        f"{partial.ref} has {len(partial.content.messages)} messages; only templates with "
                        "exactly one message can be included as partials",
                        param="messages",
                    )
                missing = sorted({v.name for v in partial.content.variables} - declared)
                if missing:
                    raise TemplateInvalid(
                        f"partial {partial.ref} uses variable(s) {', '.join(missing)}; declare them in "
                        f"{origin.split('@')[0]}'s variables too",
                        param="variables",
                    )
                found.setdefault(ref, partial)
                visit(partial.content, (*path, partial.ref))

        visit(content, (origin,))
        return found

    # --- hot path ---------------------------------------------------------------------------------
    def compile(
        self, content: TemplateContent, resolve: Resolver, *, version: TemplateVersion | None, origin: str
    ) -> CompiledPrompt:
        includes = self.check(content, resolve, origin=origin)
        templates = tuple(self.env.from_string(m.content) for m in content.messages)
        return CompiledPrompt(content, version, templates, includes)

    def render(self, compiled: CompiledPrompt, variables: Mapping[str, Any],
               features: Mapping[str, Any] | None = None) -> list[Message]:
        """``features``: the values of the template's features (``view:feature`` -> value), filled in by the
        server for the caller; a caller's own variables cannot set them. Missing ones render as None."""
        values = bind_variables(compiled.content, variables)
        if compiled.content.features:
            values[FEATURES] = nest_features(compiled.content.features, features or {})
        include_token = _INCLUDES.set(compiled.includes)
        steps_token = _STEPS.set([0])
        budget = self.limits.max_render_chars
        out: list[Message] = []
        try:
            for index, (message, template) in enumerate(
                zip(compiled.content.messages, compiled.templates, strict=True)
            ):
                text = self._render_one(template, values, index, budget)
                budget -= len(text)
                out.append(Message(role=message.role, content=text.strip()))
        finally:
            _STEPS.reset(steps_token)
            _INCLUDES.reset(include_token)
        return out

    def _render_one(self, template: Template, values: dict[str, Any], index: int, budget: int) -> str:
        where = f"message {index + 1}"
        parts: list[str] = []
        size = 0
        try:
            for chunk in template.generate(values):
                size += len(chunk)
                if size > budget:
                    raise TemplateTooLarge(
                        f"rendered prompt exceeds {self.limits.max_render_chars} characters at {where}",
                        param="variables",
                    )
                parts.append(chunk)
        except KeelError:
            raise
        except SecurityError as exc:
            raise UnsafeTemplate(f"{where}: the sandbox refused an operation: {exc}",
                                 param=f"messages[{index}].content") from None
        except UndefinedError as exc:
            raise TemplateRenderError(
                f"{where}: {exc}; check the variable's fields or give it a default",
                param=f"messages[{index}].content",
            ) from None
        except TemplateNotFound as exc:
            raise TemplateRenderError(f"{where}: include {exc.name!r} is not available",
                                      param=f"messages[{index}].content") from None
        except TemplateError as exc:
            raise TemplateRenderError(f"{where}: {exc}", param=f"messages[{index}].content") from None
        except RecursionError:
            raise TemplateRenderError(f"{where}: recursion too deep (a macro calling itself?)",
                                      param=f"messages[{index}].content") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as exc:
            raise TemplateRenderError(f"{where}: {type(exc).__name__}: {exc}",
                                      param=f"messages[{index}].content") from None
        return "".join(parts)


FEATURES = "features"


def nest_features(refs: list[str], values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"user_stats:ratings": 3}`` -> ``{"user_stats": {"ratings": 3}}`` (what ``{{ features.user_stats.ratings }}``
    reads); every declared reference is there, None when it has no value."""
    out: dict[str, dict[str, Any]] = {}
    for ref in refs:
        view, feature = ref.split(":", 1)
        out.setdefault(view, {})[feature] = values.get(ref)
    return out


def bind_variables(content: TemplateContent, supplied: Mapping[str, Any]) -> dict[str, Any]:
    """Check supplied values against the schema and fill in defaults."""
    declared = {v.name: v for v in content.variables}
    unknown = sorted(set(supplied) - declared.keys())
    if unknown:
        known = ", ".join(declared) or "none"
        raise VariableError(
            f"unknown variable(s) {', '.join(unknown)}; this template declares: {known}",
            param=f"variables.{unknown[0]}",
        )
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in supplied and supplied[name] is not None:
            value = supplied[name]
            if not type_matches(spec.type, value):
                raise VariableError(
                    f"variable {name!r} must be of type {spec.type}, got {_json_type(value)}",
                    param=f"variables.{name}",
                )
            values[name] = value
        elif spec.default is not None:
            values[name] = spec.default
        elif spec.required:
            hint = f" ({spec.description})" if spec.description else ""
            raise VariableError(
                f"missing required variable {name!r} of type {spec.type}{hint}", param=f"variables.{name}"
            )
        else:
            # Optional without default: None keeps `{% if name %}` working under StrictUndefined.
            values[name] = None
    return values


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _nesting(node: nodes.Node, depth: int = 0) -> int:
    deepest = depth
    elifs = {id(n) for n in node.elif_} if isinstance(node, nodes.If) else set()
    for child in node.iter_child_nodes():
        nested = isinstance(child, _BLOCKS) and id(child) not in elifs
        deepest = max(deepest, _nesting(child, depth + 1 if nested else depth))
    return deepest
