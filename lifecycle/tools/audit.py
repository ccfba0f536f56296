"""The ``tools`` audit trail: every lifecycle-tool call, by whom, with what, and how it ended.

One row per call that reached a registered tool (an agent's or an MCP client's), in ``<home>/tools.db``'s
kernel ``audit_events`` table: ``actor`` the API key id (``operator`` for the unscoped CLI), ``action``
``tool.call`` (or ``tool.denied`` for a call its key's scopes refused), ``subject`` the tool, ``details`` the
arguments, the outcome and the run or MCP session it came from. Calls are handed to a buffered writer (the
kernel's :class:`~app.core.audit.BufferedWriter`): a call never waits for the disk, and an accepted row is
written even if the writer thread dies; a process kill loses at most ``interval_s`` of rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agents.tools import SHADOW_OWNER, ToolContext, ToolObservation
from app.core import audit
from app.core.audit import AuditEvent, BufferedWriter
from app.core.db import StoreFile, open_store_file, store_file

TRAIL = "tools"
MAX_ARGS_CHARS = 2000


class ToolAudit:
    """``tools.db`` (or the shared Postgres's audit table): the ``tools`` trail. ``record`` is the tool registry's
    audit hook."""

    def __init__(self, where: Path | str | StoreFile, *, interval_s: float = 0.2) -> None:
        self._file = store_file(where, audit.MIGRATIONS, what="the tool audit store")
        self._writer: BufferedWriter[AuditEvent] = BufferedWriter(
            self._write, interval_s=interval_s, name="keel-tool-audit", what="tool audit rows")

    def record(self, ctx: ToolContext, obs: ToolObservation) -> None:
        args = json.dumps(obs.args, ensure_ascii=False, default=str)
        details: dict[str, Any] = {
            "ok": obs.ok, "error_code": obs.error_code, "attempts": obs.attempts, "duration_ms": obs.duration_ms,
            "args": args if len(args) <= MAX_ARGS_CHARS else args[:MAX_ARGS_CHARS] + " [truncated]",
            "run_id": ctx.run_id or None, "call_id": obs.call_id}
        actor = ctx.principal or "operator"
        if ctx.shadow:  # a release's shadow run on the caller's request: the operator's experiment, not the caller
            details["shadow"] = True
            actor = f"{SHADOW_OWNER}{ctx.principal}"
        self._writer.submit([AuditEvent(
            TRAIL, "tool.denied" if obs.error_code == "tool_scope_denied" else "tool.call", "tool", obs.tool,
            actor=actor, reason="" if obs.ok else obs.output[:500], details=details,
            request_id=ctx.request_id)])

    def _write(self, events: list[AuditEvent]) -> None:
        with self._file.tx() as db:
            audit.append(db, *events)

    def flush(self, timeout: float | None = 5.0) -> bool:
        return self._writer.flush(timeout)

    def events(self, **filters: Any) -> list[AuditEvent]:
        """The kernel's query (:func:`app.core.audit.select`'s filters) on this trail; flushes first."""
        self.flush()
        return self._file.audit_events(**{**filters, "trail": TRAIL})

    def close(self) -> None:
        self._writer.close()
        self._file.close()


def open_tool_audit(home: Path, url: Any = None) -> ToolAudit:
    """The ``tools`` trail in the shared Postgres (``url``: ``database_url``, a ``SecretStr``), where every API
    process's tool calls are read together, else in ``<home>/tools.db``."""
    return ToolAudit(open_store_file(url, Path(home) / "tools.db", audit.MIGRATIONS, what="the tool audit store",
                                     setting="database_url", name="keel-tool-audit",
                                     filled_by=None))
