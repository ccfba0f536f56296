"""`keel prompts` commands on a throwaway home folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli.prompts import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray keel.yaml
    return tmp_path


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_list_show_render_seeded_library():
    out = run("list")
    assert "rag-answer" in out and "supervisor-route" in out and "production=1" in out
    assert "You answer questions" in run("show", "rag-answer")
    out = run("render", "summarize", "--var", "text=Some long text.", "--var", "max_words=30", "--json")
    data = json.loads(out)
    assert data["ref"] == "summarize@1" and "at most 30 words" in data["messages"][1]["content"]
    out = run("render", "rag-answer", "-v", "question=Why?", "-v", 'passages=[{"text": "Because."}]')
    assert "[1] Because." in out


def test_render_errors_are_clear():
    out = run("render", "summarize", "--var", "max_words=many", "--var", "text=x", code=1)
    assert "max_words" in out and "JSON" in out
    out = run("render", "summarize", code=1)
    assert "missing required variable 'text'" in out
    assert "no prompt template named 'nope'" in run("show", "nope", code=1)


def test_save_label_history_diff_export_import(tmp_path):
    src = tmp_path / "t.yaml"
    src.write_text("messages:\n- role: user\n  content: 'Hi {{ who }}'\nvariables:\n- name: who\n")
    assert "saved greet@1" in run("save", "greet", str(src), "-m", "first")
    src.write_text("messages:\n- role: user\n  content: 'Hello {{ who }}'\nvariables:\n- name: who\n")
    assert "version_conflict" in run("save", "greet", str(src), code=1)
    assert "saved greet@2" in run("save", "greet", str(src), "--base-version", "1")
    assert "greet@production: None -> 2 (gate: no gate configured)" in run("label", "greet", "2", "production")
    assert "already points" in run("label", "greet", "2", "production")
    assert "label.move" in run("history", "greet", "--label", "production")
    assert "+  content: Hello {{ who }}" in run("diff", "greet", "1", "2")
    out = run("export", str(tmp_path / "exp"))
    from prompts.registry import LIBRARY_DIR

    # the seeded starter library plus greet's two versions
    templates = len([d for d in LIBRARY_DIR.iterdir() if d.is_dir()]) + 1
    versions = len(list(LIBRARY_DIR.glob("*/v*.yaml"))) + 2
    assert f"exported {templates} templates, {versions} versions" in out
    assert (tmp_path / "exp" / "greet" / "v0002.yaml").is_file()
    assert f"imported 0 versions ({versions} already present); label moves: none" in run("import",
                                                                                         str(tmp_path / "exp"))
