"""``keel traces`` and ``keel lineage``: what the running API recorded about the requests it served.

``keel traces list`` and ``keel traces show`` read the embedded trace store through the API (``GET /v1/traces``;
the key needs the ``monitor`` scope, as traces span every key's requests). ``keel lineage`` reads what produced one
answer (``GET /v1/lineage/{completion_id}``: ``chat`` reads the answers that key received, ``admin`` any). The URL
and key are resolved as every ``keel`` sub-command resolves them: ``--url`` (default ``server.url``), ``--api-key``
or ``KEEL_API_KEY``, else the dev key ``keel up`` wrote. The Traces page (``/traces``) shows the same records.

``traces_app`` is the ``keel traces`` group; ``lineage`` is a plain command (``keel lineage``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from app.cli.common import ApiClient, Url, api_key_option, when_ago

traces_app = typer.Typer(help="Traces of the running API: list recent ones, show one as a waterfall.",
                         no_args_is_help=True)
console = Console(highlight=False)

AdminKey = api_key_option("API key with the 'monitor' scope (or KEEL_API_KEY; default: <home>/dev-api-key).")
ChatKey = api_key_option("The key that received the answer ('chat'), or an 'admin' key (or KEEL_API_KEY; default: "
                         "<home>/dev-api-key).")
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead.")]

_KIND_STYLES = {"SERVER": "blue", "CLIENT": "magenta", "INTERNAL": "green", "PRODUCER": "yellow",
                "CONSUMER": "yellow"}
_BAR = "█"


# -- the API ---------------------------------------------------------------------------------------------


def _path_part(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


# -- formatting ------------------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 10:
        return f"{x:.2f} ms"
    if x < 1000:
        return f"{x:.1f} ms" if x < 100 else f"{x:.0f} ms"
    if x < 60_000:
        return f"{x / 1000:.2f} s"
    s = round(x / 1000)
    return f"{s // 60} min {s % 60} s"


def _when_ns(ns: int | None) -> str:
    if not ns:
        return "-"
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _value(v: Any) -> str:
    if isinstance(v, list):
        return ", ".join(json.dumps(x) if isinstance(x, dict | list) else str(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v)
    return str(v)


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data))


# -- keel traces list --------------------------------------------------------------------------------------


@traces_app.command("list")
def traces_list(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="How many traces, newest first.")] = 20,
    name: Annotated[str | None, typer.Option(help="Only traces with a span whose name contains this "
                                                  "(keel.chat, keel.job, chat <model>...).")] = None,
    response_id: Annotated[str | None, typer.Option(help="Only the trace of this chat completion id.")] = None,
    before_ns: Annotated[int | None, typer.Option(help="Page back: traces that started before this "
                                                       "(the last start_ns of the previous page).")] = None,
    as_json: AsJson = False,
    url: Url = None,
    api_key: AdminKey = None,
) -> None:
    """Recent traces: root span, start, duration, spans, errors and the chat completion id."""
    data = ApiClient(url, api_key).call("GET", "/v1/traces", params={
        "limit": limit, "name": name, "response_id": response_id, "before_ns": before_ns})["data"]
    if as_json:
        _print_json(data)
        return
    if not data:
        filtered = " matching the filters" if name or response_id or before_ns else ""
        console.print(f"no traces{filtered} (requests are traced while otel.enabled and otel.store are on)")
        return
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("trace id", no_wrap=True)  # whole, to copy into `keel traces show`
    table.add_column("root", overflow="fold")
    table.add_column("started", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("spans", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("completion id", overflow="fold")
    today = datetime.now().date()
    for t in data:
        errors = int(t.get("errors") or 0)
        started = datetime.fromtimestamp(t["start_ns"] / 1e9) if t.get("start_ns") else None
        when = "-" if started is None else started.strftime("%H:%M:%S" if started.date() == today else
                                                            "%Y-%m-%d %H:%M:%S")
        table.add_row(t["trace_id"], escape(t.get("root") or "(root span still open)"), when,
                      _ms(t.get("duration_ms")), str(t.get("spans")),
                      f"[red]{errors}[/red]" if errors else "0", escape(t.get("response_id") or ""))
    console.print(table)
    if len(data) == limit:
        more = "".join(f" --{k} {escape(str(v))}" for k, v in (("name", name), ("response-id", response_id)) if v)
        console.print(f"[dim]older: keel traces list --before-ns {data[-1]['start_ns']}{more}[/dim]")


# -- keel traces show --------------------------------------------------------------------------------------


@dataclass
class _Node:
    span: dict[str, Any]
    depth: int = 0
    parent: _Node | None = None
    children: list[_Node] = field(default_factory=list)


def span_tree(spans: list[dict[str, Any]]) -> list[_Node]:
    """The spans depth-first in start order, each with its depth; a span whose parent is not in the trace (the
    caller's, another service's) is a root."""
    nodes = {s["span_id"]: _Node(s) for s in spans}
    roots = []
    for node in nodes.values():
        parent = nodes.get(node.span.get("parent_id") or "")
        if parent is not None and parent is not node:
            node.parent = parent
            parent.children.append(node)
        else:
            roots.append(node)
    out: list[_Node] = []
    seen: set[str] = set()

    def walk(node: _Node, depth: int) -> None:
        if node.span["span_id"] in seen:
            return
        seen.add(node.span["span_id"])
        node.depth = depth
        out.append(node)
        node.children.sort(key=lambda n: (n.span["start_ns"], n.span["name"]))  # the tree guides read this order
        for child in node.children:
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda n: (n.span["start_ns"], n.span["name"])):
        walk(root, 0)
    for node in nodes.values():  # caught in a parent cycle: still shown
        if node.span["span_id"] not in seen:
            walk(node, 0)
    return out


def _prefixes(rows: list[_Node]) -> list[tuple[str, str]]:
    """Tree guides per row: the prefix of the span's line and of the lines under it."""
    out = []
    for node in rows:
        guides, p = [], node
        while p.parent is not None:
            siblings = p.parent.children
            guides.append(p is siblings[-1])
            p = p.parent
        guides.reverse()  # from the outermost ancestor to the span itself
        head = "".join("   " if last else "│  " for last in guides[:-1])
        if guides:
            line = head + ("└─ " if guides[-1] else "├─ ")
            under = head + ("   " if guides[-1] else "│  ")
        else:
            line = under = ""
        out.append((line, under + ("│  " if node.children else "   ")))
    return out


