"""``keel keys list`` says what limit a key without one of its own gets: the settings' default, or no limit."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from app.cli.main import app

runner = CliRunner()


def test_keys_list_names_the_limit_a_key_without_its_own_gets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KEEL_HOME", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")  # one row per key, unwrapped
    assert runner.invoke(app, ["keys", "create", "--name", "plain"]).exit_code == 0
    made = runner.invoke(app, ["keys", "create", "--name", "capped", "--rate-limit", "5", "--tokens-per-minute", "900"])
    assert made.exit_code == 0, made.output
    rows = {line.split("│")[2].strip(): line for line in runner.invoke(app, ["keys", "list"]).output.splitlines()
            if line.count("│") > 4 and "name" not in line}
    assert "default (600)" in rows["plain"] and "no limit" in rows["plain"], rows
    assert " 5 " in rows["capped"] and " 900 " in rows["capped"], rows
    monkeypatch.setenv("KEEL_AUTH__DEFAULT_TOKENS_PER_MINUTE", "2000")
    rows = runner.invoke(app, ["keys", "list"]).output
    assert "default (2000)" in rows and "no limit" not in rows, rows
