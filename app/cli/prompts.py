"""``keel prompts``: the registry from a terminal, on the local SQLite store."""

from __future__ import annotations

import getpass
import json
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

from app.cli.common import fail, opened, settings_or_exit
from app.core.errors import InvalidRequest
from prompts import yamlio
from prompts.factory import build_registry
from prompts.models import TemplateContent
from prompts.portable import export_dir, import_dir, version_document
from prompts.registry import PromptRegistry

app = typer.Typer(help="Prompt templates: versions, labels, rendering, export/import.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)

Actor = Annotated[str | None, typer.Option(help="Recorded in the audit log (default: cli:<user>).")]
Override = Annotated[
    str | None, typer.Option("--override-reason", help="Move protected labels even if the gate refuses (audited).")
]


def _registry() -> AbstractContextManager[PromptRegistry]:
    settings = settings_or_exit()
    return opened(lambda: build_registry(settings))



def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user database entry (containers)
        return "cli"


@app.command("list")
def list_templates(query: Annotated[str | None, typer.Argument(help="Search names and descriptions.")] = None
                   ) -> None:
    """List templates with their latest version and labels."""
    with _registry() as registry:
        table = Table("name", "latest", "labels", "description")
        for t in registry.list_templates(query):
            labels = ", ".join(f"{k}={v}" for k, v in t.labels.items())
            table.add_row(t.name, str(t.latest_version), labels, t.description)
        console.print(table)


@app.command()
def show(ref: Annotated[str, typer.Argument(help="name, name@7, name@staging or name@latest")]) -> None:
    """Print one version in the export format."""
    with _registry() as registry:
        version = registry.resolve(ref)
        console.print(Syntax(yamlio.dump(version_document(version)), "yaml", word_wrap=True))
        labels = [k for k, v in registry.labels(version.name).items() if v == version.version]
        if labels:
            console.print(f"labels: {', '.join(labels)}")


@app.command()
def render(
    ref: Annotated[str, typer.Argument(help="name, name@7, name@staging or name@latest")],
    var: Annotated[list[str] | None, typer.Option("--var", "-v", help="k=v; non-string types as JSON.")] = None,
    vars_file: Annotated[Path | None, typer.Option(help="JSON object of variables.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rendered request as JSON.")] = False,
) -> None:
    """Render a template with variables: exactly what would be sent to the model."""
    with _registry() as registry:
        content = registry.resolve(ref).content
        values: dict[str, Any] = {}
        if vars_file is not None:
            loaded = json.loads(vars_file.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise fail(InvalidRequest(f"{vars_file} must hold a JSON object of variables"))
            values.update(loaded)
        values.update(parse_vars(var or [], content))
        out = registry.render(ref, values)
        if as_json:
            console.print_json(json.dumps({
                "ref": out.ref, "hash": out.hash, "messages": [m.model_dump() for m in out.messages],
                "params": out.params.model_dump(exclude_none=True),
            }))
            return
        console.print(f"[bold]{out.ref}[/bold] {out.hash}")
        for message in out.messages:
            console.rule(message.role)
            console.print(message.content, markup=False, highlight=False)


def parse_vars(pairs: list[str], content: TemplateContent) -> dict[str, Any]:
    """``k=v`` pairs; values of non-string variables are parsed as JSON (``n=3``, ``xs=[1,2]``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise fail(InvalidRequest(f"--var {pair!r}: write it as name=value"))
        spec = content.variable(key)
        if spec is None or spec.type == "string":
            values[key] = raw
            continue
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise fail(InvalidRequest(
                f"--var {key}: {spec.type} values are JSON (e.g. 3, true, [1, 2], {{\"k\": 1}}); got {raw!r}"
            )) from None
    return values


@app.command()
def save(
    name: Annotated[str, typer.Argument()],
    file: Annotated[Path, typer.Argument(help="YAML: the template content, or a version file with 'content'.")],
    base_version: Annotated[int | None, typer.Option(help="The version you edited (omit to create).")] = None,
    message: Annotated[str, typer.Option("--message", "-m")] = "",
    actor: Actor = None,
) -> None:
    """Save a new version from a YAML file."""
    with _registry() as registry:
        doc = yamlio.load(file.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "content" in doc:
            doc = doc["content"]
        try:
            content = TemplateContent.model_validate(doc)
        except ValueError as exc:
            raise fail(InvalidRequest(f"{file}: invalid template content: {exc}")) from None
        version = registry.save(name, content, author=_actor(actor), message=message, base_version=base_version)
        console.print(f"saved [bold]{version.ref}[/bold] {version.hash}")


@app.command()
def label(
    name: Annotated[str, typer.Argument()],
    version: Annotated[int, typer.Argument()],
    label_name: Annotated[str, typer.Argument(metavar="LABEL")],
    override_reason: Override = None,
    actor: Actor = None,
) -> None:
    """Point LABEL of NAME at VERSION (protected labels pass the promotion gate)."""
    with _registry() as registry:
        move = registry.move_label(name, label_name, version, actor=_actor(actor), override_reason=override_reason)
        if not move.changed:
            console.print(f"{name}@{label_name} already points at {version}")
            return
        verdict = f" (gate: {move.verdict.reason})" if move.verdict else ""
        note = " [yellow]gate overridden[/yellow]" if move.overridden else ""
        console.print(f"{name}@{label_name}: {move.from_version} -> {move.to_version}{verdict}{note}")


@app.command()
def history(
    name: Annotated[str, typer.Argument()],
    label_name: Annotated[str | None, typer.Option("--label", help="Only this label's moves.")] = None,
    limit: int = 50,
) -> None:
    """The audit log of one template (or one label's moves)."""
    with _registry() as registry:
        entries = (registry.label_history(name, label_name, limit) if label_name
                   else registry.audit_log(name=name, limit=limit))
        table = Table("at", "actor", "action", "label", "from", "to", "reason")
        for e in entries:
            table.add_row(e.at, e.actor, e.action, e.label or "", str(e.from_version or ""),
                          str(e.to_version or ""), e.reason)
        console.print(table)


@app.command()
def diff(
    name: Annotated[str, typer.Argument()],
    from_ref: Annotated[str, typer.Argument(metavar="FROM")],
    to_ref: Annotated[str, typer.Argument(metavar="TO")] = "latest",
) -> None:
    """Unified diff between two versions (numbers, labels or 'latest')."""
    with _registry() as registry:
        result = registry.diff(name, from_ref, to_ref)
        console.print(Syntax(result.diff, "diff") if result.diff else "identical")


@app.command("export")
def export_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR")],
    name: Annotated[list[str] | None, typer.Option(help="Only these templates.")] = None,
) -> None:
    """Write the registry to DIR/<name>/v0001.yaml ... and labels.yaml."""
    with _registry() as registry:
        report = export_dir(registry, directory, names=name)
        console.print(f"exported {len(report.templates)} templates, {report.versions} versions "
                      f"({report.files_written} files changed) to {directory}")


@app.command("import")
def import_cmd(
    directory: Annotated[Path, typer.Argument(metavar="DIR")],
    override_reason: Override = None,
    actor: Actor = None,
) -> None:
    """Import an export folder. Idempotent; refuses conflicting history before writing anything."""
    with _registry() as registry:
        report = import_dir(registry, directory, actor=_actor(actor), override_reason=override_reason)
        moves = ", ".join(f"{m.name}@{m.label}->{m.to_version}" for m in report.label_moves) or "none"
        console.print(f"imported {len(report.imported)} versions ({report.unchanged} already present); "
                      f"label moves: {moves}")