def key_attributes(span: dict[str, Any]) -> str:
    """The few attributes that say what a span did, on one line."""
    a = span.get("attributes") or {}
    parts: list[str] = []

    def add(label: str, key: str, fmt=str) -> None:
        if a.get(key) not in (None, "", []):
            parts.append(f"{label} {fmt(a[key])}" if label else fmt(a[key]))

    if span.get("status") == "ERROR":
        parts.append(f"ERROR: {span.get('status_message') or a.get('error.type') or 'no message'}")
    if span.get("kind") == "CLIENT" and a.get("gen_ai.operation.name"):
        add("model", "gen_ai.request.model")
        if a.get("gen_ai.usage.input_tokens") is not None:
            parts.append(f"tokens {a['gen_ai.usage.input_tokens']}→{a.get('gen_ai.usage.output_tokens', '?')}")
        add("ttft", "keel.ttft_ms", _ms)
        add("finish", "gen_ai.response.finish_reasons", _value)
        add("alias", "keel.model_alias")
        add("adapter", "keel.adapter")
        if a.get("gen_ai.input.messages"):
            parts.append("messages captured")
        return " · ".join(parts)
    name = span.get("name", "")
    if name == "keel.chat":
        add("model", "keel.model")
        add("release", "keel.release")
        add("variant", "keel.release.variant")
        add("answer", "gen_ai.response.id")
        add("prompt", "keel.prompt.ref")
        add("policy", "keel.guardrails.policy")
        first = next((e for e in span.get("events") or () if e.get("name") == "first_token"), None)
        if first and span.get("start_ns"):
            parts.append(f"first token +{_ms((first['at_ns'] - span['start_ns']) / 1e6)}")
    elif name.startswith("keel.guardrails"):
        add("policy", "keel.guardrails.policy")
        add("stage", "keel.guardrails.stage")
        if a.get("keel.guardrails.blocked"):
            parts.append("BLOCKED")
        verdicts = []
        for e in span.get("events") or ():
            if e.get("name") == "guardrail.verdict":
                ea = e.get("attributes") or {}
                action = ea.get("keel.guardrails.action")
                verdicts.append(f"{ea.get('keel.guardrails.validator')}={ea.get('keel.guardrails.verdict')}"
                                + (f"/{action}" if action and action != "none" else ""))
        if verdicts:
            parts.append("verdicts " + ", ".join(verdicts))
    elif name == "keel.rag.retrieve":
        add("collection", "keel.rag.collection")
        add("chunks", "keel.rag.chunks")
        scores = a.get("keel.rag.scores") or []
        if scores:
            parts.append(f"best score {max(scores):.4f}")
    elif name == "keel.prompt.render":
        add("prompt", "keel.prompt.ref")
        add("hash", "keel.prompt.hash", lambda h: str(h)[:19] + "…" if len(str(h)) > 20 else str(h))
    elif name.startswith("keel.job"):
        add("job", "keel.job.id")
        add("attempt", "keel.job.attempt")
    elif span.get("kind") == "SERVER":
        add("status", "http.status_code")
    elif a.get("gen_ai.operation.name"):
        add("", "gen_ai.operation.name")
        add("agent", "gen_ai.agent.name")
    return " · ".join(parts)


