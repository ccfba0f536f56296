"""``keel agent``: run agent workflows and handle approvals from a terminal.

By default commands talk to the running Keel API (``--url``, default ``server.url``; key from
``--api-key``, ``KEEL_API_KEY`` or the dev key ``keel up`` wrote), which owns the vector store and the
model. ``--local`` runs the workflow in this process instead (builds the model router, RAG and prompt
registry from the settings; use it when no server is running). The event stream renders live either way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agents import build_agents
from app.cli.common import api_failure, dev_key, fail, settings_or_exit, unreachable
from app.core.errors import KeelError
from ingest import build_rag
from prompts.factory import build_registry

app = typer.Typer(help="Agent workflows: run, inspect runs, approve or reject paused tool calls.",
                  no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True)

Url = Annotated[str | None, typer.Option(help="Keel API URL (default: server.url from the settings).")]
Key = Annotated[str | None, typer.Option("--api-key", envvar="KEEL_API_KEY",
                                         help="API key (or KEEL_API_KEY; default: <home>/dev-api-key).")]
Local = Annotated[bool, typer.Option("--local", help="Run in this process instead of through the API.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print raw event JSON lines.")]


def _settings():
    return settings_or_exit()


class Renderer:
    """Prints wire events (dicts) as they arrive; tokens stream inline."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self.in_tokens = False
        self.last: dict[str, Any] | None = None

    def _break(self) -> None:
        if self.in_tokens:
            console.print()
            self.in_tokens = False

    def __call__(self, e: dict[str, Any]) -> None:
        self.last = e
        if self.as_json:
            print(json.dumps(e), flush=True)
            return
        t = e.get("type")
        if t == "token":
            if not self.in_tokens:
                console.print(f"[dim]  {e['node']}>[/dim] ", end="")
                self.in_tokens = True
            console.print(e["text"], end="", markup=False)
            return
        self._break()
        if t == "run.started":
            verb = "resumed" if e.get("resumed") else "started"
            console.print(f"[bold]{e['workflow']}[/bold] run [cyan]{e['run_id']}[/cyan] {verb} "
                          f"(thread {e['thread_id']})")
        elif t == "node.started":
            console.print(f"[blue]> {e['node']}[/blue]")
        elif t == "node.finished":
            console.print(f"[blue]< {e['node']}[/blue] [dim]{e['duration_ms']:.0f} ms[/dim] "
                          f"{escape(e.get('summary', ''))}")
        elif t == "tool.call":
            console.print(f"  [magenta]tool[/magenta] {e['tool']} {escape(json.dumps(e['args']))}")
        elif t == "tool.result":
            color = "green" if e["ok"] else "red"
            out = e["output"].replace("\n", " ")
            console.print(f"  [{color}]result[/{color}] {escape(out[:200])}")
        elif t == "interrupt":
            console.print(f"[yellow bold]paused:[/yellow bold] {e['tool']} {escape(json.dumps(e['args']))} needs "
                          f"approval ({escape(e.get('reason', ''))})\n  keel agent approve {e['run_id']}   |   "
                          f"keel agent reject {e['run_id']} --reason ...")
        elif t == "final":
            console.print(f"\n[bold green]answer[/bold green] ({e['status']}): {escape(e['answer'])}")
            for c in e.get("citations", []):
                mark = escape(f"[{c['index']}]")
                console.print(f"  {mark} {escape(c['label'])} [dim]{escape(c['source'])}[/dim]")
        elif t == "error":
            console.print(f"[red bold]error[/red bold] ({e['code']}): {escape(e['message'])}")


# -- transports ---------------------------------------------------------------------------------


def _http_events(url: str, key: str | None, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    import httpx

    key = key or dev_key(_settings().home)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as client, client.stream(
                "POST", url.rstrip("/") + path, json=body, headers=headers) as r:
            if r.status_code != 200:
                r.read()
                raise api_failure(r)
            for line in r.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:].strip())
    except httpx.HTTPError as e:
        raise unreachable(url, e, " or use --local") from e


