"""The dataset step's pure parts: production answers people rated well, read back from their traces, and one
JSONL file with its manifest (the run's dataset snapshot: sources, counts and the content hash)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol


class Spans(Protocol):
    def traces(self, *, limit: int = 50, before_ns: int | None = None, name: str | None = None,
               response_id: str | None = None) -> list[dict[str, Any]]: ...

    def trace(self, trace_id: str) -> list[dict[str, Any]]: ...


def traced_example(spans: Spans, response_id: str) -> dict[str, Any] | None:
    """``{"messages": [...]}`` for one answer: the (PII-masked) messages the model saw and the answer it gave, as
    its model span recorded them (``otel.capture_content``); None when its trace holds no content."""
    found = spans.traces(response_id=response_id, limit=1)
    if not found:
        return None
    for span in spans.trace(found[0]["trace_id"]):
        attrs = span.get("attributes") or {}
        given, answer = attrs.get("gen_ai.input.messages"), attrs.get("gen_ai.output.messages")
        if not (given and answer):
            continue
        try:
            messages = [*json.loads(given), *json.loads(answer)]
        except (TypeError, ValueError):
            return None
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in messages if isinstance(m, dict)]
        if not messages or messages[-1]["role"] != "assistant" or not (messages[-1]["content"] or "").strip():
            return None
        return {"messages": messages}
    return None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], str]:
    """The records of a fine-tuning data file and the sha256 of the bytes they were read from; a line that is not
    a JSON object is a ValueError naming it (the contract check judges the records' shapes)."""
    data = path.read_bytes()
    out = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: a record must be a JSON object")
        out.append(record)
    return out, hashlib.sha256(data).hexdigest()


def write_snapshot(folder: Path, records: Iterable[dict[str, Any]], sources: dict[str, Any]) -> dict[str, Any]:
    """``dataset.jsonl`` and ``manifest.json`` in ``folder``, each written whole (a crash leaves the old or the
    new file, never half of one). Returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
    body = ("\n".join(lines) + "\n").encode() if lines else b""
    manifest = {"path": str(folder / "dataset.jsonl"), "records": len(lines),
                "sha256": hashlib.sha256(body).hexdigest(), "sources": sources}
    _write(folder / "dataset.jsonl", body)
    _write(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
