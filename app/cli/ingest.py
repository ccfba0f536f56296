"""``keel ingest``, ``keel search`` and ``keel snapshots``: typer commands the main CLI mounts.

    app.command("ingest")(ingest_command)
    app.command("search")(search_command)
    app.add_typer(snapshots_app, name="snapshots")
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.common import api_failure, dev_key, fail, settings_or_exit, unreachable
from app.core.errors import KeelError
from ingest import build_rag
from ingest.errors import StoreLocked

if TYPE_CHECKING:
    import httpx

    from app.settings import Settings
    from ingest.factory import RagServices

T = TypeVar("T")
console = Console()
err = Console(stderr=True)
snapshots_app = typer.Typer(help="Ingest snapshots: list, show, diff.", no_args_is_help=True)

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
_FILTER = re.compile(r"^([A-Za-z_][\w.]*)\s*(>=|<=|>|<|=)\s*(.+)$")


def _services():
    settings = settings_or_exit(_OFFLINE)
    return settings, build_rag(settings)


def _local_or_api(doing: str, api_key: str | None, local: Callable[[Settings, RagServices], T],
                  via_api: Callable[[str, str | None], T]) -> T:
    """``local`` over the store opened here or, when a running ``keel serve`` holds the embedded store,
    ``via_api(server_url, key)`` through that API (key: --api-key / KEEL_API_KEY, else the dev key).

    The embedded engine lets one process open a store folder; the API serves the same store from its own
    process, so every command that opens the store goes through here and still works while it runs."""
    settings, rag = _services()
    try:
        return local(settings, rag)
    except StoreLocked as exc:
        server = settings.server.url
        if not _api_up(server):
            raise fail(exc) from exc
        err.print(f"[yellow]the store is held by the Keel API at {server}; {doing} through it[/yellow]")
        return via_api(server, api_key or dev_key(settings.home))
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        rag.close()


def _api_client(url: str, key: str | None) -> httpx.Client:
    import httpx

    if not key:
        err.print(f"[red]error (unauthorized):[/red] an API key is needed to use the Keel API at {escape(url)}: "
                  "pass --api-key or set KEEL_API_KEY")
        raise typer.Exit(1)
    return httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=30)


def _call_api(url: str, key: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """One request to the Keel API; its JSON, or the API's error as one line and exit 1."""
    import httpx

    try:
        with _api_client(url, key) as client:
            r = client.request(method, path, **kwargs)
    except httpx.HTTPError as e:
        raise unreachable(url, e) from e
    if not r.is_success:
        raise api_failure(r)
    return r.json()


def parse_filters(items: list[str] | None) -> dict[str, Any] | None:
    """``lang=en``, ``tag=a,b`` (any of), ``page>=3`` / ``page<5`` (ranges; repeat to combine)."""
    if not items:
        return None
    out: dict[str, Any] = {}
    ops = {">=": "gte", "<=": "lte", ">": "gt", "<": "lt"}
    for item in items:
        m = _FILTER.match(item.strip())
        if not m:
            raise typer.BadParameter(f"{item!r}: use key=value, key=a,b or key>=number", param_hint="--filter")
        key, op, raw = m.groups()
        if op == "=":
            values = [_scalar(v.strip()) for v in raw.split(",")]
            out[key] = values if len(values) > 1 else values[0]
        else:
            try:
                bound = float(raw)
            except ValueError:
                raise typer.BadParameter(f"{item!r}: a range bound must be a number",
                                         param_hint="--filter") from None
            rng = out.setdefault(key, {})
            if not isinstance(rng, dict):
                raise typer.BadParameter(f"{key!r} given both as a value and a range", param_hint="--filter")
            rng[ops[op]] = bound
    return out


def _scalar(v: str) -> str | int | bool:
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if v in ("true", "false"):
        return v == "true"
    return v