def _bar(offset_ns: int, dur_ns: int, total_ns: int, width: int) -> str:
    start = offset_ns / total_ns * width
    end = (offset_ns + dur_ns) / total_ns * width
    first = min(width - 1, int(start))
    last = max(first + 1, min(width, round(end)))
    return " " * first + _BAR * (last - first) + " " * (width - last)


def waterfall(spans: list[dict[str, Any]], *, width: int, attributes: bool = False) -> list[Text]:
    """The trace as text: one line per span (tree, kind, start offset, duration, a bar on the trace's time axis)
    and under it the span's key attributes (all of them with ``attributes``)."""
    rows = span_tree(spans)
    if not rows:
        return []
    t0 = min(s["start_ns"] for s in spans)
    total = max(1, max(s["end_ns"] for s in spans) - t0)
    prefixes = _prefixes(rows)
    name_w = min(60, max(len(p) + len(n.span["name"]) for (p, _), n in zip(prefixes, rows, strict=True)))
    fixed = name_w + 2 + 8 + 2 + 10 + 2 + 10 + 2 + 2
    bar_w = max(10, min(60, width - fixed))
    lines = []
    head = Text(f"{'span':<{name_w}}  {'kind':<8}  {'start':>10}  {'duration':>10}  ", style="bold")
    head.append(f"|{'0':<{bar_w // 2}}{_ms(total / 1e6):>{bar_w - bar_w // 2}}|", style="bold")
    lines.append(head)
    for (prefix, under), node in zip(prefixes, rows, strict=True):
        s = node.span
        error = s.get("status") == "ERROR"
        style = "red" if error else _KIND_STYLES.get(s.get("kind") or "", "white")
        label = (prefix + s["name"])
        label = label if len(label) <= name_w else label[: name_w - 1] + "…"
        offset, dur = s["start_ns"] - t0, max(0, s["end_ns"] - s["start_ns"])
        line = Text()
        line.append(prefix, style="dim")
        line.append(label[len(prefix):], style="bold red" if error else "bold")
        line.append(" " * (name_w - len(label)) + "  ")
        line.append(f"{(s.get('kind') or '').lower():<8}", style=style)
        line.append(f"  {'+' + _ms(offset / 1e6):>10}  {_ms(dur / 1e6):>10}  |")
        line.append(_bar(offset, dur, total, bar_w), style=style)
        line.append("|")
        lines.append(line)
        details = key_attributes(s)
        if details:
            lines.append(Text(under, style="dim") + Text(details, style="red" if error else "dim"))
        if attributes:
            for k, v in sorted((s.get("attributes") or {}).items()):
                lines.append(Text(under, style="dim") + Text(f"  {k} = {_value(v)}", style="cyan"))
            for e in s.get("events") or ():
                at = _ms((e["at_ns"] - s["start_ns"]) / 1e6)
                ea = ", ".join(f"{k}={_value(v)}" for k, v in (e.get("attributes") or {}).items())
                lines.append(Text(under, style="dim") + Text(f"  event {e['name']} +{at}{' ' + ea if ea else ''}",
                                                             style="yellow"))
    return lines


