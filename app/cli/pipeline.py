"""``keel pipeline``: continuous-training pipelines through the running API.

``list`` shows the definitions with their last run; ``start NAME`` starts a run now; ``runs`` lists runs; ``show
RUN`` draws a run's steps (``--watch`` follows it until it ends or waits for approval, ``--logs`` prints each
step's log); ``approve``/``reject`` answer a run waiting for approval; ``cancel`` stops a run and what it started;
``retry`` resumes a run that failed on an error. The key (``--api-key`` / ``KEEL_API_KEY``) needs ``finetune``;
approve, reject and cancel also need ``releases``.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from app.cli.common import ApiClient, Url, api_key_option, when_ago

app = typer.Typer(help="Continuous training: pipelines and their runs.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Key = api_key_option("API key with the 'finetune' scope (approve/reject/cancel: also 'releases'; or KEEL_API_KEY).")
Reason = Annotated[str, typer.Option(help="Why: recorded with the run in its audit trail.")]

_COLORS = {"pending": "dim", "queued": "dim", "running": "cyan", "waiting": "yellow", "succeeded": "green",
           "failed": "red", "skipped": "dim", "cancelled": "magenta"}
_OPEN = ("queued", "running")


def _state(state: str, outcome: str | None = None) -> str:
    color = _COLORS.get(state, "white")
    return f"[{color}]{state}[/{color}]" + (f" ({escape(outcome)})" if outcome else "")


def _duration(step: dict[str, Any]) -> str:
    if not step.get("started_at"):
        return ""
    end = step.get("finished_at") or time.time()
    s = max(0.0, end - step["started_at"])
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _artifacts(step: dict[str, Any]) -> str:
    a = step.get("artifacts") or {}
    keys = ("job_id", "model", "version", "candidate", "release", "status", "production", "records")
    parts = [f"{k}={a[k]}" for k in keys if a.get(k) not in (None, "")]
    if "snapshot" in a:
        parts.append(f"records={a['snapshot'].get('records')} sha256={str(a['snapshot'].get('sha256'))[:12]}")
    if "gate" in a:
        parts.append(f"gate={'passed' if a['gate'].get('passed') else 'refused'}")
    return escape(", ".join(parts))


def _show(run: dict[str, Any], *, logs: bool = False) -> None:
    console.print(f"[bold]{run['id']}[/bold]  pipeline {escape(run['pipeline'])} ({escape(run['model'])})  "
                  f"{_state(run['state'], run.get('outcome'))}  started {when_ago(run['created_at'])} by "
                  f"{escape(run['created_by'])}")
    t = run.get("trigger") or {}
    console.print(f"  trigger: {escape(str(t.get('kind')))}"
                  + (f" — {escape(str(t['reason']))}" if t.get("reason") else ""))
    table = Table("step", "state", "tries", "took", "what it made", box=None, pad_edge=False)
    for s in run["steps"]:
        table.add_row(("→ " if s["name"] == run.get("current_step") and run["state"] not in ("succeeded",) else "  ")
                      + s["name"], _state(s["state"]), str(s["attempts"] or ""), _duration(s), _artifacts(s))
    console.print(table)
    for s in run["steps"]:
        if s.get("error"):
            console.print(f"  [red]{s['name']}[/red]: {escape(s['error'])}")
    if run.get("decision"):
        d = run["decision"]
        console.print(f"  decision: {'approved' if d['approved'] else 'rejected'} by {escape(d['by'])}"
                      + (f": {escape(d['reason'])}" if d.get("reason") else ""))
    if run["state"] == "waiting":
        console.print(f"  [yellow]waiting for approval:[/yellow] keel pipeline approve {run['id']}  |  "
                      f"keel pipeline reject {run['id']} --reason ...")
    if logs:
        for s in run["steps"]:
            if s.get("log"):
                console.rule(s["name"])
                console.print(escape(s["log"].rstrip()))


@app.command("list")
def list_(url: Url = None, api_key: Key = None) -> None:
    """The pipelines (definitions) and their last run."""
    body = ApiClient(url, api_key).call("GET", "/v1/pipelines")
    table = Table("pipeline", "model", "triggers", "canary", "approval", Column("last run", no_wrap=True))
    for p in body["data"]:
        last = p.get("last_run")
        trig = (", ".join(t["kind"] for t in p["triggers"]) or "by hand") + (" (paused)" if p.get("paused") else "")
        table.add_row(p["name"], p["model"], trig, p.get("canary") or "-", p["approval"],
                      f"{last['id']}\n{_state(last['state'], last.get('outcome'))}" if last else "-")
    console.print(table if body["data"] else "no pipelines")
    for path, message in (body.get("errors") or {}).items():
        err.print(f"[red]{escape(path)}[/red]: {escape(message)}")


@app.command()
def start(name: str, reason: Reason = "",
          watch: Annotated[bool, typer.Option("--watch", help="Follow the run.")] = False,
          url: Url = None, api_key: Key = None) -> None:
    """Start a run of pipeline NAME now (a person's start ignores the cooldown)."""
    api = ApiClient(url, api_key)
    run = api.call("POST", f"/v1/pipelines/{name}/runs", {"reason": reason})
    console.print(f"run {run['id']} of {name} started")
    if watch:
        _watch(api, run["id"])
    else:
        console.print(f"  follow it: keel pipeline show {run['id']} --watch")


@app.command()
def runs(pipeline: Annotated[str | None, typer.Option(help="Only this pipeline's runs.")] = None,
         state: Annotated[str | None, typer.Option(help="Only runs in this state.")] = None,
         limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
         url: Url = None, api_key: Key = None) -> None:
    """Recent runs, newest first."""
    rows = ApiClient(url, api_key).call("GET", "/v1/pipelines/runs",
                                        params={"pipeline": pipeline, "state": state, "limit": limit})["data"]
    table = Table("pipeline", "state", "step", "trigger", "started")
    table.columns.insert(0, Column("run", no_wrap=True))  # ids are copied from here: never wrapped
    for r in rows:
        table.add_row(r["id"], r["pipeline"], _state(r["state"], r.get("outcome")), r.get("current_step") or "-",
                      (r.get("trigger") or {}).get("kind", "-"), when_ago(r["created_at"]))
    console.print(table if rows else "no runs")


@app.command()
def show(run_id: str, logs: Annotated[bool, typer.Option("--logs", help="Print each step's log.")] = False,
         watch: Annotated[bool, typer.Option("--watch", help="Follow it until it ends or waits.")] = False,
         as_json: Annotated[bool, typer.Option("--json", help="The run as JSON.")] = False,
         url: Url = None, api_key: Key = None) -> None:
    """A run's steps as a graph: state, tries, time and what each made (``--logs``: their logs)."""
    api = ApiClient(url, api_key)
    if watch:
        _watch(api, run_id)
        return
    run = api.call("GET", f"/v1/pipelines/runs/{run_id}")
    if as_json:
        print(json.dumps(run, indent=2))
        return
    _show(run, logs=logs)


def _watch(api: ApiClient, run_id: str, poll_s: float = 2.0) -> None:
    seen: dict[str, int] = {}
    while True:
        run = api.call("GET", f"/v1/pipelines/runs/{run_id}")
        for s in run["steps"]:
            log = s.get("log") or ""
            if len(log) > seen.get(s["name"], 0):
                for line in log[seen.get(s["name"], 0):].splitlines():
                    console.print(f"[dim]{s['name']:>9}[/dim] {escape(line)}")
                seen[s["name"]] = len(log)
        if run["state"] not in _OPEN:
            _show(run)
            if run["state"] == "failed":
                raise typer.Exit(1)
            return
        time.sleep(poll_s)


@app.command()
def approve(run_id: str, reason: Reason = "", url: Url = None, api_key: Key = None) -> None:
    """Approve a waiting run: its canary goes to 100% and the adapter becomes production."""
    run = ApiClient(url, api_key).call("POST", f"/v1/pipelines/runs/{run_id}/approve", {"reason": reason})
    console.print(f"run {run['id']} approved; it continues (keel pipeline show {run['id']} --watch)")


@app.command()
def reject(run_id: str, reason: Reason = "", url: Url = None, api_key: Key = None) -> None:
    """Reject a waiting run: its canary rolls back and nothing is promoted."""
    run = ApiClient(url, api_key).call("POST", f"/v1/pipelines/runs/{run_id}/reject", {"reason": reason})
    console.print(f"run {run['id']} rejected")


@app.command()
def cancel(run_id: str, reason: Reason = "", url: Url = None, api_key: Key = None) -> None:
    """Stop an open run and what it started (its fine-tuning job, its canary)."""
    run = ApiClient(url, api_key).call("POST", f"/v1/pipelines/runs/{run_id}/cancel", {"reason": reason})
    _show(run)


@app.command()
def retry(run_id: str, reason: Reason = "", url: Url = None, api_key: Key = None) -> None:
    """Resume a run that failed on an error, at its failed step."""
    run = ApiClient(url, api_key).call("POST", f"/v1/pipelines/runs/{run_id}/retry", {"reason": reason})
    console.print(f"run {run['id']} resumes at {run.get('current_step')}")
