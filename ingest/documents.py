"""The document data contract and the loaders that produce it.

A loader turns one file into zero or more :class:`Document` objects. Anything
wrong with a file (too big, undecodable, empty, wrong JSON shape, corrupt PDF)
becomes a :class:`Rejection` in the :class:`LoadReport`; it never aborts the batch.

JSON shape (``.json`` holds one record or a list of records, ``.jsonl`` one record
per line)::

    {"text": "...",            # required, non-empty
     "title": "...",           # optional, defaults to the file name
     "id": "...",              # optional, stable record id (defaults to its position)
     "metadata": {"k": "v"}}   # optional, values: str/int/float/bool/null or list of str

Any other key is a shape error, so a typo does not silently drop data.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ingest.html import html_to_text
from ingest.settings import LoaderConfig

MetaValue = str | int | float | bool | None | list[str]
DocKind = Literal["markdown", "text", "html", "pdf", "json"]
RejectionCode = Literal[
    "not_found", "unsupported_type", "too_large", "undecodable", "empty", "bad_json_shape", "parse_error",
    "unreadable",
]

# Payload keys the store reserves; user metadata may not shadow them.
RESERVED_KEYS = frozenset({
    "doc_id", "doc_version", "source", "source_sha256", "title", "text", "heading_path", "heading",
    "page", "page_end", "char_start", "char_end", "chunk_index", "chunk_hash", "snapshot_id", "kind", "doc_kind",
    "n_chunks", "n_tokens",
})


class Document(BaseModel):
    """One logical document: a file, or one record of a JSON/JSONL file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    doc_id: str = Field(min_length=1, description="Stable id: absolute path (an upload: its file name), plus "
                        "'#<record id>' for records.")
    source: str = Field(min_length=1, description="Absolute path of the file it came from (an upload: its name).")
    source_sha256: str = Field(min_length=64, max_length=64)
    kind: DocKind
    title: str
    text: str = Field(min_length=1)
    metadata: dict[str, MetaValue] = Field(default_factory=dict)
    page_starts: tuple[int, ...] = Field(
        default=(), description="PDF: character offset in `text` where page i+1 starts."
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v

    @field_validator("metadata")
    @classmethod
    def _no_reserved(cls, v: dict[str, MetaValue]) -> dict[str, MetaValue]:
        clash = RESERVED_KEYS.intersection(v)
        if clash:
            raise ValueError(f"metadata keys {sorted(clash)} are reserved")
        return v

    def content_hash(self) -> str:
        """Hash of everything that ends up in the store; equal hashes mean nothing to re-embed."""
        h = hashlib.sha256()
        for part in (self.title, self.text, json.dumps(self.metadata, sort_keys=True), repr(self.page_starts)):
            h.update(part.encode())
            h.update(b"\x00")
        return h.hexdigest()

    def page_at(self, offset: int) -> int | None:
        if not self.page_starts:
            return None
        page = 1
        for i, start in enumerate(self.page_starts):
            if start <= offset:
                page = i + 1
            else:
                break
        return page


class Rejection(BaseModel):
    source: str = Field(description="The file (or the CLI argument that matched nothing).")
    location: str | None = Field(default=None, description="Record or line inside the file, if any.")
    code: RejectionCode
    message: str


@dataclass
class LoadReport:
    documents: list[Document] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    files_seen: int = 0

    def reject(self, source: str | Path, code: RejectionCode, message: str, location: str | None = None) -> None:
        self.rejections.append(Rejection(source=str(source), location=location, code=code, message=message))

    @property
    def rejected_sources(self) -> set[str]:
        return {r.source for r in self.rejections}


class Rejected(Exception):
    def __init__(self, code: RejectionCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectionCode = code
        self.message = message


class JsonRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)
    title: str | None = None
    id: str | int | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("text is blank")
        return v


# -- discovery ----------------------------------------------------------------------

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Scope:
    """What a CLI argument covered; prune removes only documents inside the scopes of a run."""

    kind: Literal["file", "dir", "glob"]
    value: str

    def contains(self, source: str) -> bool:
        if self.kind == "file":
            return source == self.value
        if self.kind == "dir":
            return source.startswith(self.value.rstrip("/") + "/")
        return fnmatch.fnmatch(source, self.value)


def discover(paths: Sequence[str | Path], report: LoadReport) -> tuple[list[Path], list[Scope]]:
    """Expand files, folders (recursively) and globs into supported files, sorted and de-duplicated."""
    found: dict[str, Path] = {}
    scopes: list[Scope] = []
    for raw in paths:
        text = str(raw)
        if _GLOB_CHARS.search(text):
            pattern = str(Path(text).expanduser().absolute())
            scopes.append(Scope("glob", pattern))
            matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
            files = [m for m in matches if m.is_file() and m.suffix.lower() in LOADERS]
            if not files:
                report.reject(text, "not_found", "glob matched no supported files")
            for f in files:
                found[str(f.resolve())] = f.resolve()
            continue
        p = Path(text).expanduser()
        if p.is_dir():
            root = p.resolve()
            scopes.append(Scope("dir", str(root)))
            for f in sorted(root.rglob("*")):
                rel = f.relative_to(root)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if f.is_file() and f.suffix.lower() in LOADERS:
                    found[str(f)] = f
        elif p.is_file():
            f = p.resolve()
            scopes.append(Scope("file", str(f)))
            if f.suffix.lower() not in LOADERS:
                report.reject(f, "unsupported_type", f"unsupported file type {f.suffix or '(none)'!r}; "
                              f"supported: {', '.join(sorted(LOADERS))}")
                continue
            found[str(f)] = f
        else:
            report.reject(text, "not_found", "no such file or folder")
    return [found[k] for k in sorted(found)], scopes


def load_paths(paths: Sequence[str | Path], config: LoaderConfig | None = None) -> tuple[LoadReport, list[Scope]]:
    report = LoadReport()
    files, scopes = discover(paths, report)
    for f in files:
        load_file(f, report, config)
    return report, scopes


def iter_load(files: Iterable[Path], report: LoadReport, config: LoaderConfig | None = None):
    """Load lazily, one file at a time, so a large folder is never held in memory at once."""
    for f in files:
        before = len(report.documents)
        load_file(f, report, config)
        new = report.documents[before:]
        del report.documents[before:]
        yield f, new


def load_file(path: Path, report: LoadReport, config: LoaderConfig | None = None) -> None:
    cfg = config or LoaderConfig()
    report.files_seen += 1
    path = path.resolve()
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        report.reject(path, "unsupported_type", f"unsupported file type {path.suffix!r}")
        return
    try:
        size = path.stat().st_size
        if size > cfg.max_file_bytes:
            raise Rejected("too_large", f"{size} bytes is over the {cfg.max_file_bytes}-byte limit")
        data = path.read_bytes()
    except Rejected as e:
        report.reject(path, e.code, e.message)
        return
    except OSError as e:
        report.reject(path, "unreadable", f"cannot read: {e.strerror or e}")
        return
    sha = hashlib.sha256(data).hexdigest()
    try:
        for doc in loader(path, data, sha, report):
            _check_size(doc, cfg)
            report.documents.append(doc)
    except Rejected as e:
        report.reject(path, e.code, e.message)
    except ValidationError as e:
        report.reject(path, "empty" if "blank" in str(e) or "at least 1" in str(e) else "parse_error",
                      _short(e))


def _check_size(doc: Document, cfg: LoaderConfig) -> None:
    n = len(doc.text.strip())
    if n < cfg.min_chars:
        raise Rejected("empty", f"{n} characters of text, need at least {cfg.min_chars}")
    if len(doc.text) > cfg.max_chars:
        raise Rejected("too_large", f"{len(doc.text)} characters of text is over the {cfg.max_chars} limit")


def _short(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'record'}: {err['msg']}" for err in e.errors()[:5])


def _decode(data: bytes) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Rejected("undecodable", f"not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    if "\x00" in text:
        raise Rejected("undecodable", "contains NUL bytes (binary file?)")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _require_text(text: str) -> str:
    if not text.strip():
        raise Rejected("empty", "no text")
    return text


# -- loaders ------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_MD_H1 = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.M)


def load_markdown(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    text = _decode(data)
    meta: dict[str, MetaValue] = {}
    m = _FRONT_MATTER.match(text)
    if m:
        meta = _front_matter(m.group(1))
        text = text[m.end():]
    _require_text(text)
    title = meta.pop("title", None)
    if not isinstance(title, str):
        h1 = _MD_H1.search(text)
        title = h1.group(1) if h1 else path.stem
    return [Document(doc_id=str(path), source=str(path), source_sha256=sha, kind="markdown", title=title,
                     text=text, metadata=meta)]


def _front_matter(block: str) -> dict[str, MetaValue]:
    import yaml

    try:
        raw = yaml.safe_load(block)
    except yaml.YAMLError:
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, MetaValue] = {}
    for k, v in raw.items():
        key = str(k)
        if key in RESERVED_KEYS and key != "title":
            key = f"meta_{key}"
        if isinstance(v, str | int | float | bool) or v is None:
            out[key] = v
        elif isinstance(v, list):
            out[key] = [str(x) for x in v]
        else:
            out[key] = str(v)
    return out


def load_text(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    text = _require_text(_decode(data))
    return [Document(doc_id=str(path), source=str(path), source_sha256=sha, kind="text", title=path.stem,
                     text=text)]


def load_html(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    title, text = html_to_text(_decode(data))
    _require_text(text)
    return [Document(doc_id=str(path), source=str(path), source_sha256=sha, kind="html",
                     title=title or path.stem, text=text)]


def load_pdf(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    import io

    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise Rejected("unreadable", "encrypted PDF")
        parts: list[str] = []
        starts: list[int] = []
        pos = 0
        for page in reader.pages:
            page_text = (page.extract_text() or "").replace("\r\n", "\n").strip()
            starts.append(pos)
            parts.append(page_text)
            pos += len(page_text) + 2  # the "\n\n" page separator below
        title = ""
        if reader.metadata and reader.metadata.title:
            title = str(reader.metadata.title).strip()
    except Rejected:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as e:
        raise Rejected("parse_error", f"cannot parse PDF: {e}") from None
    text = "\n\n".join(parts)
    if not text.strip():
        raise Rejected("empty", "no extractable text (scanned PDF? OCR is not supported)")
    return [Document(doc_id=str(path), source=str(path), source_sha256=sha, kind="pdf",
                     title=title or path.stem, text=text, page_starts=tuple(starts),
                     metadata={"pages": len(starts)})]


def load_json(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    text = _decode(data)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise Rejected("parse_error", f"invalid JSON: {e}") from None
    records = raw if isinstance(raw, list) else [raw]
    if not records:
        raise Rejected("empty", "no records")
    return _records(path, sha, enumerate(records), report, where="record")


def load_jsonl(path: Path, data: bytes, sha: str, report: LoadReport) -> list[Document]:
    text = _decode(data)
    items: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            report.reject(path, "parse_error", f"invalid JSON on line {lineno}: {e.msg}", f"line {lineno}")
    if not items and not any(r.source == str(path) for r in report.rejections):
        raise Rejected("empty", "no records")
    return _records(path, sha, items, report, where="line")


def _records(path: Path, sha: str, items: Iterable[tuple[int, Any]], report: LoadReport, where: str
             ) -> list[Document]:
    docs: list[Document] = []
    seen: set[str] = set()
    for pos, obj in items:
        loc = f"{where} {pos}"
        if not isinstance(obj, dict):
            report.reject(path, "bad_json_shape", f"expected an object with 'text', got "
                          f"{type(obj).__name__}", loc)
            continue
        try:
            rec = JsonRecord.model_validate(obj)
            rid = str(rec.id) if rec.id is not None else str(pos)
            if rid in seen:
                raise Rejected("bad_json_shape", f"duplicate id {rid!r}")
            seen.add(rid)
            docs.append(Document(
                doc_id=f"{path}#{rid}", source=str(path), source_sha256=sha, kind="json",
                title=rec.title or f"{path.stem} #{rid}", text=rec.text, metadata=rec.metadata,
            ))
        except ValidationError as e:
            blank = any(err["loc"] == ("text",) and err["type"] in ("string_too_short", "value_error")
                        for err in e.errors())
            report.reject(path, "empty" if blank else "bad_json_shape", _short(e), loc)
        except Rejected as e:
            report.reject(path, e.code, e.message, loc)
    return docs


Loader = Callable[[Path, bytes, str, LoadReport], list[Document]]

LOADERS: dict[str, Loader] = {
    ".md": load_markdown, ".markdown": load_markdown,
    ".txt": load_text, ".text": load_text, ".rst": load_text,
    ".html": load_html, ".htm": load_html,
    ".pdf": load_pdf,
    ".json": load_json, ".jsonl": load_jsonl, ".ndjson": load_jsonl,
}