@traces_app.command("show")
def traces_show(
    trace_id: Annotated[str, typer.Argument(help="32 hex digits, as `keel traces list` shows.")],
    attributes: Annotated[bool, typer.Option("--attributes", "-a", help="Every attribute and event of every "
                                                                        "span.")] = False,
    as_json: AsJson = False,
    url: Url = None,
    api_key: AdminKey = None,
) -> None:
    """One trace as a text waterfall: the span tree with start, duration, a bar on the trace's time axis and the
    attributes that matter (model, tokens, TTFT, finish reasons, guardrail verdicts, prompt, retrieval)."""
    body = ApiClient(url, api_key).call("GET", f"/v1/traces/{_path_part(trace_id)}")
    spans = body["spans"]
    if as_json:
        _print_json(body)
        return
    t0 = min(s["start_ns"] for s in spans)
    total_ms = (max(s["end_ns"] for s in spans) - t0) / 1e6
    errors = sum(1 for s in spans if s.get("status") == "ERROR")
    response = next((s["attributes"]["gen_ai.response.id"] for s in spans
                     if (s.get("attributes") or {}).get("gen_ai.response.id")), None)
    summary = (f"trace [bold]{escape(body['trace_id'])}[/bold] · {len(spans)} span{'s' if len(spans) != 1 else ''}"
               f" · {_ms(total_ms)} · started {_when_ns(t0)}"
               + (f" · [red]{errors} error{'s' if errors != 1 else ''}[/red]" if errors else ""))
    console.print(summary)
    console.print()
    for line in waterfall(spans, width=console.width, attributes=attributes):
        console.print(line, no_wrap=not attributes, overflow="ellipsis" if not attributes else "fold", crop=False)
    if response:
        console.print()
        console.print(f"[dim]lineage of the answer: keel lineage {escape(response)}[/dim]")


# -- keel lineage ----------------------------------------------------------------------------------------------


