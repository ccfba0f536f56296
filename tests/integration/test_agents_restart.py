"""Kill-and-restart: a process paused at an interrupt is SIGKILLed; a new process resumes the run
from the SQLite checkpoint and the approved side effect happens exactly once.

The child processes run this module (``python -m tests.integration.test_agents_restart``) with the
scripted model, so the test needs no model server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]


def _service(home: Path, restarted: bool):
    from agents.service import AgentService
    from agents.settings import AgentSettings
    from agents.testing import KeywordRetriever, ScriptedLLM, SideEffectTool, schema_kind
    from agents.tools import ToolRegistry, builtin_tools
    from agents.workflows.common import Deps

    decisions = [{"next": "analyst", "reason": "send"}, {"next": "researcher", "reason": "r"},
                 {"next": "writer", "reason": "w"}, {"next": "critic", "reason": "c"},
                 {"next": "FINISH", "reason": "f"}][1 if restarted else 0:]

    def respond(messages, schema):
        kind = schema_kind(schema)
        if kind == "next":
            return decisions.pop(0) if len(decisions) > 1 else decisions[0]
        return {"text": "Keel stores vectors in Qdrant [1].", "accepted": {"accepted": True, "feedback": "ok"},
                "tool": {"tool": "send_report", "args": {"to": "ops"}},
                "worth_keeping": {"worth_keeping": False, "fact": ""}}[kind]

    tools = ToolRegistry(builtin_tools())
    tools.register(SideEffectTool(log_path=home / "side-effects.jsonl"))
    deps = Deps(llm=ScriptedLLM(responder=respond), tools=tools, settings=AgentSettings(),
                retriever=KeywordRetriever({"qdrant": "The vector report: Keel stores vectors in Qdrant."}))
    return AgentService(deps, db_path=home / "agents.db")


async def _child(mode: str, home: Path, run_id: str | None) -> None:
    svc = _service(home, restarted=mode == "resume")
    if mode == "start":
        async for e in svc.run("research", "Send the vector report", owner="ops"):
            if e.type == "interrupt":
                print(json.dumps({"run_id": e.run_id, "tool": e.tool}), flush=True)
        await asyncio.sleep(3600)  # stay alive, paused, until killed
    else:
        try:
            events = [e async for e in svc.resume(run_id, "approve", owner="ops")]
        finally:
            await svc.aclose()  # an open aiosqlite connection would keep the process alive
        last = events[-1]
        print(json.dumps({"type": last.type, "status": getattr(last, "status", None),
                          "answer": getattr(last, "answer", None)}), flush=True)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "tests.integration.test_agents_restart", *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_run_paused_at_interrupt_survives_kill_and_resumes_in_a_new_process(tmp_path: Path) -> None:
    child = _spawn("start", str(tmp_path))
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        paused = json.loads(line)
        assert paused["tool"] == "send_report"
        assert not (tmp_path / "side-effects.jsonl").exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    resumer = _spawn("resume", str(tmp_path), paused["run_id"])
    out, err = resumer.communicate(timeout=120)
    assert resumer.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"type": "final", "status": "completed", "answer": "Keel stores vectors in Qdrant [1]."}
    effects = (tmp_path / "side-effects.jsonl").read_text().splitlines()
    assert len(effects) == 1 and json.loads(effects[0]) == {"run_id": paused["run_id"], "args": {"to": "ops"}}

    # a third process sees the finished run and cannot resume it again
    again = _spawn("resume", str(tmp_path), paused["run_id"])
    _, err = again.communicate(timeout=120)
    assert again.returncode != 0 and "RunNotResumable" in err
    assert len((tmp_path / "side-effects.jsonl").read_text().splitlines()) == 1


if __name__ == "__main__":
    _mode, _home = sys.argv[1], Path(sys.argv[2])
    asyncio.run(_child(_mode, _home, sys.argv[3] if len(sys.argv) > 3 else None))
