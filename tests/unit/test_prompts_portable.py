"""Export/import of the registry as YAML folders, and the shipped starter library."""

from __future__ import annotations

import shutil

import pytest

from app.core.errors import InvalidRequest
from app.settings import Settings
from prompts import yamlio
from prompts.errors import ImportConflict, PromotionGateFailed
from prompts.factory import build_registry
from prompts.portable import export_dir, import_dir
from prompts.registry import LIBRARY_DIR
from prompts.testing import RecordingGate, content, sqlite_registry


@pytest.fixture
def reg(tmp_path):
    r = sqlite_registry(tmp_path / "a.db")
    r.create("greet", content(("system", "Be brief.\nBe kind."), "Hi {{ who }}", variables=[{"name": "who"}]),
             author="ann", message="first")
    r.save("greet", content("Hello {{ who }}", variables=[{"name": "who", "default": "you"}], temperature=0.3),
           author="bob", message="second", base_version=1)
    r.move_label("greet", "production", 1, actor="ann")
    r.move_label("greet", "staging", 2, actor="ann")
    r.create("footer", content("-- {{ who }}", variables=[{"name": "who"}]), author="ann")
    r.move_label("footer", "production", 1, actor="ann")
    yield r
    r.close()


def test_round_trip(reg, tmp_path):
    out = tmp_path / "export"
    report = export_dir(reg, out)
    assert (report.templates, report.versions, report.files_written) == (["footer", "greet"], 3, 5)
    assert sorted(p.name for p in (out / "greet").iterdir()) == ["labels.yaml", "v0001.yaml", "v0002.yaml"]
    doc = yamlio.load((out / "greet" / "v0001.yaml").read_text())
    assert doc["content"]["messages"][0]["content"] == "Be brief.\nBe kind."
    assert "content: |-" in (out / "greet" / "v0001.yaml").read_text()  # literal block: reviewable in git
    assert yamlio.load((out / "greet" / "labels.yaml").read_text()) == {"production": 1, "staging": 2}
    assert export_dir(reg, out).files_written == 0  # unchanged files are not rewritten

    other = sqlite_registry(tmp_path / "b.db")
    result = import_dir(other, out, actor="ci")
    assert result.imported == ["footer@1", "greet@1", "greet@2"] and len(result.label_moves) == 3
    for name in ("greet", "footer"):
        mine, theirs = reg.versions(name), other.versions(name)
        assert [(v.version, v.hash, v.author, v.message, v.created_at, v.parent) for v in mine] == [
            (v.version, v.hash, v.author, v.message, v.created_at, v.parent) for v in theirs]
        assert reg.labels(name) == other.labels(name)
    assert other.render("greet@staging").messages[0].content == "Hello you"

    revision = other.store.revision()
    again = import_dir(other, out, actor="ci")
    assert not again.changed and again.unchanged == 3
    assert other.store.revision() == revision  # idempotent: nothing written, not even audit rows
    other.close()


def test_conflicting_history_is_refused_before_writing(reg, tmp_path):
    out = tmp_path / "export"
    export_dir(reg, out)
    other = sqlite_registry(tmp_path / "b.db")
    other.create("greet", content("Different {{ who }}", variables=[{"name": "who"}]), author="eve")
    with pytest.raises(ImportConflict, match=r"conflicting history: greet@1 .* nothing was imported"):
        import_dir(other, out, actor="ci")
    assert [t.name for t in other.list_templates()] == ["greet"]  # footer was not imported either
    other.close()


def test_edited_version_file_is_refused_and_new_file_is_accepted(reg, tmp_path):
    out = tmp_path / "export"
    export_dir(reg, out)
    path = out / "greet" / "v0002.yaml"
    path.write_text(path.read_text().replace("Hello", "Howdy"))
    with pytest.raises(ImportConflict, match=r"does not match its recorded hash.*v0003\.yaml"):
        import_dir(reg, out, actor="ci")
    path.write_text(path.read_text().replace("Howdy", "Hello"))
    (out / "greet" / "v0003.yaml").write_text(yamlio.dump({
        "author": "carol", "message": "hand-written",
        "content": {"messages": [{"role": "user", "content": "Yo {{ who }}"}], "variables": [{"name": "who"}]},
    }))
    (out / "greet" / "labels.yaml").write_text("production: 3\nstaging: 2\n")
    result = import_dir(reg, out, actor="ci")
    assert result.imported == ["greet@3"]
    assert reg.render("greet", {"who": "Al"}).messages[0].content == "Yo Al"
    assert reg.resolve("greet@3").author == "carol"


