"""Batch serving, in the OpenAI Batch API's shape: upload a JSONL file of requests, create a batch, fetch the
output and error files when it is done.

A batch is a durable job (kind ``batch``, :mod:`app.jobs`) on the API's job runner: each request line goes
through ``respond`` — the API's own chat path, so releases, guardrails, traces and lineage apply exactly as to
an interactive request, with the batch owner's key as the identity — and its outcome is stored as it
finishes, so a restart resumes at the lines not answered yet. Batch work yields to interactive traffic: while
interactive model calls are in flight in this process, and for ``yield_s`` after, the batch runs at most
``concurrency_under_load`` requests at once (otherwise ``concurrency``).

Bad lines do not fail the batch: a line that is not JSON, lacks a ``custom_id`` (or repeats one), is not a
``POST`` to the batch's endpoint, or whose body the endpoint refuses goes to the error file with its line
number and why; the rest are answered. Cancel stops at the next request (what finished is kept, in the
output file); a batch still running at its ``completion_window`` ends ``expired`` the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from app.core.errors import InvalidRequest, NotFound, ShuttingDown
from app.jobs import Job, JobContext, JobRunner
from app.jobs.queue import JobCancelled
from lifecycle.batch.settings import BatchSettings
from lifecycle.batch.store import BatchStore

log = logging.getLogger("keel.batch")

KIND = "batch"
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
WINDOWS = {"24h": 86_400}
FINAL = ("completed", "failed", "expired", "cancelled")

#: ``respond(url, body, owner, scopes, request_id)`` -> (HTTP status, response body): one request as the API
#: would answer it.
Respond = Callable[[str, dict[str, Any], str, "frozenset[str] | None", str], Awaitable[tuple[int, dict[str, Any]]]]


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class BatchService:
    def __init__(self, store: BatchStore, runner: JobRunner | None, settings: BatchSettings, *,
                 load: Callable[[], int] = lambda: 0) -> None:
        """``load``: model calls in flight in this process that a person waits on (the batch's own included;
        shadows, probes and eval runs not: ``ChatService.active - background``)."""
        self.store = store
        self.runner = runner
        self.settings = settings
        self.load = load
        self.respond: Respond | None = None  # the API's, set when it starts
        self._active = 0
        self._yield_until = 0.0  # monotonic: batch work stays at concurrency_under_load until then

    def register(self, runner: JobRunner) -> None:
        runner.register(KIND, self, slots=self.settings.slots)

    # -- files ---------------------------------------------------------------------------------------

    def create_file(self, *, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != "batch":
            raise InvalidRequest(f"purpose {purpose!r} is not supported here: upload request files with purpose "
                                 "'batch'", param="purpose")
        if not data.strip():
            raise InvalidRequest("the file is empty: upload JSONL, one request per line", param="file")
        if len(data) > self.settings.max_file_bytes:
            raise InvalidRequest(f"the file is {len(data)} bytes; batch.max_file_bytes is "
                                 f"{self.settings.max_file_bytes}", param="file")
        return self._save(owner, filename, purpose, data)

    def _save(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        row = {"id": new_id("file-"), "owner": owner, "filename": Path(filename or "upload.jsonl").name[:255],
               "purpose": purpose, "bytes": len(data), "created_at": int(time.time())}
        self.store.add_file(row, data)
        return public_file(row)

    def file(self, file_id: str, *, owner: str | None) -> dict[str, Any]:
        row = self.store.get_file(file_id)
        if row is None or (owner is not None and row["owner"] != owner):
            raise NotFound(f"no file {file_id!r}", param="file_id", code="file_not_found")
        return row

    def content(self, file_id: str, *, owner: str | None) -> tuple[dict[str, Any], Path]:
        """A file's row and a local path to its bytes."""
        row = self.file(file_id, owner=owner)
        return row, self._bytes(row)

    def _bytes(self, row: dict[str, Any]) -> Path:
        path = self.store.content(row)
        if path is None:
            raise NotFound(f"the content of file {row['id']} is gone; upload it again", param="file_id",
                           code="file_not_found")
        return path

    def files(self, *, owner: str | None, purpose: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return [public_file(r) for r in self.store.list_files(owner=owner, purpose=purpose, limit=limit)]

    def delete_file(self, file_id: str, *, owner: str | None) -> dict[str, Any]:
        self.store.delete_file(self.file(file_id, owner=owner))
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches -------------------------------------------------------------------------------------

    async def create(self, *, owner: str, scopes: frozenset[str] | None, input_file_id: str, endpoint: str,
                     completion_window: str = "24h", metadata: dict[str, str] | None = None) -> dict[str, Any]:
        if endpoint not in ENDPOINTS:
            raise InvalidRequest(f"endpoint {endpoint!r} is not supported in a batch; supported: "
                                 f"{', '.join(ENDPOINTS)}", param="endpoint")
        if completion_window not in WINDOWS:
            raise InvalidRequest(f"completion_window {completion_window!r}: use {', '.join(WINDOWS)}",
                                 param="completion_window")
        if self.runner is None:
            raise InvalidRequest("this server runs no job queue, so it cannot run batches", code="batches_off")
        f = await asyncio.to_thread(self.file, input_file_id, owner=owner)
        if f["purpose"] != "batch":
            raise InvalidRequest(f"file {input_file_id} has purpose {f['purpose']!r}; a batch reads a file "
                                 "uploaded with purpose 'batch'", param="input_file_id")
        lines = await asyncio.to_thread(lambda: _count_lines(self._bytes(f)))
        if lines > self.settings.max_requests:
            raise InvalidRequest(f"the file has {lines} requests; batch.max_requests is {self.settings.max_requests}",
                                 param="input_file_id")
        now = int(time.time())
        batch = {"id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
                 "input_file_id": input_file_id, "completion_window": completion_window, "status": "validating",
                 "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                 "expires_at": now + WINDOWS[completion_window], "finalizing_at": None, "completed_at": None,
                 "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                 "request_counts": {"total": lines, "completed": 0, "failed": 0}, "metadata": metadata or None}
        await asyncio.to_thread(self.store.put_batch, batch, owner=owner)
        job = await self.runner.submit(KIND, {"batch_id": batch["id"],
                                              "scopes": sorted(scopes) if scopes is not None else None},
                                       owner=owner, max_attempts=self.settings.max_attempts)
        await asyncio.to_thread(self.store.set_job, batch["id"], job.id)
        return batch

    def get(self, batch_id: str, *, owner: str | None) -> dict[str, Any]:
        found = self.store.get_batch(batch_id)
        if found is None or (owner is not None and found[1] != owner):
            raise NotFound(f"no batch {batch_id!r}", param="batch_id", code="batch_not_found")
        batch = found[0]
        if batch["status"] == "in_progress":  # the counts as of now, not as of the last save
            done, failed = self.store.counts(batch_id)
            batch["request_counts"] = {**batch["request_counts"], "completed": done, "failed": failed}
        return batch

    def list(self, *, owner: str | None, after: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        return self.store.list_batches(owner=owner, after=after, limit=limit)

    async def cancel(self, batch_id: str, *, owner: str | None, actor: str = "") -> dict[str, Any]:
        batch = await asyncio.to_thread(self.get, batch_id, owner=owner)
        if batch["status"] in FINAL:
            return batch
        found = await asyncio.to_thread(self.store.get_batch, batch_id)
        assert found is not None
        batch = {**batch, "status": "cancelling", "cancelling_at": int(time.time())}
        if not await asyncio.to_thread(self.store.put_batch, batch, owner=found[1]):
            return await asyncio.to_thread(self.get, batch_id, owner=owner)  # it finished meanwhile
        if found[2] is not None and self.runner is not None:
            try:
                job = await self.runner.cancel(found[2], actor=actor or found[1])
            except NotFound:  # queued on another process's queue: it stops at its next flush (``cancelling``)
                return batch
            if job.state == "cancelled" and batch["in_progress_at"] is None:  # it never started
                batch = await asyncio.to_thread(self._finish, batch, found[1], "cancelled")
        return batch

    # -- the job -------------------------------------------------------------------------------------

    async def __call__(self, job: Job, ctx: JobContext) -> dict[str, Any]:
        batch_id = job.payload["batch_id"]
        scopes = frozenset(job.payload["scopes"]) if job.payload.get("scopes") is not None else None
        found = await asyncio.to_thread(self.store.get_batch, batch_id)
        if found is None:
            raise NotFound(f"batch {batch_id} is gone", code="batch_not_found")
        batch, owner, _ = found
        if batch["status"] in FINAL:
            return {"batch_id": batch_id, "status": batch["status"]}
        if self.respond is None:
            raise ShuttingDown("the API is not serving yet; the batch resumes when it is")
        parsed = await asyncio.to_thread(self._read_input, batch)
        if parsed is None:
            await asyncio.to_thread(self._finish, batch, owner, "failed", errors=[{
                "code": "input_file_missing", "line": None, "message": "the input file was deleted"}])
            return {"batch_id": batch_id, "status": "failed"}
        requests, bad = parsed
        if batch["status"] in ("validating", "cancelling") and batch["in_progress_at"] is None:
            batch = {**batch, "status": "in_progress" if batch["status"] == "validating" else "cancelling",
                     "in_progress_at": int(time.time()),
                     "request_counts": {"total": len(requests) + len(bad), "completed": 0, "failed": 0}}
            if not await asyncio.to_thread(self.store.put_batch, batch, owner=owner):
                batch = (await asyncio.to_thread(self.store.get_batch, batch_id))[0]  # cancelled meanwhile
                if batch["status"] in FINAL:
                    return {"batch_id": batch_id, "status": batch["status"]}
        done = await asyncio.to_thread(self.store.done_lines, batch_id)
        await asyncio.to_thread(self.store.add_results, batch_id, [
            (line, cid, False, _error_record(cid, code, message, line)) for line, cid, code, message in bad
            if line not in done])
        pending = [r for r in requests if r[0] not in done]
        try:
            if batch["status"] == "cancelling":  # cancelled through another process before this one started it
                raise JobCancelled(f"batch {batch_id} was cancelled")
            await self._answer(batch, owner, scopes, pending, ctx)
        except JobCancelled:
            await asyncio.to_thread(self._finish, self.store.get_batch(batch_id)[0], owner, "cancelled")
            raise
        status = "expired" if time.time() > batch["expires_at"] and self._unanswered(batch_id, requests) else \
            "completed"
        batch = await asyncio.to_thread(self._finish, self.store.get_batch(batch_id)[0], owner, status)
        return {"batch_id": batch_id, "status": status, **batch["request_counts"]}

    def _read_input(self, batch: dict[str, Any]) -> tuple[list, list] | None:
        f = self.store.get_file(batch["input_file_id"])
        path = self.store.content(f) if f is not None else None
        return None if path is None else parse_lines(path, batch["endpoint"])

    async def _answer(self, batch: dict[str, Any], owner: str, scopes: frozenset[str] | None,
                      pending: list[tuple[int, str, dict[str, Any]]], ctx: JobContext) -> None:
        assert self.respond is not None
        respond, url, bid = self.respond, batch["endpoint"], batch["id"]
        buffer: list[tuple[int, str | None, bool, dict[str, Any]]] = []
        last_flush = time.monotonic()
        total = batch["request_counts"]["total"]

        async def flush() -> None:
            nonlocal buffer, last_flush
            out, buffer, last_flush = buffer, [], time.monotonic()
            if out:
                await asyncio.to_thread(self.store.add_results, bid, out)
            ok, failed = await asyncio.to_thread(self.store.counts, bid)
            ctx.set_progress({"batch_id": bid, "completed": ok, "failed": failed, "total": total})

        async def one(line: int, cid: str, body: dict[str, Any]) -> None:
            request_id = f"{bid}-{line}"
            try:
                status, answer = await respond(url, body, owner, scopes, request_id)
            except Exception as e:  # the responder's own failure: this line fails, the batch goes on
                log.exception("batch %s line %d failed", bid, line)
                status, answer = 500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error",
                                                 "code": "internal_error", "param": None}}
            buffer.append((line, cid, status == 200, _record(cid, request_id, status, answer)))

        running: set[asyncio.Task] = set()
        try:
            for line, cid, body in pending:
                ctx.check()  # cancel or shutdown: stop starting requests
                if time.time() > batch["expires_at"]:
                    break
                await self._slot(running)
                task = asyncio.create_task(one(line, cid, body))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _t: self._release())
                if len(buffer) >= 50 or time.monotonic() - last_flush > 1.0:
                    await flush()
                    # cancelled through a process that does not share this one's job queue: only the shared
                    # batch store says so
                    if await asyncio.to_thread(self.store.status, bid) == "cancelling":
                        raise JobCancelled(f"batch {bid} was cancelled; what it finished before is kept")
            if running:
                await asyncio.gather(*running)
        finally:
            if running:  # stopping: let the requests in flight finish, so their answers are kept
                await asyncio.gather(*running, return_exceptions=True)
            await flush()

    async def _slot(self, running: set[asyncio.Task]) -> None:
        """Wait for a free slot: ``concurrency`` when no interactive request is in flight nor was for
        ``yield_s``, else ``concurrency_under_load``."""
        while True:
            now = time.monotonic()
            if self.load() > self._active:  # interactive requests in flight
                self._yield_until = now + self.settings.yield_s
            limit = self.settings.concurrency_under_load if now <= self._yield_until else self.settings.concurrency
            if len(running) < max(1, limit):
                self._active += 1
                return
            await asyncio.sleep(0.01)

    def _release(self) -> None:
        self._active = max(0, self._active - 1)

    def _unanswered(self, batch_id: str, requests: list[tuple[int, str, dict[str, Any]]]) -> bool:
        done = self.store.done_lines(batch_id)
        return any(line not in done for line, _, _ in requests)

    def _finish(self, batch: dict[str, Any], owner: str, status: str, *,
                errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Write the output and error files (what finished, in line order) and the batch's final state."""
        now = int(time.time())
        batch = {**batch, "status": "finalizing", "finalizing_at": now}
        results = self.store.results(batch["id"])
        out = [rec for _, ok, rec in results if ok]
        err = [rec for _, ok, rec in results if not ok]
        if out:
            batch["output_file_id"] = self._save(owner, f"{batch['id']}_output.jsonl", "batch_output",
                                                 _jsonl(out))["id"]
        if err:
            batch["error_file_id"] = self._save(owner, f"{batch['id']}_error.jsonl", "batch_output",
                                                _jsonl(err))["id"]
        batch["request_counts"] = {**batch["request_counts"], "completed": len(out), "failed": len(err)}
        batch["status"] = status
        batch[{"completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
               "cancelled": "cancelled_at"}[status]] = now
        if errors:
            batch["errors"] = {"object": "list", "data": errors}
        self.store.put_batch(batch, owner=owner)
        return batch


def parse_lines(path: Path, endpoint: str) -> tuple[list[tuple[int, str, dict[str, Any]]],
                                                     list[tuple[int, str | None, str, str]]]:
    """(requests as (line, custom_id, body), bad lines as (line, custom_id, code, message)); lines count from 1,
    blank lines are skipped."""
    requests: list[tuple[int, str, dict[str, Any]]] = []
    bad: list[tuple[int, str | None, str, str]] = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except ValueError as e:
                bad.append((n, None, "invalid_json", f"line {n} is not JSON ({e.msg})"))
                continue
            if not isinstance(item, dict):
                bad.append((n, None, "invalid_request", f"line {n} is not a JSON object"))
                continue
            cid = item.get("custom_id")
            if not isinstance(cid, str) or not cid or len(cid) > 512:
                bad.append((n, None, "invalid_custom_id", f"line {n} needs a custom_id (a non-empty string)"))
                continue
            if cid in seen:
                bad.append((n, cid, "duplicate_custom_id", f"line {n} repeats custom_id {cid!r}"))
                continue
            seen.add(cid)
            if item.get("method", "POST") != "POST":
                bad.append((n, cid, "invalid_method", f"line {n}: method must be POST"))
            elif item.get("url") != endpoint:
                bad.append((n, cid, "mismatched_url", f"line {n}: url {item.get('url')!r} is not the batch's "
                                                      f"endpoint {endpoint}"))
            elif not isinstance(item.get("body"), dict):
                bad.append((n, cid, "invalid_body", f"line {n}: body must be a JSON object (the request)"))
            else:
                requests.append((n, cid, item["body"]))
    return requests, bad


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(1 for raw in fh if raw.strip())


def _record(cid: str, request_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    error = None
    if status != 200:
        e = body.get("error") if isinstance(body, dict) else None
        error = {"code": (e or {}).get("code") or "error", "message": (e or {}).get("message") or str(body)}
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": cid,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": error}


def _error_record(cid: str | None, code: str, message: str, line: int) -> dict[str, Any]:
    return {"id": f"batch_req_{secrets.token_hex(12)}", "custom_id": cid, "response": None,
            "error": {"code": code, "message": message, "line": line}}


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records).encode()


def public_file(row: dict[str, Any]) -> dict[str, Any]:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"]}


__all__ = ["KIND", "BatchService", "Respond", "parse_lines", "public_file"]