def ingest_command(
    paths: Annotated[list[str], typer.Argument(help="Files, folders (recursive) or quoted globs ('docs/**/*.md').")],
    collection: Annotated[str | None, typer.Option("--collection", "-c", help="Target collection.")] = None,
    prune: Annotated[bool, typer.Option(help="Remove chunks of documents under PATHS whose files are gone.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    url: Annotated[str | None, typer.Option(help="Ingest through this running Keel API (admin key) instead of "
                                                 "opening the store here. Used automatically when a local API "
                                                 "holds the embedded store.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="KEEL_API_KEY",
                                                help="Admin key for --url (default: <home>/dev-api-key).")] = None,
) -> None:
    """Load, chunk, embed and store documents; unchanged files are skipped, changed ones replaced."""
    if url:
        settings = settings_or_exit(_OFFLINE)
        _report(*_ingest_via_api(url, api_key or dev_key(settings.home), paths, collection, prune, json_out),
                json_out)
        return

    def local(settings: Settings, rag: RagServices) -> tuple[str, str | None, dict[str, Any], list[dict[str, Any]]]:
        col = collection or settings.rag.collection
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[chunks]} chunks"), TimeElapsedColumn(), TextColumn("{task.fields[file]}"))
        with Progress(*columns, console=err, transient=True, disable=json_out) as bar:
            task = bar.add_task("loading model", total=None, chunks=0, file="")
            rag.warm_up()
            bar.update(task, description="ingesting")

            def on_progress(p) -> None:
                bar.update(task, total=p.files_total, completed=p.files_done, chunks=p.chunks_written,
                           file=Path(p.current).name if p.current else "")

            result = rag.pipeline.run(paths, col, prune=prune, progress=on_progress)
        return col, result.snapshot_id, result.counts, result.rejections

    _report(*_local_or_api("ingesting", api_key, local, lambda server, key: _ingest_via_api(
        server, key, paths, collection, prune, json_out)), json_out)


def _report(col: str, snapshot_id: str | None, counts: dict[str, Any], rejections: list[dict[str, Any]],
            json_out: bool) -> None:
    if json_out:
        console.print_json(json.dumps({"snapshot_id": snapshot_id, "collection": col, **counts,
                                       "rejections": rejections}))
    else:
        table = Table(title=f"ingest into '{col}' - snapshot {snapshot_id}")
        table.add_column("documents", style="bold")
        table.add_column("count", justify="right")
        for key in ("added", "updated", "unchanged", "deleted", "rejected", "repaired"):
            table.add_row(key, str(counts[key]))
        table.add_section()
        table.add_row("chunks written", str(counts["chunks_written"]))
        reused = counts.get("chunks_reused") or 0
        if reused:
            table.add_row("  of which kept their vectors", str(reused))
        table.add_row("chunks in collection", str(counts["chunks_total"]))
        table.add_row("documents in collection", str(counts["documents_total"]))
        embed_s = counts.get("embed_seconds") or 0.0
        rate = (counts["chunks_written"] - reused) / embed_s if embed_s else 0.0
        table.add_row("time", f"{counts['seconds']:.1f} s ({rate:.0f} chunks/s embedding)")
        console.print(table)
        if rejections:
            rej = Table(title="rejected", title_style="red")
            for col_name in ("source", "where", "reason", "message"):
                rej.add_column(col_name, overflow="fold")
            for r in rejections:
                rej.add_row(r["source"], r.get("location") or "", r["code"], r["message"])
            console.print(rej)
    if rejections:
        raise typer.Exit(3)  # partial success: scripts can tell it apart from a failure (1)