def test_import_label_moves_pass_the_gate(reg, tmp_path):
    out = tmp_path / "export"
    export_dir(reg, out)
    (out / "greet" / "labels.yaml").write_text("production: 2\n")
    reg.set_gate(RecordingGate())
    with pytest.raises(PromotionGateFailed):
        import_dir(reg, out, actor="ci")
    result = import_dir(reg, out, actor="ci", override_reason="migration")
    assert result.label_moves[0].overridden and reg.labels("greet")["production"] == 2


@pytest.mark.parametrize(("layout", "message"), [
    ({"Bad Name/v0001.yaml": "content: {}"}, "invalid template folder name"),
    ({"ok/v0002.yaml": "content: {messages: [{role: user, content: x}]}"}, "without gaps"),
    ({"ok/notes.yaml": "x: 1"}, "unexpected file"),
    ({"ok/v0001.yaml": "content: {messages: []}"}, "invalid content"),
    ({"ok/v0001.yaml": "name: other\ncontent: {messages: [{role: user, content: x}]}"}, "does not match its folder"),
    ({"ok/v0001.yaml": "content: {messages: [{role: user, content: x}]}", "ok/labels.yaml": "production: 4"},
     "missing version 4"),
    ({"ok/v0001.yaml": "content: {messages: [{role: user, content: '{{ y }}'}]}"}, "undeclared"),
])
def test_bad_import_folders(tmp_path, layout, message):
    for rel, text in layout.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / rel).write_text(text)
    reg = sqlite_registry(tmp_path / "p.db")
    with pytest.raises(InvalidRequest, match=message):
        import_dir(reg, tmp_path / "in", actor="ci")
    assert reg.list_templates() == []
    reg.close()


def test_starter_library_imports_and_renders(tmp_path):
    reg = build_registry(Settings(home=tmp_path, auth={"enabled": False}))
    assert [t.name for t in reg.list_templates()] == ["analyst-tool-choice", "citation-rules", "memory-extract",
                                                     "rag-answer", "research-critic", "summarize",
                                                     "supervisor-route"]
    rag = reg.render("rag-answer", {"question": "What is Keel?", "passages": [
        {"title": "README", "text": "Keel is an LLMOps framework."}, {"text": "It serves vLLM."}]})
    system, user = (m.content for m in rag.messages)
    assert "like [1]" in system and "only the numbered passages" in system
    assert "[1] README: Keel is an LLMOps framework.\n[2] It serves vLLM." in user
    route = reg.render("supervisor-route", {"task": "Compare A and B"})
    schema = route.params.response_schema
    assert schema["properties"]["next"]["enum"] == ["researcher", "analyst", "writer", "critic", "FINISH"]
    assert reg.resolve("supervisor-route").version == 2  # production moved to v2, v1 kept in history
    assert schema["required"] == ["next", "reason"]
    summary = reg.render("summarize", {"text": "Long text.", "style": "bullets"})
    assert "at most 120 words as a bulleted list." in summary.messages[1].content
    revision = reg.store.revision()
    reg.close()
    # a second start does not import again
    again = build_registry(Settings(home=tmp_path, auth={"enabled": False}))
    assert again.store.revision() == revision
    again.close()


def test_library_files_are_consistent(tmp_path):
    """The shipped files import cleanly and re-export byte for byte."""
    reg = sqlite_registry(tmp_path / "p.db")
    import_dir(reg, LIBRARY_DIR, actor="test")
    copy = tmp_path / "copy"
    shutil.copytree(LIBRARY_DIR, copy)
    assert export_dir(reg, copy).files_written == 0
    reg.close()
