"""A Postgres that goes away and comes back: the stores Keel keeps there fail with the 503 that names the
setting (never the password) while it is down, and work again through the same objects once it is back — a
restart costs a reconnect, never a restart of Keel. A server of its own (pgserver), stopped and started here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.core.errors import StoreUnavailable
from app.guardrails.audit import AuditRecord, PostgresAuditStore
from app.security.keys import PostgresKeyStore
from evals.store import PostgresEvalStore
from lifecycle.lineage import PostgresLineageStore
from tests.postgres import StoppableServer


@pytest.fixture(scope="module")
def server() -> Iterator[StoppableServer]:
    srv = StoppableServer()
    yield srv
    srv.close()


@pytest.fixture
def url(server: StoppableServer) -> str:
    return server.database()


def stop(server: StoppableServer) -> None:
    server.stop()


def start(server: StoppableServer) -> None:
    server.start()


def eventually(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def record(i: int) -> AuditRecord:
    return AuditRecord(f"req-{i}", "input", "default", "v1", "pii", "keel/pii", "pass", "allow", 0.0, 0.1)


def test_the_stores_answer_503_while_postgres_is_down_and_recover_when_it_is_back(server, url) -> None:
    # A pool timeout far longer than any check here: a store must not wait it out to learn the server is gone
    evals, lineage = PostgresEvalStore(url, timeout_s=60), PostgresLineageStore(url, timeout_s=60)
    audit, keys = PostgresAuditStore(url, timeout_s=60), PostgresKeyStore(url, timeout_s=60, cache_ttl_s=0.0)
    try:
        run = evals.create_run(suite="s", suite_hash="h", identity_key="k", identity={"kind": "model"},
                               cases_total=1)
        lineage.write([{"id": "chatcmpl-1", "created": time.time(), "owner": "k"}])
        audit.write([record(1)])
        _, raw = keys.create("app", ["chat"])
        assert keys.verify(raw) is not None

        stop(server)
        for what, setting, call in (
                ("the eval store", "evals.url", lambda: evals.get_run(run)),
                ("the lineage store", "monitor.url", lambda: lineage.get("chatcmpl-1")),
                ("the guardrail audit", "guardrails.audit_url", lambda: audit.query(request_id="req-1")),
                ("the API keys", "auth.url", lambda: keys.create("other", ["chat"]))):
            with pytest.raises(StoreUnavailable) as down:
                call()
            message = down.value.message
            assert what in message and setting in message and "check" in message, message
            assert "s3cr3t-pw" not in message and "password" not in message.lower()
            assert down.value.status == 503
            # the refused connect itself, not the pool giving up after its timeout
            assert "OperationalError" in message and "PoolTimeout" not in message, message
        # a key verified before the outage keeps working while the store is down (nobody can revoke it either)
        assert keys.verify(raw) is not None

        start(server)  # back, on the same socket
        assert eventually(lambda: evals.get_run(run)).suite == "s"
        assert eventually(lambda: lineage.get("chatcmpl-1"))["owner"] == "k"
        eventually(lambda: audit.write([record(2)]))
        assert [r.request_id for r in audit.query()] == ["req-2", "req-1"]
        assert eventually(lambda: keys.create("after", ["chat"]))[0].name == "after"
    finally:
        start(server)
        for store in (evals, lineage, audit, keys):
            store.close()