def _api_up(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url.rstrip("/") + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ingest_via_api(url: str, key: str | None, paths: list[str], collection: str | None, prune: bool,
                    json_out: bool) -> tuple[str, str | None, dict[str, Any], list[dict[str, Any]]]:
    """Submit server-side paths (the API runs on this machine: it holds this store) and follow the job
    (an admin key: the server reads its own disk)."""
    import time

    import httpx

    # Relative paths and globs are resolved here, where the user typed them, not in the server's cwd.
    absolute = [p if Path(p).is_absolute() else str(Path.cwd() / p) for p in paths]
    body: dict[str, Any] = {"paths": absolute, "prune": prune}
    if collection:
        body["collection"] = collection
    try:
        with _api_client(url, key) as client:
            r = client.post("/v1/ingest/paths", json=body)
            if r.status_code != 202:
                raise api_failure(r)
            job = r.json()
            columns = (TextColumn("[bold]ingesting via API"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[chunks]} chunks"), TimeElapsedColumn())
            with Progress(*columns, console=err, transient=True, disable=json_out) as bar:
                task = bar.add_task("", total=None, chunks=0)
                while job["state"] in ("queued", "running"):
                    r = client.get(f"/v1/ingest/jobs/{job['id']}", params={"wait_s": 1})
                    if r.status_code != 200:
                        raise api_failure(r)
                    job = r.json()
                    bar.update(task, total=job["files_total"] or None, completed=job["files_done"],
                               chunks=job["chunks_written"])
                    if job["state"] in ("queued", "running"):
                        time.sleep(0.2)
    except httpx.HTTPError as e:
        raise unreachable(url, e) from e
    if job["state"] == "cancelled":
        err.print(f"[yellow]ingest job {escape(job['id'])} was cancelled; what it wrote before is kept[/yellow]")
        raise typer.Exit(1)
    if job["state"] != "succeeded":
        e = job.get("error") or {}
        err.print(f"[red]error ({escape(str(e.get('code', 'failed')))}):[/red] {escape(str(e.get('message', '')))}")
        raise typer.Exit(1)
    return job["collection"], job["snapshot_id"], job["counts"], job["rejections"]


def search_command(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    collection: Annotated[str | None, typer.Option("--collection", "-c")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, max=100)] = None,
    filter_: Annotated[list[str] | None, typer.Option("--filter", "-f", help="key=value, key=a,b, key>=n; "
                                                      "repeat to combine.")] = None,
    mmr: Annotated[bool | None, typer.Option("--mmr/--no-mmr", help="Diversify results.")] = None,
    threshold: Annotated[float | None, typer.Option(help="Minimum fused (RRF) score.")] = None,
    per_document: Annotated[bool, typer.Option("--per-document", help="One result (the best chunk) per "
                                               "document: --top-k then counts documents, not chunks.")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
    url: Annotated[str | None, typer.Option(help="Search through this running Keel API instead of opening the "
                                                 "store here. Used automatically when a local API holds the "
                                                 "embedded store.")] = None,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="KEEL_API_KEY",
                                                help="API key for the API (default: <home>/dev-api-key).")] = None,
) -> None:
    """Hybrid (dense + BM25) search with citations."""
    from ingest.retriever import RetrievalResult  # lazy: keeps `keel --help` fast: pulls numpy

    filters = parse_filters(filter_)
    group_by = "document" if per_document else None

    def local(settings: Settings, rag: RagServices) -> RetrievalResult:
        return rag.retriever.retrieve(query, collection=collection or settings.rag.collection, top_k=top_k,
                                      filters=filters, mmr=mmr, score_threshold=threshold, group_by=group_by)

    def via_api(server: str, key: str | None) -> RetrievalResult:
        body = {"query": query, "collection": collection, "top_k": top_k, "filters": filters, "mmr": mmr,
                "score_threshold": threshold, "group_by": group_by}
        return RetrievalResult.model_validate(_call_api(server, key, "POST", "/v1/retrieve", json=body))

    if url:
        settings = settings_or_exit(_OFFLINE)
        res = via_api(url, api_key or dev_key(settings.home))
    else:
        res = _local_or_api("searching", api_key, local, via_api)
    if json_out:
        console.print_json(res.model_dump_json())
        return
    if not res.chunks:
        console.print("[yellow]no results[/yellow]")
        return
    for i, ch in enumerate(res.chunks, start=1):
        c = ch.citation
        where = f"{c.source}:{c.char_start}-{c.char_end}" + (f" (page {c.page})" if c.page else "")
        console.rule(f"[bold]{i}. {c.label()}[/bold]  score {ch.score:.4f}", align="left")
        console.print(f"[dim]{where}  snapshot {c.snapshot_id}[/dim]")
        text = ch.text if len(ch.text) < 700 else ch.text[:700] + " ..."
        console.print(text, markup=False, highlight=False)
    rerank = f", {res.reranker} {res.rerank_ms:.0f}" if res.reranker else ""
    console.print(f"[dim]{len(res.chunks)} results in {res.took_ms:.0f} ms (query embedding {res.embed_ms:.0f}, "
                  f"search {res.search_ms:.0f}{rerank})[/dim]")


@snapshots_app.command("list")
def snapshots_list(collection: Annotated[str | None, typer.Option("--collection", "-c")] = None,
                   limit: int = 20) -> None:
    _, rag = _services()
    try:
        snaps = rag.snapshots.list(collection, limit)
    finally:
        rag.close()
    table = Table(title="ingest snapshots")
    for name in ("id", "collection", "status", "started", "added", "updated", "deleted", "rejected", "chunks"):
        table.add_column(name)
    for s in snaps:
        c = s.counts
        table.add_row(s.id, s.collection, s.status, s.started_at[:19], *(str(c.get(k, "")) for k in (
            "added", "updated", "deleted", "rejected", "chunks_total")))
    console.print(table)


@snapshots_app.command("show")
def snapshots_show(snapshot_id: str) -> None:
    _, rag = _services()
    try:
        snap = rag.snapshots.get(snapshot_id)
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        rag.close()
    console.print_json(snap.model_dump_json())


@snapshots_app.command("diff")
def snapshots_diff(base: str, target: str) -> None:
    _, rag = _services()
    try:
        d = rag.snapshots.diff(base, target)
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        rag.close()
    for label, items, style in (("added", d.added, "green"), ("removed", d.removed, "red"),
                                ("changed", d.changed, "yellow")):
        for x in items:
            console.print(f"[{style}]{label:8}[/{style}] {x}")
    console.print(f"[dim]{d.unchanged} unchanged[/dim]")
