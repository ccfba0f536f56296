"""``keel features``: the feature store on this machine's Keel home (Feast).

``apply`` exports Keel's data as feature rows and registers the definitions (``lifecycle/features/definitions.py``);
``materialize`` exports again and loads the newest values into the online store (run it on a schedule: cron, a
Kubernetes CronJob); ``get`` reads values by entity key (``--user`` an API key id, ``--document`` a doc id);
``historical`` joins values point-in-time onto JSONL rows (entity keys and ``event_timestamp``), e.g. to build a
training set. These commands open the home's stores directly, like ``keel finetune``: run them where the home is.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from app.cli.common import fail, settings_or_exit
from app.core.errors import KeelError

app = typer.Typer(help="Feature store (Feast): apply, materialize, get, historical.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
Refs = Annotated[list[str], typer.Argument(help="Features as view:feature, e.g. user_stats:feedback_rate.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@contextmanager
def _service() -> Iterator[Any]:
    """The feature service over this home's lineage, feedback and ingest snapshots (closed afterwards)."""
    from ingest.manifest import SnapshotStore  # lazy: keeps `keel --help` fast: the stores load their drivers
    from lifecycle.features.export import Sources  # lazy: as above
    from lifecycle.features.service import FeatureService  # lazy: as above
    from lifecycle.lineage import open_lineage_store  # lazy: as above (numpy, the chat service's types)
    from lifecycle.releases.store import open_release_store  # lazy: as above

    settings = settings_or_exit({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    home = settings.home
    url = settings.releases.url
    try:  # an unreachable shared database (monitor.url, releases.url): one line, exit 1
        lineage = open_lineage_store(settings)
        releases = open_release_store(url.get_secret_value() if url else None, home)
    except KeelError as exc:
        raise fail(exc) from exc
    snapshots = SnapshotStore(settings.rag.db_path(home), url=settings.rag.snapshots_url)
    try:
        yield FeatureService(settings.features, home, Sources(
            lineage=lambda n: lineage.recent(limit=n), ratings=lambda: releases.ratings(limit=10_000_000),
            snapshots=snapshots))
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        lineage.close()
        releases.close()
        snapshots.close()


def _views(views: list[dict[str, Any]]) -> None:
    table = Table("view", "entity", "features", "version")
    for v in views:
        table.add_row(v["name"], ", ".join(v["entities"]), ", ".join(v["features"]), v["version"])
    console.print(table)


@app.command()
def apply(as_json: AsJson = False) -> None:
    """Export Keel's data as feature rows and register the feature definitions."""
    with _service() as svc:
        out = svc.apply()
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console.print("exported " + ", ".join(f"{k}: {v} rows" for k, v in out["exported"].items()))
    _views(out["views"])


@app.command()
def materialize(as_json: AsJson = False) -> None:
    """Export this moment's rows and load the newest values into the online store."""
    with _service() as svc:
        out = svc.materialize()
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console.print("exported " + ", ".join(f"{k}: {v} rows" for k, v in out["exported"].items())
                  + f"; online store loaded in {out['seconds']:.2f} s")


@app.command("list")
def list_() -> None:
    """The registered feature views."""
    with _service() as svc:
        _views(svc.views())


@app.command()
def get(refs: Refs, user: Annotated[str | None, typer.Option(help="An API key id (the user entity).")] = None,
        document: Annotated[str | None, typer.Option(help="A document id (the document entity).")] = None,
        as_json: AsJson = False) -> None:
    """Online values of features for one user and/or document."""
    keys = {k: v for k, v in (("user", user), ("document", document)) if v is not None}
    with _service() as svc:
        out = svc.online(refs, keys)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    table = Table("feature", "value", "version")
    for ref, value in out["values"].items():
        table.add_row(ref, "-" if value is None else str(value), out["versions"][ref.split(":")[0]])
    console.print(table)


@app.command()
def historical(refs: Refs, rows: Annotated[Path, typer.Option(exists=True, dir_okay=False, help=(
        "JSONL: one object per line with the entity keys (user_id, doc_id) and event_timestamp."))]) -> None:
    """Point-in-time join: each row with the feature values as they were at its time (JSONL to stdout)."""
    try:
        data = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        err.print(f"[red]{rows}[/red]: not JSONL ({exc})")
        raise typer.Exit(2) from None
    with _service() as svc:
        for row in svc.historical(refs, data):
            sys.stdout.write(json.dumps(row) + "\n")
