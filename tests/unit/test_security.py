"""API keys (the contract every key store passes: SQLite and Postgres) and the rate limiter."""

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from app.core.errors import InvalidRequest, NotFound, RateLimited, StoreUnavailable
from app.security.keys import ApiKeys, KeyStore, PostgresKeyStore, open_key_store
from app.security.ratelimit import RateLimiter


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path: Path) -> Iterator[Callable[..., ApiKeys]]:
    """Opens stores on one database: each call is another API process's view of the same keys."""
    opened: list[ApiKeys] = []

    def opener(**kw) -> ApiKeys:
        if request.param == "sqlite":
            opened.append(KeyStore(tmp_path / "keel.db", **kw))
        else:
            opened.append(PostgresKeyStore(request.getfixturevalue("postgres_url"), **kw))
        return opened[-1]

    yield opener
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store) -> ApiKeys:
    return open_store(cache_ttl_s=0)


def test_created_key_verifies_and_only_its_hash_is_stored(store: ApiKeys, tmp_path: Path) -> None:
    key, secret = store.create("ci", ["chat", "evals"], rate_limit_per_minute=10)
    assert secret.startswith("keel-")
    found = store.verify(secret)
    assert found is not None and found.id == key.id and found.scopes == {"chat", "evals"}
    assert found.rate_limit_per_minute == 10 and found.name == "ci"
    assert store.verify(secret + "x") is None
    assert secret not in "\n".join(repr(k) for k in store.list())


