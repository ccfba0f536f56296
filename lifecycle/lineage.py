"""Lineage: exactly what produced an answer, keyed by its OpenAI completion id.

Every chat response (streamed or not, through a release or not) leaves one record: the model alias asked for
and the route that served it (backend, model, adapter, the routing table's owner and revision), the prompt
version and its content hash, the release and variant, the guardrail policy version and what the guards did,
the passages given to the model (document, chunk and ingest snapshot ids, scores, whether the answer cited
them), the finish reasons and tokens. Records are written in batches off the request path.

Reading a record joins what was decided elsewhere about those artifacts: every guardrail verdict on the
request (the guardrail audit, by request id), the eval runs of that exact prompt version, the eval runs of the
adapter version that answered (its model, version, folder and content hash are resolved by the writer when the
record is written, from the deployment the route served: a later redeploy of the alias does not rewrite history),
and the feedback users gave the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.core.audit import BufferedWriter
from app.core.db import PostgresPool, SqliteFile, warn_if_left_behind
from app.core.errors import InvalidRequest, NotFound
from app.core.migrate import Migrations, upgrade_postgres
from app.core.types import Citations, Finished, Started, TextDelta, Usage
from app.guardrails.types import GuardrailBlocked, GuardrailRedaction, GuardrailRetraction, event_payload
from app.llm.routing import RoutingTable
from app.services.chat import ChatEvent, ChatRequest, collect

log = logging.getLogger("keel.lineage")

MIGRATIONS = Migrations(Path(__file__).with_name("lineage_migrations"), "alembic_version_lineage",
                        pg_lock_key=0x6B65656C_6C69)  # "keelli"
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def check_id(completion_id: str) -> str:
    if not completion_id or len(completion_id) > 200 or not set(completion_id) <= _ID_CHARS:
        raise InvalidRequest("a completion id is what a chat response's `id` says (chatcmpl-...): letters, digits "
                             "and -_.: only, at most 200", param="id")
    return completion_id


@dataclass(frozen=True, slots=True)
class Features:
    """One answer as the drift monitor sees it: sizes, retrieval quality, refusals, guard hits, and the question's
    embedding (float16 MiniLM, when sampled) — never the text."""

    id: str
    at: float
    owner: str
    model: str
    release: str | None
    variant: str | None
    question_chars: int
    input_chars: int
    answer_chars: int
    prompt_tokens: int
    completion_tokens: int
    top_score: float | None  # best retrieval score (grounded answers)
    grounded: bool
    refused: bool
    validators: str  # the guardrail validators that acted, comma-separated
    outcome: str
    question: str | None = None  # only on its way to the writer thread
    embedding: bytes | None = None

    def vector(self) -> np.ndarray | None:
        return None if self.embedding is None else np.frombuffer(self.embedding, dtype=np.float16).astype(np.float32)


FEATURE_COLUMNS = ("id", "at", "owner", "model", "release", "variant", "question_chars", "input_chars",
                   "answer_chars", "prompt_tokens", "completion_tokens", "top_score", "grounded", "refused",
                   "validators", "outcome", "embedding")


class LineageStore:
    """One JSON document per completion id, and the drift features of each answer: ``<home>/lineage.db`` by
    default, or Postgres (``monitor.url``, or ``database_url``: :class:`PostgresLineageStore`) so that every API
    process answers for every answer and the drift monitor sees the whole fleet's traffic."""

    _mark = "?"
    _clock = "((julianday('now') - 2440587.5) * 86400.0)"  # unix seconds, the database's clock

    def __init__(self, path: Path | str) -> None:
        self._file = SqliteFile(path, MIGRATIONS, what="the lineage store")
        self.path = self._file.path

    # -- what a backend provides ----------------------------------------------------------------------------------

    def _write_many(self, *statements: tuple[str, Sequence[Sequence[Any]]]) -> None:
        with self._file.tx() as db:
            for sql, rows in statements:
                db.executemany(sql, rows)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._file.read(sql, args)

    def _write_returning(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._file.tx() as db:
            return db.execute(sql, tuple(args)).fetchall()

    def close(self) -> None:
        self._file.close()

    # -- the SQL both share -----------------------------------------------------------------------------------

    def _q(self, sql: str) -> str:
        return sql.replace("?", self._mark)

    def write(self, records: Sequence[dict[str, Any]], features: Sequence[Features] = ()) -> None:
        rows = [(r["id"], r.get("request_id") or "", r["created"], r.get("owner") or "",
                 json.dumps(r, sort_keys=True, separators=(",", ":"), default=str)) for r in records]
        updates = ", ".join(f"{c} = excluded.{c}" for c in FEATURE_COLUMNS[1:])
        self._write_many(
            (self._q("INSERT INTO lineage (id, request_id, created, owner, record) VALUES (?, ?, ?, ?, ?) "
                     "ON CONFLICT (id) DO UPDATE SET record = excluded.record"), rows),
            (self._q(f"INSERT INTO features ({', '.join(FEATURE_COLUMNS)}) VALUES "
                     f"({', '.join('?' * len(FEATURE_COLUMNS))}) ON CONFLICT (id) DO UPDATE SET {updates}"),
             [tuple(int(v) if isinstance(v, bool) else v for v in (getattr(f, c) for c in FEATURE_COLUMNS))
              for f in features]))

    def features(self, *, since: float | None = None, until: float | None = None, release: str | None = None,
                 variant: str | None = None, limit: int = 100_000) -> list[Features]:
        """A window of traffic's drift features, oldest first (``release``/``variant``: one arm of a release)."""
        where, args = ["1 = 1"], []
        for column, value, op in (("at", since, ">="), ("at", until, "<"), ("release", release, "="),
                                  ("variant", variant, "=")):
            if value is not None:
                where.append(f"{column} {op} ?")
                args.append(value)
        sql = (f"SELECT {', '.join(FEATURE_COLUMNS)} FROM (SELECT * FROM features WHERE {' AND '.join(where)} "
               "ORDER BY at DESC LIMIT ?) AS w ORDER BY at")
        out = []
        for r in self._read(self._q(sql), (*args, limit)):
            f = dict(zip(FEATURE_COLUMNS, r, strict=True))
            out.append(Features(**{**f, "grounded": bool(f["grounded"]), "refused": bool(f["refused"]),
                                   "embedding": None if f["embedding"] is None else bytes(f["embedding"])}))
        return out

    def get(self, completion_id: str) -> dict[str, Any] | None:
        rows = self._read(self._q("SELECT record FROM lineage WHERE id = ?"), (completion_id,))
        return json.loads(rows[0][0]) if rows else None

    def recent(self, *, owner: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        sql = "SELECT record FROM lineage" + (" WHERE owner = ?" if owner else "") + " ORDER BY created DESC LIMIT ?"
        return [json.loads(r[0]) for r in self._read(self._q(sql), (owner, limit) if owner else (limit,))]

    def claim(self, name: str, every_s: float, *, now: float | None = None) -> bool:
        """True for the one caller (of all processes on this store) that gets this round of the periodic task
        ``name``: at most one claim per ``every_s`` (less a tenth, for timers that drift), timed by the
        database's clock (``now`` for tests), so a process whose clock is off cannot block or double the rounds."""
        clock = "?" if now is not None else self._clock
        sql = (f"INSERT INTO lineage_schedule (name, last_at) VALUES (?, {clock}) ON CONFLICT (name) DO UPDATE SET "
               "last_at = excluded.last_at WHERE lineage_schedule.last_at <= excluded.last_at - ? RETURNING name")
        args = (name, now, 0.9 * every_s) if now is not None else (name, 0.9 * every_s)
        return bool(self._write_returning(self._q(sql), args))


class PostgresLineageStore(LineageStore):
    """The lineage and drift features of every API process in one Postgres database."""

    _mark = "%s"
    _clock = "EXTRACT(EPOCH FROM clock_timestamp())::DOUBLE PRECISION"

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        self.path = None
        self._pg = PostgresPool(url, whose="the lineage store's", setting="monitor.url", name="keel-lineage",
                                migrate=lambda t: upgrade_postgres(url, MIGRATIONS, connect_timeout_s=t),
                                timeout_s=timeout_s)

    def _write_many(self, *statements: tuple[str, Sequence[Sequence[Any]]]) -> None:
        with self._pg.transaction() as conn, conn.cursor() as cur:
            for sql, rows in statements:
                if rows:
                    cur.executemany(sql, rows)

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._pg.statement(sql, tuple(args))

    def _write_returning(self, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._pg.statement(sql, tuple(args))

    def close(self) -> None:
        self._pg.close()


def open_lineage_store(settings: Any) -> LineageStore:
    """The lineage store the settings name (``monitor.url``, else ``<home>/lineage.db``)."""
    url, path = settings.monitor.url, Path(settings.home) / "lineage.db"
    if url is None:
        return LineageStore(path)
    warn_if_left_behind(path, "the lineage store", "monitor.url (or database_url)")
    return PostgresLineageStore(url.get_secret_value())


class LineageRecorder:
    """The chat front door: passes every response through untouched and records its lineage afterwards."""

    def __init__(self, inner: Any, store: LineageStore, routes: RoutingTable, *, default_model: str,
                 variant_model: Callable[[str, str], str | None] | None = None, flush_interval_s: float = 0.2,
                 embed: Callable[[list[str]], Any] | None = None, embed_sample: float = 1.0,
                 adapter_of: AdapterOf | None = None) -> None:
        """``variant_model(release, variant)``: the model alias a release variant answers with; ``embed``: the
        embedder of the questions' drift features (a share ``embed_sample`` of them), run by the writer thread;
        ``adapter_of(route)``: the registered adapter version a route served (model, version, folder, content
        hash) or None, asked by the writer thread."""
        self.inner = inner
        self.store = store
        self.routes = routes
        self.default_model = default_model
        self.variant_model = variant_model
        self.embed = embed
        self.embed_sample = embed_sample
        self.adapter_of = adapter_of
        self._writer: BufferedWriter[tuple[dict[str, Any], Features]] = BufferedWriter(
            self._write, interval_s=flush_interval_s, name="keel-lineage", what="lineage records")

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
        answer_chars = 0
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
                    elif isinstance(event, TextDelta) and event.index == 0:
                        answer_chars += len(event.text)
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
                self._writer.submit([(record, self._features(request, record, answer_chars))])

    def _features(self, request: ChatRequest, record: dict[str, Any], answer_chars: int) -> Features:
        """What the drift monitor compares between windows of traffic (no text is kept: the question's embedding
        is computed by the writer thread, then the text is dropped)."""
        question = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        scores = [c["score"] for c in record.get("retrieval") or () if c.get("score") is not None]
        validators = sorted({g["validator"] for g in record["guardrail_events"] if g.get("validator")})
        refused = "content_filter" in record["finish_reasons"].values() or any(
            g.get("type") == "blocked" for g in record["guardrail_events"])
        usage = record.get("usage") or {}
        embed = self.embed is not None and question and random.random() < self.embed_sample
        release = record.get("release") or {}
        return Features(
            record["id"], record["created"], record.get("owner") or "", record.get("model") or "",
            release.get("name"), release.get("variant"), len(question),
            sum(len(m.content) for m in request.messages), answer_chars, int(usage.get("prompt_tokens") or 0),
            int(usage.get("completion_tokens") or 0), max(scores) if scores else None, record["retrieval"] is not None,
            refused, ",".join(validators), record["outcome"], question if embed else None)

    def _started(self, request: ChatRequest, event: Started) -> dict[str, Any]:
        served = request.model or ""
        rec: dict[str, Any] = {
            "id": event.id, "request_id": request.request_id, "trace_id": event.trace_id, "created": time.time(),
            "owner": request.user or "",
            "model": event.model, "requested_model": request.model,
            "prompt": {"ref": event.prompt_ref, "hash": event.prompt_hash,
                       **({"features": dict(event.features)} if event.features else {})}
            if event.prompt_ref else None,
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

    def _write(self, batch: Sequence[tuple[dict[str, Any], Features]]) -> None:
        for record, _ in batch:
            self._resolve_adapter(record)
        questions = [(i, f.question) for i, (_, f) in enumerate(batch) if f.question]
        vectors: dict[int, bytes] = {}
        if questions and self.embed is not None:
            try:
                embedded = np.asarray(self.embed([q for _, q in questions]), dtype=np.float32)
                vectors = {i: v.astype(np.float16).tobytes() for (i, _), v in zip(questions, embedded, strict=True)}
            except Exception:  # drift features without embeddings beat losing the lineage
                log.exception("embedding %d questions for drift features failed", len(questions))
        self.store.write([r for r, _ in batch], [replace(f, question=None, embedding=vectors.get(i))
                                                 for i, (_, f) in enumerate(batch)])

    def _resolve_adapter(self, record: dict[str, Any]) -> None:
        route = record.get("route")
        if not route or not route.get("alias") or self.adapter_of is None or "adapter_version" in route:
            return
        try:
            route["adapter_version"] = self.adapter_of(route)
        except Exception:  # the record without its adapter's version beats no record
            log.exception("resolving the adapter version of %s failed", route["alias"])

    def flush(self, timeout: float | None = 10.0) -> None:
        self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close(10.0)
        self.store.close()


# -- reading --------------------------------------------------------------------------------------------------

GuardVerdicts = Callable[[str], list[dict[str, Any]]]
PromptRuns = Callable[[str, int], list[dict[str, Any]]]
AdapterOf = Callable[[dict[str, Any]], dict[str, Any] | None]  # a record's route -> the adapter version it served
AdapterRuns = Callable[[dict[str, Any]], list[dict[str, Any]]]  # an adapter version -> eval runs on it
Feedback = Callable[[str], list[dict[str, Any]]]


class Lineage:
    """Reads a record and joins what other stores know about its artifacts (each join optional)."""

    def __init__(self, recorder: LineageRecorder, *, verdicts: GuardVerdicts | None = None,
                 prompt_runs: PromptRuns | None = None, adapter_runs: AdapterRuns | None = None,
                 feedback: Feedback | None = None) -> None:
        self.recorder = recorder
        self.verdicts = verdicts
        self.prompt_runs = prompt_runs
        self.adapter_runs = adapter_runs
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
        if route and route.get("alias"):
            if "adapter_version" not in route:  # a record of a release that did not resolve it when writing
                route["adapter_version"] = self._adapter_now(route)
            version = route.setdefault("adapter_version", None)
            if version and self.adapter_runs is not None:
                version["eval_runs"] = self.adapter_runs(version)
        if self.feedback is not None:
            out["feedback"] = self.feedback(completion_id)
        return out

    def _adapter_now(self, route: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.recorder.adapter_of(route) if self.recorder.adapter_of else None
        except Exception:
            log.exception("resolving the adapter version of %s failed", route["alias"])
            return None
