import sqlite3
from pathlib import Path

import pytest

from app.core.errors import InvalidRequest, NotFound, RateLimited
from app.security.keys import KeyStore
from app.security.ratelimit import RateLimiter


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keel.db", cache_ttl_s=0)


def test_created_key_verifies_and_only_its_hash_is_stored(store: KeyStore, tmp_path: Path) -> None:
    key, secret = store.create("ci", ["chat", "evals"], rate_limit_per_minute=10)
    assert secret.startswith("keel-")
    found = store.verify(secret)
    assert found is not None and found.id == key.id and found.scopes == {"chat", "evals"}
    dump = "\n".join(sqlite3.connect(tmp_path / "keel.db").iterdump())
    assert secret not in dump
    assert store.verify(secret + "x") is None


def test_scopes_are_validated(store: KeyStore) -> None:
    with pytest.raises(InvalidRequest, match="unknown scope"):
        store.create("x", ["chat", "root"])
    with pytest.raises(InvalidRequest, match="at least one scope"):
        store.create("x", [])


def test_admin_allows_everything_and_write_implies_read(store: KeyStore) -> None:
    admin, _ = store.create("a", ["admin"])
    writer, _ = store.create("w", ["prompts:write"])
    assert admin.allows("finetune") and admin.allows("chat")
    assert writer.allows("prompts:read") and not writer.allows("chat")


def test_revoked_key_stops_verifying(store: KeyStore) -> None:
    key, secret = store.create("tmp", ["chat"])
    store.revoke(key.id)
    assert store.verify(secret) is None
    assert [k.id for k in store.list(include_revoked=True)] == [key.id]
    assert store.list() == []
    with pytest.raises(NotFound):
        store.revoke("missing")


def test_rate_limiter_refills_over_time() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for _ in range(3):
        limiter.check("k", 3)
    with pytest.raises(RateLimited) as exc:
        limiter.check("k", 3)
    assert 19 < exc.value.retry_after_s <= 20.1  # one request per 20 s at 3/min
    limiter.check("other", 3)  # keys have separate buckets
    now[0] += 20.0
    limiter.check("k", 3)
