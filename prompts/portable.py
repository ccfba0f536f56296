"""Prompts as code: the registry as a folder of YAML files, reviewable in git.

Layout (one folder per template, one file per immutable version, one labels file)::

    DIR/rag-answer/v0001.yaml
    DIR/rag-answer/v0002.yaml
    DIR/rag-answer/labels.yaml      # {production: 2, staging: 2}

A version file holds ``content`` plus its metadata. ``hash`` may be left out of a new
hand-written file (it is computed); if present it must match, because a version that
changed after the fact would silently rewrite history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.core.errors import InvalidRequest, NotFound
from prompts import yamlio
from prompts.errors import ImportConflict
from prompts.models import LATEST, TemplateContent, TemplateVersion, parse_ref, validate_label, validate_name
from prompts.registry import LabelMove, PromptRegistry
from prompts.store import utc_now

_VERSION_FILE = re.compile(r"^v(\d{4,})\.yaml$")
LABELS_FILE = "labels.yaml"


@dataclass
class ExportReport:
    templates: list[str] = field(default_factory=list)
    versions: int = 0
    files_written: int = 0


@dataclass
class ImportReport:
    templates: list[str] = field(default_factory=list)
    imported: list[str] = field(default_factory=list)
    unchanged: int = 0
    label_moves: list[LabelMove] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.imported or self.label_moves)


def version_filename(version: int) -> str:
    return f"v{version:04d}.yaml"


def version_document(v: TemplateVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "parent": v.parent,
        "hash": v.hash,
        "author": v.author,
        "created_at": v.created_at,
        "message": v.message,
        "content": v.content.model_dump(mode="json", exclude_defaults=True),
    }


def export_dir(registry: PromptRegistry, target: Path, *, names: list[str] | None = None) -> ExportReport:
    """Write every template (or ``names``); files whose text is unchanged are not rewritten."""
    root = Path(target).resolve()
    root.mkdir(parents=True, exist_ok=True)
    report = ExportReport()
    wanted = set(names) if names else None
    for summary in registry.list_templates():
        if wanted is not None and summary.name not in wanted:
            continue
        folder = _inside(root, validate_name(summary.name))
        folder.mkdir(exist_ok=True)
        for version in registry.versions(summary.name):
            report.files_written += _write(folder / version_filename(version.version),
                                           yamlio.dump(version_document(version)))
            report.versions += 1
        labels = registry.labels(summary.name)
        report.files_written += _write(folder / LABELS_FILE, yamlio.dump(dict(sorted(labels.items()))))
        report.templates.append(summary.name)
    return report


def _inside(root: Path, name: str) -> Path:
    # Names are validated already; this guards the invariant against future changes to the pattern.
    path = (root / name).resolve()
    if path.parent != root:
        raise InvalidRequest(f"template name {name!r} would leave the export folder", param="name")
    return path


def _write(path: Path, text: str) -> int:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return 0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return 1


@dataclass
class _Folder:
    name: str
    versions: list[TemplateVersion]
    labels: dict[str, int]


def read_dir(source: Path) -> list[_Folder]:
    """Parse and check an export folder without touching the registry."""
    root = Path(source)
    if not root.is_dir():
        raise NotFound(f"import folder {str(root)!r} does not exist", param="dir")
    folders: list[_Folder] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders.append(_read_folder(folder))
    if not folders:
        raise InvalidRequest(f"{str(root)!r} holds no template folders (expected DIR/<name>/v0001.yaml)",
                             param="dir")
    return folders


def _read_folder(folder: Path) -> _Folder:
    name = validate_name(folder.name, what="template folder name")
    versions: list[TemplateVersion] = []
    labels: dict[str, int] = {}
    for path in sorted(folder.iterdir()):
        if path.name == LABELS_FILE:
            labels = _read_labels(path)
            continue
        match = _VERSION_FILE.match(path.name)
        if match:
            versions.append(_read_version(path, name, int(match.group(1))))
        elif path.suffix in {".yaml", ".yml"}:
            raise InvalidRequest(
                f"{path}: unexpected file; version files are named v0001.yaml, v0002.yaml ... "
                f"and labels live in {LABELS_FILE}",
                param="dir",
            )
    versions.sort(key=lambda v: v.version)
    numbers = [v.version for v in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise InvalidRequest(f"{folder}: versions must run 1, 2, 3 ... without gaps; found {numbers}",
                             param="dir")
    for label, version in labels.items():
        if version not in numbers:
            raise InvalidRequest(f"{folder / LABELS_FILE}: label {label!r} points at missing version {version}",
                                 param="dir")
    return _Folder(name, versions, labels)


def _read_version(path: Path, name: str, number: int) -> TemplateVersion:
    try:
        doc = yamlio.load(path.read_text(encoding="utf-8"))
    except Exception as exc:
        raise InvalidRequest(f"{path}: not valid YAML: {exc}", param="dir") from None
    if not isinstance(doc, dict) or "content" not in doc:
        raise InvalidRequest(f"{path}: expected a mapping with a 'content' key", param="dir")
    if doc.get("name", name) != name:
        raise InvalidRequest(f"{path}: name {doc.get('name')!r} does not match its folder {name!r}", param="dir")
    if doc.get("version", number) != number:
        raise InvalidRequest(f"{path}: version {doc.get('version')!r} does not match the file name", param="dir")
    try:
        content = TemplateContent.model_validate(doc["content"])
    except ValidationError as exc:
        raise InvalidRequest(f"{path}: invalid content: {exc}", param="dir") from None
    digest = content.content_hash()
    if doc.get("hash") not in (None, digest):
        raise ImportConflict(
            f"{path}: content does not match its recorded hash ({doc['hash']}); published versions are "
            f"immutable: put the change in a new file {version_filename(number + 1)} without a hash",
            param="dir",
        )
    parent = doc.get("parent", number - 1 or None)
    if parent != (number - 1 or None):
        raise InvalidRequest(f"{path}: parent must be {number - 1 or None}, history is linear", param="dir")
    return TemplateVersion(
        name=name, version=number, content=content, hash=digest, parent=parent,
        author=str(doc.get("author") or "import"), message=str(doc.get("message") or ""),
        created_at=str(doc.get("created_at") or utc_now()),
    )


def _read_labels(path: Path) -> dict[str, int]:
    doc = yamlio.load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(doc, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in doc.values()):
        raise InvalidRequest(f"{path}: expected a mapping of label -> version number", param="dir")
    for label in doc:
        validate_label(str(label))
    return {str(k): v for k, v in doc.items()}


def import_dir(
    registry: PromptRegistry, source: Path, *, actor: str, override_reason: str | None = None
) -> ImportReport:
    """Idempotent: versions already present with the same hash are skipped. Any version present
    with a different hash refuses the whole import before anything is written."""
    folders = read_dir(source)
    by_name = {f.name: f for f in folders}
    pending: list[TemplateVersion] = []
    report = ImportReport(templates=list(by_name))
    for folder in folders:
        existing = {v.version: v for v in _existing_versions(registry, folder.name)}
        for version in folder.versions:
            have = existing.get(version.version)
            if have is None:
                pending.append(version)
            elif have.hash != version.hash:
                raise ImportConflict(
                    f"conflicting history: {version.ref} in the registry has hash {have.hash}, the import has "
                    f"{version.hash}; nothing was imported. Export the registry, reconcile the two histories "
                    "in git, and import again",
                    param=version.ref,
                )
            else:
                report.unchanged += 1

    def resolve(ref: str) -> TemplateVersion:
        parsed = parse_ref(ref)
        folder = by_name.get(parsed.name)
        if folder is not None:
            number = parsed.version
            if number is None:
                number = len(folder.versions) if parsed.label == LATEST else folder.labels.get(parsed.label or "")
            if number is not None and 1 <= number <= len(folder.versions):
                return folder.versions[number - 1]
        return registry.resolve(parsed)

    for version in pending:
        registry.renderer.check(version.content, resolve, origin=version.ref)
    for version in pending:
        registry.store.import_version(version, actor=actor)
        report.imported.append(version.ref)
    if pending:
        registry.invalidate()
    for folder in folders:
        for label, number in sorted(folder.labels.items()):
            move = registry.move_label(folder.name, label, number, actor=actor, override_reason=override_reason)
            if move.changed:
                report.label_moves.append(move)
    return report


def _existing_versions(registry: PromptRegistry, name: str) -> list[TemplateVersion]:
    try:
        return registry.versions(name)
    except NotFound:
        return []