def _http_get(url: str, key: str | None, path: str, params: dict[str, Any] | None = None) -> Any:
    import httpx

    key = key or dev_key(_settings().home)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(url.rstrip("/") + path, params={k: v for k, v in (params or {}).items() if v is not None},
                      headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise unreachable(url, e, " or use --local") from e
    if r.status_code != 200:
        raise api_failure(r)
    return r.json()


async def _local_service(settings):
    from app.core.metrics import Metrics  # lazy: keeps `keel --help` fast: pulls prometheus_client
    from app.llm.router import ModelRouter  # lazy: keeps `keel --help` fast: pulls httpx and tenacity
    from app.llm.routing import open_routing_table  # lazy: keeps `keel --help` fast: pulls the store and audit

    routes = open_routing_table(settings)  # the aliases deployed at run time answer here too
    router = ModelRouter(settings, Metrics(), routes=routes)
    await router.start()
    rag = build_rag(settings)
    prompts = build_registry(settings, routes=routes)  # its labels live in the routing table
    svc = build_agents(settings, router, rag, prompts)
    await svc.start()

    async def close() -> None:
        await svc.aclose()
        await router.aclose()
        routes.close()
        rag.close()
        prompts.close()

    return svc, close


def _local(make_events, render: Renderer) -> None:
    from agents.events import to_wire  # lazy: keeps `keel --help` fast: 11 slotted dataclasses, ~10 ms

    async def main() -> None:
        svc, close = await _local_service(_settings())
        try:
            seq = 0
            async for e in make_events(svc):
                render(to_wire(e, seq))
                seq += 1
        finally:
            await close()

    try:
        asyncio.run(main())
    except KeelError as e:
        raise fail(e) from e


def _url(url: str | None) -> str:
    return url or _settings().server.url


def _exit_code(render: Renderer) -> None:
    if render.last and render.last.get("type") == "error":
        raise typer.Exit(1)


# -- commands -----------------------------------------------------------------------------------


@app.command()
def run(
    workflow: Annotated[str, typer.Argument(help="rag-qa, research, ...")],
    question: Annotated[str, typer.Argument(help="The question or task.")],
    thread: Annotated[str | None, typer.Option(help="Continue this thread.")] = None,
    user: Annotated[str | None, typer.Option(help="Memory namespace users/<user>.")] = None,
    team: Annotated[str | None, typer.Option(help="Also search teams/<team> memories.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="research: step budget.")] = None,
    url: Url = None, api_key: Key = None, local: Local = False, as_json: AsJson = False,
) -> None:
    """Run a workflow and watch its events live."""
    render = Renderer(as_json)
    if local:
        _local(lambda svc: svc.run(workflow, question, thread_id=thread, user=user, team=team, max_steps=max_steps),
               render)
    else:
        body = {"input": question, "thread_id": thread, "user": user, "team": team, "max_steps": max_steps}
        for e in _http_events(_url(url), api_key, f"/v1/agents/{workflow}/runs",
                              {k: v for k, v in body.items() if v is not None}):
            render(e)
    _exit_code(render)


def _resume(run_id: str, action: str, reason: str | None, args: dict | None, url, api_key, local, as_json) -> None:
    render = Renderer(as_json)
    if local:
        _local(lambda svc: svc.resume(run_id, action, reason=reason, args=args), render)
    else:
        body = {"action": action, "reason": reason, "args": args}
        for e in _http_events(_url(url), api_key, f"/v1/agents/runs/{run_id}/resume",
                              {k: v for k, v in body.items() if v is not None}):
            render(e)
    _exit_code(render)


@app.command()
def approve(run_id: str, url: Url = None, api_key: Key = None, local: Local = False, as_json: AsJson = False) -> None:
    """Approve the paused tool call of a run and continue it."""
    _resume(run_id, "approve", None, None, url, api_key, local, as_json)


@app.command()
def reject(run_id: str, reason: Annotated[str, typer.Option(help="Told to the agent.")] = "rejected by operator",
           url: Url = None, api_key: Key = None, local: Local = False, as_json: AsJson = False) -> None:
    """Reject the paused tool call (the agent sees the reason) and continue the run."""
    _resume(run_id, "reject", reason, None, url, api_key, local, as_json)


@app.command()
def edit(run_id: str, args: Annotated[str, typer.Argument(help="New tool arguments as JSON.")],
         url: Url = None, api_key: Key = None, local: Local = False, as_json: AsJson = False) -> None:
    """Run the paused tool call with edited arguments."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as e:
        err.print(f"[red]args is not JSON:[/red] {e}")
        raise typer.Exit(2) from e
    _resume(run_id, "edit", None, parsed, url, api_key, local, as_json)


def _runs_local(**kw: Any) -> list[dict[str, Any]]:
    from agents.runs import open_run_store  # lazy: keeps `keel --help` fast: only --local reads the run store

    settings = _settings()
    store = open_run_store(settings.agents, settings.home)
    try:
        return [r.to_dict() for r in store.list(**kw)]
    finally:
        store.close()


@app.command()
def runs(status: Annotated[str | None, typer.Option(help="interrupted, completed, ...")] = None,
         workflow: str | None = None, limit: int = 20, url: Url = None, api_key: Key = None,
         local: Local = False) -> None:
    """List recent runs."""
    if local:
        data = _runs_local(status=status, workflow=workflow, limit=limit)
    else:
        data = _http_get(_url(url), api_key, "/v1/agents/runs",
                         {"status": status, "workflow": workflow, "limit": limit})["data"]
    table = Table("run", "workflow", "status", "steps", "ms", "question")
    for r in data:
        table.add_row(r["run_id"], r["workflow"], r["status"], str(len(r["steps"])),
                      f"{r['duration_ms']:.0f}" if r.get("duration_ms") else "-", escape(r["question"][:60]))
    console.print(table)


@app.command()
def show(run_id: str, url: Url = None, api_key: Key = None, local: Local = False) -> None:
    """Show one run: status, answer, pending approval, steps with timings."""
    if local:
        found = [r for r in _runs_local(limit=100_000) if r["run_id"] == run_id]
        if not found:
            err.print(f"[red]no run {run_id}[/red]")
            raise typer.Exit(1)
        r = found[0]
    else:
        r = _http_get(_url(url), api_key, f"/v1/agents/runs/{run_id}")
    console.print(f"[bold]{r['run_id']}[/bold] {r['workflow']} [cyan]{r['status']}[/cyan] thread {r['thread_id']}")
    console.print(f"question: {escape(r['question'])}")
    if r.get("answer"):
        console.print(f"answer: {escape(r['answer'])}")
    if r.get("pending"):
        console.print(f"[yellow]pending:[/yellow] {r['pending'].get('tool')} "
                      f"{escape(json.dumps(r['pending'].get('args')))}")
    if r.get("error"):
        console.print(f"[red]error:[/red] {escape(r['error'])}")
    table = Table("step", "node", "ms", "summary")
    for s in r["steps"]:
        table.add_row(str(s["step"]), s["node"], f"{s['duration_ms']:.0f}", escape(s.get("summary", "")[:80]))
    console.print(table)


@app.command()
def approvals(url: Url = None, api_key: Key = None) -> None:
    """Runs waiting for a human decision."""
    data = _http_get(_url(url), api_key, "/v1/agents/approvals")["data"]
    table = Table("run", "workflow", "tool", "args", "question")
    for a in data:
        table.add_row(a["run_id"], a["workflow"], a["tool"] or "", json.dumps(a["args"])[:60], a["question"][:50])
    console.print(table)


@app.command()
def workflows(url: Url = None, api_key: Key = None, local: Local = False) -> None:
    """List workflows."""
    if local:
        from agents.registry import default_registry  # lazy: keeps `keel --help` fast: only --local needs it

        data = [w.info() for w in default_registry().list()]
    else:
        data = _http_get(_url(url), api_key, "/v1/agents/workflows")["data"]
    for w in data:
        console.print(f"[bold]{w['name']}[/bold]: {w['description']}")
