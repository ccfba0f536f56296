"""Loaders and the document contract: every format, folders and globs, and bad documents rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest.documents import Document, load_paths
from ingest.settings import LoaderConfig


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF, one Helvetica text line per page (no PDF writer dependency)."""
    objs: list[bytes] = []
    n = len(pages)
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(n))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode())
    font_id = 3 + 2 * n
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font_id} "
                    f"0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "guide.md").write_text("---\ntitle: The Guide\ntags: [a, b]\n---\n# Heading\n\nBody text.\n")
    (d / "notes.txt").write_text("Plain notes.\n")
    (d / "page.html").write_text(
        "<html><head><title>Page</title></head><body><nav>Menu Home</nav><main><h1>Main</h1>"
        "<p>Real content.</p></main><footer>Copyright</footer></body></html>")
    (d / "sub" / "manual.pdf").write_bytes(make_pdf(["First page text", "Second page text"]))
    (d / "records.jsonl").write_text(
        json.dumps({"id": "r1", "text": "Record one", "metadata": {"lang": "en"}}) + "\n"
        + json.dumps({"text": "Record two", "title": "Two"}) + "\n")
    (d / "one.json").write_text(json.dumps([{"text": "Only record"}]))
    (d / ".hidden.md").write_text("skip me")
    (d / "image.png").write_bytes(b"\x89PNG")
    return d


def by_name(docs: list[Document]) -> dict[str, Document]:
    return {Path(d.doc_id).name: d for d in docs}


def test_folder_loads_every_format(corpus: Path):
    report, scopes = load_paths([corpus])
    assert report.rejections == []
    docs = by_name(report.documents)
    assert set(docs) == {"guide.md", "notes.txt", "page.html", "manual.pdf", "records.jsonl#r1",
                         "records.jsonl#2", "one.json#0"}
    md = docs["guide.md"]
    assert md.title == "The Guide" and md.metadata == {"tags": ["a", "b"]} and md.text.startswith("# Heading")
    html = docs["page.html"]
    assert html.title == "Page" and "Real content." in html.text
    assert "Menu" not in html.text and "Copyright" not in html.text and "# Main" in html.text
    pdf = docs["manual.pdf"]
    assert pdf.kind == "pdf" and len(pdf.page_starts) == 2
    assert pdf.page_at(pdf.text.index("Second")) == 2 and pdf.page_at(0) == 1
    assert docs["records.jsonl#r1"].metadata == {"lang": "en"}
    assert docs["records.jsonl#2"].title == "Two"
    assert all(len(d.source_sha256) == 64 for d in report.documents)
    assert scopes[0].kind == "dir" and scopes[0].contains(str(corpus.resolve() / "x.md"))


def test_single_file_and_glob(corpus: Path):
    report, _ = load_paths([corpus / "notes.txt"])
    assert [Path(d.source).name for d in report.documents] == ["notes.txt"]
    report, scopes = load_paths([str(corpus / "**" / "*.pdf")])
    assert [Path(d.source).name for d in report.documents] == ["manual.pdf"]
    assert scopes[0].kind == "glob" and scopes[0].contains(str(corpus / "sub" / "other.pdf"))
    assert not scopes[0].contains(str(corpus / "notes.txt"))


def test_bad_documents_are_rejected_without_aborting(tmp_path: Path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "good.md").write_text("# Fine\n\ntext")
    (d / "empty.md").write_text("   \n\n")
    (d / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (d / "big.txt").write_text("x" * 2000)
    (d / "shape.json").write_text(json.dumps({"body": "no text key"}))
    (d / "notobj.json").write_text(json.dumps([1, 2]))
    (d / "broken.json").write_text("{not json")
    (d / "mixed.jsonl").write_text('{"text": "ok"}\n{"text": ""}\n[1]\n{bad\n{"text": "x", "extra": 1}\n')
    (d / "corrupt.pdf").write_bytes(b"%PDF-1.4 garbage")
    (d / "blank.pdf").write_bytes(make_pdf([""]))
    (d / "reserved.jsonl").write_text(json.dumps({"text": "t", "metadata": {"doc_id": "x"}}) + "\n")
    report, _ = load_paths([d, tmp_path / "missing.md", tmp_path / "bad" / "good.md"],
                           LoaderConfig(max_file_bytes=1000))
    assert sorted(Path(x.doc_id).name for x in report.documents) == ["good.md", "mixed.jsonl#1"]
    codes = {(Path(r.source).name, r.location, r.code) for r in report.rejections}
    assert ("empty.md", None, "empty") in codes
    assert ("latin1.txt", None, "undecodable") in codes
    assert ("big.txt", None, "too_large") in codes
    assert ("shape.json", "record 0", "bad_json_shape") in codes
    assert ("notobj.json", "record 0", "bad_json_shape") in codes
    assert ("broken.json", None, "parse_error") in codes
    assert ("mixed.jsonl", "line 2", "empty") in codes
    assert ("mixed.jsonl", "line 3", "bad_json_shape") in codes
    assert ("mixed.jsonl", "line 4", "parse_error") in codes
    assert ("mixed.jsonl", "line 5", "bad_json_shape") in codes
    assert ("corrupt.pdf", None, "parse_error") in codes
    assert ("blank.pdf", None, "empty") in codes
    assert ("reserved.jsonl", "line 1", "bad_json_shape") in codes
    assert ("missing.md", None, "not_found") in codes
    assert all(r.message for r in report.rejections)


def test_unsupported_file_given_directly(tmp_path: Path):
    f = tmp_path / "a.docx"
    f.write_bytes(b"PK")
    report, _ = load_paths([f])
    assert [r.code for r in report.rejections] == ["unsupported_type"]


def test_document_contract():
    base = {"doc_id": "x", "source": "/x", "source_sha256": "0" * 64, "kind": "text", "title": "t"}
    with pytest.raises(ValueError):
        Document(**base, text="  ")
    with pytest.raises(ValueError):
        Document(**base, text="ok", metadata={"source": "shadow"})
    with pytest.raises(ValueError):
        Document(**base, text="ok", unknown=1)
    a = Document(**base, text="ok")
    assert a.content_hash() == Document(**base, text="ok").content_hash()
    assert a.content_hash() != Document(**base, text="ok!").content_hash()
