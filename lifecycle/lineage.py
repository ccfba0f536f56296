"""Lineage: exactly what produced an answer, keyed by its OpenAI completion id.

Every chat response (streamed or not, through a release or not) leaves one record: the model alias asked for
and the route that served it (backend, model, adapter, the routing table's owner and revision), the prompt
version and its content hash, the release and variant, the guardrail policy version and what the guards did,
the passages given to the model (document, chunk and ingest snapshot ids, scores, whether the answer cited
them), the finish reasons and tokens. Records are written in batches off the request path.

Reading a record joins what was decided elsewhere about those artifacts: every guardrail verdict on the
request (the guardrail audit, by request id), the eval runs of that exact prompt version, the adapter version
behind the alias with its eval state, and the feedback users gave the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.core.audit import BufferedWriter
from app.core.db import enable_wal, write_transaction
from app.core.errors import InvalidRequest, NotFound, StoreUnavailable
from app.core.migrate import Migrations, upgrade_sqlite
from app.core.types import Citations, Finished, Started, Usage
from app.guardrails.types import GuardrailBlocked, GuardrailRedaction, GuardrailRetraction, event_payload
from app.llm.routing import RoutingTable
from app.services.chat import ChatEvent, ChatRequest, collect

log = logging.getLogger("keel.lineage")

MIGRATIONS = Migrations(Path(__file__).with_name("lineage_migrations"), "alembic_version_lineage")
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def check_id(completion_id: str) -> str:
    if not completion_id or len(completion_id) > 200 or not set(completion_id) <= _ID_CHARS:
        raise InvalidRequest("a completion id is what a chat response's `id` says (chatcmpl-...): letters, digits "
                             "and -_.: only, at most 200", param="id")
    return completion_id


class LineageStore:
    """``<home>/lineage.db``: one JSON document per completion id."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.Lock()
        with self._errors():
            if not memory:
                enable_wal(self._db)
            upgrade_sqlite(self._db, MIGRATIONS)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            raise StoreUnavailable(f"the lineage store at {self.path} is unavailable ({e})") from None

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        rows = [(r["id"], r.get("request_id") or "", r["created"], r.get("owner") or "",
                 json.dumps(r, sort_keys=True, separators=(",", ":"), default=str)) for r in records]
        with self._errors(), write_transaction(self._db, self._lock) as db:
            db.executemany("INSERT INTO lineage (id, request_id, created, owner, record) VALUES (?, ?, ?, ?, ?) "
                           "ON CONFLICT (id) DO UPDATE SET record = excluded.record", rows)

    def get(self, completion_id: str) -> dict[str, Any] | None:
        with self._errors(), self._lock:
            row = self._db.execute("SELECT record FROM lineage WHERE id = ?", (completion_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def recent(self, *, owner: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT record FROM lineage" + (" WHERE owner = ?" if owner else "") + " ORDER BY created DESC LIMIT ?"
        with self._errors(), self._lock:
            rows = self._db.execute(sql, (owner, limit) if owner else (limit,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class LineageRecorder:
    """The chat front door: passes every response through untouched and records its lineage afterwards."""

    def __init__(self, inner: Any, store: LineageStore, routes: RoutingTable, *, default_model: str,
                 variant_model: Callable[[str, str], str | None] | None = None, flush_interval_s: float = 0.2
                 ) -> None:
        """``variant_model(release, variant)``: the model alias a release variant answers with."""
        self.inner = inner
        self.store = store
        self.routes = routes
        self.default_model = default_model
        self.variant_model = variant_model
        self._writer: BufferedWriter[dict[str, Any]] = BufferedWriter(
            store.write, interval_s=flush_interval_s, name="keel-lineage", what="lineage records")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, request: ChatRequest, *, reask: bool = False) -> AsyncIterator[ChatEvent]:
        return self._recorded(request, self.inner.stream(request, reask=reask))

    async def complete(self, request: ChatRequest):
        return await collect(self.stream(request, reask=True))

    async def _recorded(self, request: ChatRequest, events: AsyncIterator[ChatEvent]) -> AsyncIterator[ChatEvent]:
        record: dict[str, Any] | None = None
        guards: list[dict[str, Any]] = []
        finish: dict[int, str] = {}
        outcome = "ok"
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, Started):
                        record = self._started(request, event)
                    elif isinstance(event, GuardrailRedaction | GuardrailRetraction | GuardrailBlocked):
                        guards.append(event_payload(event))
                    elif isinstance(event, Citations) and record is not None:
                        record["retrieval"] = [
                            {k: c.get(k) for k in ("index", "doc_id", "chunk_id", "snapshot_id", "source", "title",
                                                   "score", "cited")} for c in event.items]
                    elif isinstance(event, Finished):
                        finish[event.index] = event.reason
                    elif isinstance(event, Usage) and record is not None:
                        record["usage"] = {"prompt_tokens": event.prompt_tokens,
                                           "completion_tokens": event.completion_tokens}
                    yield event
        except BaseException as exc:
            outcome = "cancelled" if isinstance(exc, GeneratorExit | asyncio.CancelledError) else getattr(
                exc, "code", "error")
            raise
        finally:
            if record is not None:
                record.update(guardrail_events=guards, finish_reasons={str(k): v for k, v in finish.items()},
                              outcome=outcome, latency_ms=round((time.time() - record["created"]) * 1000, 3))
                self._writer.submit([record])

    def _started(self, request: ChatRequest, event: Started) -> dict[str, Any]:
        served = request.model or ""
        rec: dict[str, Any] = {
            "id": event.id, "request_id": request.request_id, "trace_id": event.trace_id, "created": time.time(),
            "owner": request.user or "",
            "model": event.model, "requested_model": request.model,
            "prompt": {"ref": event.prompt_ref, "hash": event.prompt_hash} if event.prompt_ref else None,
            "release": {"name": event.release, "variant": event.variant} if event.release else None,
            "guardrails": {"policy": event.guardrails} if event.guardrails else None,
            "retrieval": None,
        }
        if event.release is not None:
            served = (self.variant_model(event.release, event.variant or "") if self.variant_model else None) or ""
        if served.startswith("agent:"):
            rec["route"] = {"workflow": served.removeprefix("agent:")}  # its runs record the models it called
        else:
            rec["route"] = self._route(self.default_model if not served or served.startswith("rag:") else served)
        return rec

    def _route(self, alias: str) -> dict[str, Any] | None:
        spec = self.routes.get(alias)
        if spec is None:
            return None
        route = next((r for r in self.routes.routes() if r.alias == alias), None)
        return {"alias": alias, "backend": spec.backend, "model": spec.model,
                "adapter": str(spec.adapter) if spec.adapter else None, "owner": route.owner if route else None,
                "revision": route.revision if route else None}

    def flush(self, timeout: float | None = 10.0) -> None:
        self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close(10.0)
        self.store.close()


# -- reading --------------------------------------------------------------------------------------------------

GuardVerdicts = Callable[[str], list[dict[str, Any]]]
PromptRuns = Callable[[str, int], list[dict[str, Any]]]
AdapterInfo = Callable[[str], dict[str, Any] | None]
Feedback = Callable[[str], list[dict[str, Any]]]


class Lineage:
    """Reads a record and joins what other stores know about its artifacts (each join optional)."""

    def __init__(self, recorder: LineageRecorder, *, verdicts: GuardVerdicts | None = None,
                 prompt_runs: PromptRuns | None = None, adapter: AdapterInfo | None = None,
                 feedback: Feedback | None = None) -> None:
        self.recorder = recorder
        self.verdicts = verdicts
        self.prompt_runs = prompt_runs
        self.adapter = adapter
        self.feedback = feedback

    def get(self, completion_id: str, *, owner: str | None = None) -> dict[str, Any]:
        """The lineage of ``completion_id``; ``owner``: only a record of that key (others' answers are 404)."""
        check_id(completion_id)
        self.recorder.flush(5.0)
        record = self.recorder.store.get(completion_id)
        if record is None or (owner is not None and record.get("owner") != owner):
            raise NotFound(f"no lineage for {completion_id!r}: it is the `id` of a chat response this key received",
                           param="id", code="lineage_not_found")
        out = dict(record)
        if self.verdicts is not None and record.get("request_id"):
            out["guardrail_verdicts"] = self.verdicts(record["request_id"])
        prompt = record.get("prompt")
        if prompt and self.prompt_runs is not None and "@" in (prompt.get("ref") or ""):
            name, _, version = prompt["ref"].partition("@")
            if version.isdigit():
                runs = self.prompt_runs(name, int(version))
                prompt["name"], prompt["version"] = name, int(version)
                prompt["eval_runs"] = [r for r in runs if not prompt.get("hash") or r.get("prompt_hash") in
                                       (None, prompt["hash"])]
        route = record.get("route")
        if route and route.get("alias") and self.adapter is not None:
            route["adapter_version"] = self.adapter(route["alias"])
        if self.feedback is not None:
            out["feedback"] = self.feedback(completion_id)
        return out
