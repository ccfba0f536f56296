"""``keel mcp serve``: the real command as an MCP host starts it, spoken to over stdio by the MCP SDK's client,
on a Keel home with real stores (keys, prompts, releases, the tool audit)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from app.core.audit import query
from app.security.keys import KeyStore

pytestmark = [pytest.mark.integration]

KEEL = shutil.which("keel", path=str(Path(__file__).resolve().parents[2] / ".venv" / "bin")) or "keel"


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "KEEL_HOME": str(home), "KEEL_GUARDRAILS__ENABLED": "false",
            "FASTMCP_ENABLE_TELEMETRY": "false", **extra}


async def _session_tools(env: dict[str, str], calls: list[tuple[str, dict]]) -> tuple[set[str], list]:
    params = StdioServerParameters(command=KEEL, args=["mcp", "serve"], env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        names = {t.name for t in (await session.list_tools()).tools}
        return names, [await session.call_tool(name, args) for name, args in calls]


async def test_stdio_serves_the_tools_for_the_given_key_and_audits_its_calls(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keel.db")
    key, raw = keys.create("desktop", ["releases", "prompts:read"])
    keys.close()

    names, (listed, missing, refused) = await _session_tools(
        _env(tmp_path, KEEL_API_KEY=raw),
        [("release_list", {}), ("release_status", {"name": "support"}), ("model_versions", {"model": "x"})])
    # stdio lists every tool (the host's user started it); the key's scopes decide what runs
    assert {"release_list", "prompt_diff", "model_versions", "retrieve"} <= names
    assert not listed.is_error and listed.structured_content == {"result": []}
    assert missing.is_error and missing.structured_content["error"]["code"] == "release_not_found"
    assert refused.is_error and refused.structured_content["error"]["code"] == "tool_scope_denied"
    assert "'finetune' scope" in refused.content[0].text

    db = sqlite3.connect(tmp_path / "tools.db")
    events = query(db, trail="tools", actor=key.id)
    db.close()
    assert {(e.subject, e.action) for e in events} == {("release_list", "tool.call"),
                                                       ("release_status", "tool.call"),
                                                       ("model_versions", "tool.denied")}


async def test_without_a_key_stdio_acts_for_the_operator(tmp_path: Path) -> None:
    names, (suites,) = await _session_tools(_env(tmp_path), [("eval_suites", {})])
    assert {"model_promote", "release_rollback", "eval_run"} <= names
    assert not suites.is_error and any(s["name"] == "adversarial" for s in suites.structured_content["result"])


def test_a_bad_key_stops_the_command_with_a_clear_error(tmp_path: Path) -> None:
    run = subprocess.run([KEEL, "mcp", "serve", "--key", "keel-not-a-key"], env=_env(tmp_path),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "invalid or revoked API key" in run.stderr
    assert run.stdout == ""  # stdout is the protocol's: nothing else ever goes there