def test_the_sqlite_store_keeps_only_the_hash(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keel.db")
    _, secret = store.create("ci", ["chat"])
    store.close()
    dump = "\n".join(sqlite3.connect(tmp_path / "keel.db").iterdump())
    assert secret not in dump


def test_a_key_made_by_one_process_works_in_another_and_a_revocation_reaches_it_within_the_cache_ttl(
        open_store) -> None:
    a, b = open_store(), open_store(cache_ttl_s=2.0)
    key, secret = a.create("shared", ["chat"])
    assert b.verify(secret).id == key.id
    a.revoke(key.id)
    assert b.verify(secret) is not None  # b trusts what it verified for its cache's lifetime
    time.sleep(2.1)
    assert b.verify(secret) is None


def test_while_the_store_is_down_a_recently_verified_key_still_works_and_an_unknown_one_is_a_503(
        open_store, monkeypatch) -> None:
    store = open_store(cache_ttl_s=0)
    key, secret = store.create("known", ["chat"])
    _, unknown = store.create("never verified here", ["chat"])
    assert store.verify(secret).id == key.id

    def down(*args):
        raise StoreUnavailable("the API keys' Postgres at db:5432/keel is unavailable")

    monkeypatch.setattr(store, "_read", down)
    assert store.verify(secret).id == key.id  # nobody can revoke it meanwhile either
    with pytest.raises(StoreUnavailable):
        store.verify(unknown)


def test_an_unreachable_postgres_is_a_503_naming_the_setting_not_the_password() -> None:
    with pytest.raises(StoreUnavailable) as e:
        open_key_store("postgresql://keel:s3cret@127.0.0.1:9/keel?connect_timeout=1", Path("/nonexistent"))
    assert "auth.url" in e.value.message and "s3cret" not in e.value.message and e.value.status == 503


def test_a_key_belongs_to_the_teams_it_was_made_with(store: ApiKeys) -> None:
    _, secret = store.create("ml-bot", ["chat"], teams=["ml", "search"])
    found = store.verify(secret)
    assert found.teams == {"ml", "search"} and found.in_team("ml") and not found.in_team("ops")
    assert store.create("admin", ["admin"])[0].in_team("ops")  # admin: every team
    with pytest.raises(InvalidRequest, match="team name"):
        store.create("x", ["chat"], teams=["ML Team"])


def test_scopes_are_validated(store: ApiKeys) -> None:
    with pytest.raises(InvalidRequest, match="unknown scope"):
        store.create("x", ["chat", "root"])
    with pytest.raises(InvalidRequest, match="at least one scope"):
        store.create("x", [])


def test_admin_allows_everything_and_write_implies_read(store: ApiKeys) -> None:
    admin, _ = store.create("a", ["admin"])
    writer, _ = store.create("w", ["prompts:write"])
    assert admin.allows("finetune") and admin.allows("chat")
    assert writer.allows("prompts:read") and not writer.allows("chat")


def test_revoked_key_stops_verifying(store: ApiKeys) -> None:
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


def test_a_shared_limit_holds_for_every_process_on_the_database(postgres_url) -> None:
    from app.security.ratelimit import PostgresRateLimiter

    a, b = PostgresRateLimiter(postgres_url), PostgresRateLimiter(postgres_url)  # two API processes
    try:
        for limiter in (a, b, a):
            limiter.check("k", 3)
        with pytest.raises(RateLimited) as exc:
            b.check("k", 3)  # the fourth request of the minute, whichever process gets it
        assert 15 < exc.value.retry_after_s <= 20.1
        a.check("other", 3)  # keys have separate buckets
        with pytest.raises(RateLimited):
            a.check("k", 3)  # a refused request takes nothing: still one short
    finally:
        a.close()
        b.close()


def test_a_shared_limit_refills_with_time(postgres_url) -> None:
    from app.security.ratelimit import PostgresRateLimiter

    limiter = PostgresRateLimiter(postgres_url)
    try:
        for _ in range(30):  # one every two seconds: the burst takes a fraction of that to send
            limiter.check("slow", 30)
        with pytest.raises(RateLimited):
            limiter.check("slow", 30)
        time.sleep(2.1)  # a token back
        limiter.check("slow", 30)
    finally:
        limiter.close()


def test_an_unreachable_limit_store_fails_open_or_closed_as_configured(postgres_url, monkeypatch) -> None:
    from app.security.ratelimit import PostgresRateLimiter

    errors: list[int] = []
    limiter = PostgresRateLimiter(postgres_url, on_store_error=lambda: errors.append(1))
    try:
        def down():
            raise StoreUnavailable("the rate limits' Postgres at db:5432/keel is unavailable")

        calls: list[int] = []

        def down_and_counted(*args):
            calls.append(1)
            down()

        monkeypatch.setattr(limiter._pg, "statement", down_and_counted)
        limiter.check("k", 1)
        limiter.check("k", 1)  # open: let through, counted
        assert errors == [1, 1]
        assert calls == [1]  # the second did not wait on the database again: it is given time to come back
        limiter.fail_open = False
        with pytest.raises(StoreUnavailable):
            limiter.check("k", 1)
    finally:
        limiter.close()


@pytest.fixture(params=["memory", "postgres"])
def limiters(request) -> Iterator[Callable[[], object]]:
    """Opens limiters counting in one place: each call is another API process (in memory: the one process)."""
    from app.security.ratelimit import PostgresRateLimiter

    opened: list = []
    shared = RateLimiter()

    def opener():
        if request.param == "memory":
            return shared
        opened.append(PostgresRateLimiter(request.getfixturevalue("postgres_url")))
        return opened[-1]

    yield opener
    for limiter in opened:
        limiter.close()


def test_a_token_budget_admits_until_spent_and_counts_every_process(limiters) -> None:
    """An answer's usage is known only after it: a request is admitted while the bucket holds a token, and the
    usage taken afterwards may overdraw it; the key then waits for the refill. Per key, beside the request count."""
    a, b = limiters(), limiters()
    a.check_tokens("tk", 600)  # a full bucket: 600 tokens
    a.spend_tokens("tk", 600, 450)
    b.check_tokens("tk", 600)  # 150 left, whichever process asks
    b.spend_tokens("tk", 600, 450)  # overdrawn: -300
    with pytest.raises(RateLimited, match="token limit of 600 tokens per minute") as exc:
        a.check_tokens("tk", 600)
    assert 29 < exc.value.retry_after_s <= 31  # 301 tokens back at 10 a second
    a.check_tokens("other", 600)  # keys have separate budgets
    a.check("tk", 5)  # ... and the key's request count is its own bucket


def test_a_token_budget_refills_with_time() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limiter.spend_tokens("tk", 60, 61)  # one a second: -1 after this answer
    with pytest.raises(RateLimited):
        limiter.check_tokens("tk", 60)
    now[0] += 2.5  # back above one token
    limiter.check_tokens("tk", 60)
    now[0] += 3600
    limiter.spend_tokens("tk", 60, 1)
    limiter.check_tokens("tk", 60)  # refilled to its cap (60), not beyond
    limiter.spend_tokens("tk", 60, 100_000)  # a huge batch: the debt stops at one minute's budget
    with pytest.raises(RateLimited) as exc:
        limiter.check_tokens("tk", 60)
    assert exc.value.retry_after_s <= 121


def test_a_batch_owners_budget_is_read_once_and_survives_the_key_store_going_away(tmp_path: Path) -> None:
    from app.security.ratelimit import TokenMeter

    store = KeyStore(tmp_path / "keel.db", cache_ttl_s=0)
    key, _ = store.create("batcher", ["chat"], tokens_per_minute=900)
    meter = TokenMeter(store, RateLimiter(), default_per_minute=100)
    reads: list[str] = []
    real_get = store.get

    def get(key_id: str):
        reads.append(key_id)
        return real_get(key_id)

    store.get = get
    assert [meter.budget_of(key.id) for _ in range(3)] == [900] * 3 and reads == [key.id]  # one read per TTL
    assert meter.budget_of("nobody") == 100  # an unknown key: the default

    def down(key_id: str):
        raise StoreUnavailable("the API keys' Postgres at db:5432/keel is unavailable")

    store.get = down
    meter._budgets[key.id] = (0.0, 900)  # read a while ago, expired
    assert meter.budget_of(key.id) == 900  # store away: the budget last read, not an error
    meter._budgets.clear()
    assert meter.budget_of(key.id) == 100  # never read: the default
    store.close()


def test_a_key_keeps_its_token_limit(store: ApiKeys) -> None:
    key, raw = store.create("metered", ["chat"], tokens_per_minute=5000)
    assert store.verify(raw).tokens_per_minute == 5000 and store.get(key.id).tokens_per_minute == 5000
    assert store.create("plain", ["chat"])[0].tokens_per_minute is None
    with pytest.raises(InvalidRequest, match="tokens_per_minute"):
        store.create("bad", ["chat"], tokens_per_minute=0)
    store.revoke(key.id)
    assert store.get(key.id) is None