def _grid(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for k, v in rows:
        if v not in (None, ""):
            grid.add_row(k, v if isinstance(v, Text) else escape(str(v)))
    return grid


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for c in columns:
        table.add_column(c, overflow="fold")  # ids stay whole, to copy
    return table


def _answer_panel(rec: dict[str, Any]) -> Panel:
    usage = rec.get("usage") or {}
    finish = ", ".join((rec.get("finish_reasons") or {}).values())
    outcome = rec.get("outcome") or "-"
    rows = [
        ("outcome", Text(outcome, style="green" if outcome == "ok" else "red")),
        ("model asked for", rec.get("requested_model") or rec.get("model")),
        ("created", when_ago(rec.get("created"))),
        ("latency", _ms(rec.get("latency_ms"))),
        ("tokens in / out", f"{usage['prompt_tokens']} / {usage['completion_tokens']}" if usage else None),
        ("finish reasons", finish),
        ("request id", rec.get("request_id")),
        ("trace", f"{rec['trace_id']}  (keel traces show {rec['trace_id']})" if rec.get("trace_id") else None),
    ]
    return Panel(_grid(rows), title=f"[bold]answer {escape(rec['id'])}[/bold]", title_align="left")


def _prompt_panel(rec: dict[str, Any]) -> Panel:
    p = rec.get("prompt")
    if not p:
        return Panel("[dim]no registry prompt: the messages went to the model as sent[/dim]", title="prompt",
                     title_align="left")
    parts: list[Any] = [_grid([("version", p.get("ref")), ("hash", p.get("hash"))])]
    runs = p.get("eval_runs")
    if runs:
        t = _table("suite", "result", "finished", "run")
        for r in runs:
            passed = r.get("passed")
            t.add_row(escape(str(r.get("suite"))), "[green]passed[/green]" if passed else "[red]failed[/red]"
                      if passed is False else "-", when_ago(r.get("finished_at")), escape(str(r.get("id"))))
        parts.append(t)
    elif runs is not None:
        parts.append(Text("no eval suite has run on this prompt version", style="dim"))
    return Panel(Group(*parts), title="prompt", title_align="left")


def _route_panel(rec: dict[str, Any]) -> Panel:
    r = rec.get("route")
    if not r:
        body: Any = Text("no route recorded", style="dim")
    elif r.get("workflow"):
        body = _grid([("agent workflow", r["workflow"])])
    else:
        av = r.get("adapter_version") or {}
        body = _grid([
            ("alias", r.get("alias")), ("backend", r.get("backend")), ("model", r.get("model")),
            ("adapter", r.get("adapter") or "none"),
            ("adapter version", f"{av.get('model')} v{av.get('version')}" if av else None),
            ("adapter hash", (av.get("hash") or "")[:16] or None),
            ("adapter evals", ", ".join(f"{e.get('suite')} {'passed' if e.get('passed') else 'failed'} ({e.get('id')})"
                                        for e in av.get("eval_runs") or []) or ("none" if av else None)),
            ("routing", f"{r.get('owner')}, revision {r.get('revision')}" if r.get("owner") else None),
        ])
    release = rec.get("release")
    rel = _grid([("release", release.get("name")), ("variant", release.get("variant"))]) if release else Text(
        "not served through a release", style="dim")
    return Panel(Group(body, Text(""), rel), title="route and release", title_align="left")


def _guardrails_panel(rec: dict[str, Any]) -> Panel:
    policy = (rec.get("guardrails") or {}).get("policy")
    parts: list[Any] = [_grid([("policy", policy or "none (guardrails off for this request)")])]
    events = rec.get("guardrail_events") or []
    if events:
        t = _table("event", "validator", "reason")
        for e in events:
            t.add_row(f"[red]{escape(str(e.get('type')))}[/red]" if e.get("type") in ("blocked", "retraction")
                      else escape(str(e.get("type"))), escape(str(e.get("validator") or "-")),
                      escape(str(e.get("reason") or _value(e.get("kinds") or ""))))
        parts.append(t)
    verdicts = rec.get("guardrail_verdicts") or []
    if verdicts:
        t = _table("stage", "validator", "verdict", "action", "score", "latency", "reason")
        for v in verdicts:
            verdict = str(v.get("verdict"))
            color = "green" if verdict == "pass" else "red" if verdict == "fail" else "yellow"
            t.add_row(escape(str(v.get("stage"))), escape(str(v.get("validator"))), f"[{color}]{escape(verdict)}"
                      f"[/{color}]", escape(str(v.get("action"))),
                      "-" if v.get("score") is None else f"{float(v['score']):.3f}", _ms(v.get("latency_ms")),
                      escape(str(v.get("reason") or "")))
        parts.append(t)
    elif policy:
        parts.append(Text("no verdict recorded for this request", style="dim"))
    return Panel(Group(*parts), title="guardrails", title_align="left")


def _passages_panel(rec: dict[str, Any]) -> Panel | None:
    passages = rec.get("retrieval")
    if passages is None:
        return None
    t = _table("#", "document", "chunk", "snapshot", "title", "score", "cited")
    for i, p in enumerate(passages, 1):
        t.add_row(str(p.get("index") or i), escape(str(p.get("doc_id") or "-")), escape(str(p.get("chunk_id") or "-")),
                  escape(str(p.get("snapshot_id") or "-")), escape(str(p.get("title") or p.get("source") or "")),
                  "-" if p.get("score") is None else f"{float(p['score']):.4f}",
                  "[green]yes[/green]" if p.get("cited") else "no")
    return Panel(t if passages else Text("retrieval found nothing", style="dim"),
                 title=f"passages ({len(passages)})", title_align="left")


def _feedback_panel(rec: dict[str, Any]) -> Panel:
    feedback = rec.get("feedback") or []
    if not feedback:
        return Panel(Text("no feedback on this answer yet", style="dim"), title="feedback", title_align="left")
    t = _table("when", "score", "comment")
    for f in feedback:
        score = float(f.get("score") or 0)
        t.add_row(when_ago(f.get("at")), f"[{'green' if score >= 0.5 else 'red'}]{score:.2f}[/]",
                  escape(str(f.get("comment") or "")))
    return Panel(t, title=f"feedback ({len(feedback)})", title_align="left")


def lineage(
    completion_id: Annotated[str, typer.Argument(help="The `id` of a chat completion (chatcmpl-...).")],
    as_json: AsJson = False,
    url: Url = None,
    api_key: ChatKey = None,
) -> None:
    """What produced an answer: prompt version and hash, model route and adapter, release variant, passages
    (document, chunk, snapshot), guardrail policy and verdicts, eval runs of the prompt, feedback."""
    rec = ApiClient(url, api_key).call("GET", f"/v1/lineage/{_path_part(completion_id)}")
    if as_json:
        _print_json(rec)
        return
    for panel in (_answer_panel(rec), _prompt_panel(rec), _route_panel(rec), _guardrails_panel(rec),
                  _passages_panel(rec), _feedback_panel(rec)):
        if panel is not None:
            console.print(panel)
