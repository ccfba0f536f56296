"""``keel batch``: batches of chat requests through the running API (the OpenAI Batch API's files and batches).

``keel batch create requests.jsonl`` uploads the file and starts the batch (``--wait`` follows its progress
to the end); ``status``, ``list``, ``cancel`` and ``results`` (writes the output and error files) do what they
say. The key (``--api-key`` / ``KEEL_API_KEY``) needs the ``chat`` scope; the batch is that key's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.common import ApiClient, Url, api_key_option, when_ago

app = typer.Typer(help="Batches: JSONL request files answered in the background.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Key = api_key_option("API key with the 'chat' scope (or KEEL_API_KEY; default: <home>/dev-api-key).")
FINAL = ("completed", "failed", "expired", "cancelled")


def _follow(api: ApiClient, batch: dict[str, Any], poll_s: float = 1.0) -> dict[str, Any]:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err) as bar:
        counts = batch["request_counts"]
        task = bar.add_task(batch["id"], total=counts["total"] or None, info=batch["status"])
        while batch["status"] not in FINAL:
            time.sleep(poll_s)
            batch = api.call("GET", f"/v1/batches/{batch['id']}")
            counts = batch["request_counts"]
            bar.update(task, completed=counts["completed"] + counts["failed"], total=counts["total"] or None,
                       info=f"{batch['status']}, {counts['failed']} failed")
    return batch


def _show(batch: dict[str, Any]) -> None:
    c = batch["request_counts"]
    console.print(f"{batch['id']}  {batch['status']}  {c['completed']}/{c['total']} answered, {c['failed']} failed  "
                  f"created {when_ago(batch['created_at'])}")
    for what in ("output_file_id", "error_file_id"):
        if batch.get(what):
            console.print(f"  {what.removesuffix('_id').replace('_', ' ')}: {batch[what]}")
    if batch.get("errors"):
        for e in batch["errors"]["data"]:
            console.print(f"  [red]{e['code']}[/red]: {e['message']}")


@app.command()
def create(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL: one request per line, "
                                                "{custom_id, method: POST, url: /v1/chat/completions, body}.")],
           wait: Annotated[bool, typer.Option("--wait", help="Follow the batch to its end.")] = False,
           url: Url = None, api_key: Key = None) -> None:
    """Upload a request file and start a batch on it."""
    api = ApiClient(url, api_key)
    with file.open("rb") as fh:
        uploaded = api.call("POST", "/v1/files", files={"file": (file.name, fh, "application/jsonl")},
                            form={"purpose": "batch"}, timeout=300)
    batch = api.call("POST", "/v1/batches", {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
    console.print(f"batch {batch['id']} started on {uploaded['id']} ({batch['request_counts']['total']} requests)")
    if wait:
        batch = _follow(api, batch)
        _show(batch)
        if batch["status"] != "completed":
            raise typer.Exit(1)


@app.command()
def status(batch_id: str, wait: Annotated[bool, typer.Option("--wait", help="Follow it to its end.")] = False,
           url: Url = None, api_key: Key = None) -> None:
    """A batch's state and counts (``--wait``: a live progress bar until it ends)."""
    api = ApiClient(url, api_key)
    batch = api.call("GET", f"/v1/batches/{batch_id}")
    if wait:
        batch = _follow(api, batch)
    _show(batch)


@app.command("list")
def list_(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20, url: Url = None,
          api_key: Key = None) -> None:
    """Recent batches."""
    rows = ApiClient(url, api_key).call("GET", "/v1/batches", params={"limit": limit})["data"]
    table = Table("id", "status", "answered", "failed", "total", "created")
    for b in rows:
        c = b["request_counts"]
        table.add_row(b["id"], b["status"], str(c["completed"]), str(c["failed"]), str(c["total"]),
                      when_ago(b["created_at"]))
    console.print(table if rows else "no batches")


@app.command()
def cancel(batch_id: str, url: Url = None, api_key: Key = None) -> None:
    """Stop a batch at its next request; what finished is kept in its output file."""
    _show(ApiClient(url, api_key).call("POST", f"/v1/batches/{batch_id}/cancel"))


@app.command()
def results(batch_id: str, out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into.")] = Path("."),
            url: Url = None, api_key: Key = None) -> None:
    """Write a finished batch's output and error files (``<batch>_output.jsonl``, ``<batch>_error.jsonl``)."""
    api = ApiClient(url, api_key)
    batch = api.call("GET", f"/v1/batches/{batch_id}")
    if batch["status"] not in FINAL:
        err.print(f"batch {batch_id} is {batch['status']}; wait for it (keel batch status {batch_id} --wait)")
        raise typer.Exit(1)
    out.mkdir(parents=True, exist_ok=True)
    for what in ("output", "error"):
        fid = batch.get(f"{what}_file_id")
        if fid:
            path = out / f"{batch_id}_{what}.jsonl"
            path.write_bytes(api.call("GET", f"/v1/files/{fid}/content", raw=True, timeout=300))
            console.print(f"{what}: {path}")
