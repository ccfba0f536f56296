"""Log lines as JSON objects (``log_format: json``), each with the request id and trace id it belongs to.

The request id comes from a context variable the HTTP middleware sets for the request; the trace and span ids
from the OpenTelemetry span current there (the HTTP server span), so a log line, its trace and its lineage
record are joined by the same ids.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

from opentelemetry import trace

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("keel_request_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"], out["span_id"] = f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure(level: str, fmt: str = "text") -> None:
    """The process's logging: ``text`` (human, the default) or ``json`` (one object per line, for collectors)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # One line per upstream call would drown Keel's own log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
