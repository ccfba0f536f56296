"""Schema migrations (Alembic, ``app.core.migrate``) of every Keel database, on SQLite and Postgres.

For every store: a new database is migrated to head and works; a database made by the release before
Alembic (its exact DDL is kept below as fixtures, copied from that code) upgrades in place, keeping its
rows, to the same schema a new database gets; opening a store already at head runs no migration;
several openers at once (threads, processes) do not fail. The kernel's own guarantees (a later revision
applies to a database at an earlier one, a failed upgrade rolls back whole, the revision naming
convention is enforced) are tested on a throwaway migrations folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app.core import migrate
from app.core.audit import MIGRATIONS as AUDIT_MIGRATIONS
from app.core.migrate import Migrations, upgrade_sqlite

ROOT = Path(__file__).resolve().parents[2]

# --- the release before Alembic: its DDL, verbatim (fixtures: never edit these to match new code) -----------

KEYS_0 = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    rate_limit_per_minute INTEGER,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
"""

AUDIT_0 = """
CREATE TABLE IF NOT EXISTS guardrail_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    stage TEXT NOT NULL,
    policy TEXT NOT NULL,
    policy_version TEXT NOT NULL,
    validator TEXT NOT NULL,
    registered TEXT NOT NULL,
    verdict TEXT NOT NULL,
    action TEXT NOT NULL,
    score REAL,
    latency_ms REAL,
    reason TEXT,
    window INTEGER
);
CREATE INDEX IF NOT EXISTS guardrail_audit_request ON guardrail_audit(request_id);
CREATE INDEX IF NOT EXISTS guardrail_audit_ts ON guardrail_audit(ts);
"""

RUNS_0 = """
CREATE TABLE IF NOT EXISTS agent_runs (
    run_id TEXT PRIMARY KEY,
    thread_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    owner TEXT,
    namespace TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL,
    question TEXT NOT NULL DEFAULT '',
    answer TEXT,
    citations TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    pending TEXT,
    steps TEXT NOT NULL DEFAULT '[]',
    guardrails TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS agent_runs_thread ON agent_runs(thread_id, created_at);
CREATE INDEX IF NOT EXISTS agent_runs_status ON agent_runs(status, created_at);
"""
# The first release, before the guardrails column (that release's code added it with ALTER TABLE).
RUNS_FIRST = RUNS_0.replace("    guardrails TEXT,\n", "")
RUNS_PG_0 = [s.strip() for s in RUNS_0.replace("REAL", "DOUBLE PRECISION").split(";") if s.strip()]
RUNS_PG_FIRST = [s.strip() for s in RUNS_FIRST.replace("REAL", "DOUBLE PRECISION").split(";") if s.strip()]


def prompts_0(*, id_column: str, json_type: str) -> list[str]:
    return [
        """CREATE TABLE IF NOT EXISTS prompt_templates (
            name TEXT PRIMARY KEY,
            latest_version INTEGER NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS prompt_versions (
            name TEXT NOT NULL REFERENCES prompt_templates(name),
            version INTEGER NOT NULL,
            content TEXT NOT NULL,
            hash TEXT NOT NULL,
            parent INTEGER,
            author TEXT NOT NULL,
            message TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (name, version))""",
        """CREATE TABLE IF NOT EXISTS prompt_labels (
            name TEXT NOT NULL REFERENCES prompt_templates(name),
            label TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at TEXT NOT NULL,
            updated_by TEXT NOT NULL,
            PRIMARY KEY (name, label))""",
        f"""CREATE TABLE IF NOT EXISTS prompt_audit (
            {id_column},
            at TEXT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            name TEXT NOT NULL,
            label TEXT,
            from_version INTEGER,
            to_version INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            details {json_type} NOT NULL DEFAULT '{{}}')""",
        "CREATE INDEX IF NOT EXISTS prompt_audit_name ON prompt_audit(name, label, id)",
        "CREATE TABLE IF NOT EXISTS prompt_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
        "INSERT INTO prompt_meta VALUES ('revision', 0) ON CONFLICT DO NOTHING",
    ]


PROMPTS_0 = ";\n".join(prompts_0(id_column="id INTEGER PRIMARY KEY AUTOINCREMENT", json_type="TEXT")) + ";"
PROMPTS_PG_0 = prompts_0(id_column="id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY", json_type="JSONB")

EVALS_0 = """
CREATE TABLE IF NOT EXISTS eval_runs (
    id TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    suite_hash TEXT NOT NULL,
    identity_key TEXT NOT NULL,
    identity TEXT NOT NULL,
    target_kind TEXT NOT NULL,
    prompt_name TEXT,
    prompt_version INTEGER,
    prompt_hash TEXT,
    status TEXT NOT NULL,
    passed INTEGER,
    cases_total INTEGER NOT NULL,
    baseline TEXT,
    summary TEXT,
    verdict TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS eval_runs_prompt ON eval_runs(prompt_name, prompt_version, passed);
CREATE INDEX IF NOT EXISTS eval_runs_identity ON eval_runs(identity_key, status);
CREATE TABLE IF NOT EXISTS eval_results (
    run_id TEXT NOT NULL REFERENCES eval_runs(id) ON DELETE CASCADE,
    case_id TEXT NOT NULL,
    record TEXT NOT NULL,
    scores TEXT NOT NULL,
    error TEXT,
    cached INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (run_id, case_id)
);
CREATE TABLE IF NOT EXISTS eval_cache (
    key TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"""

FINETUNE_0 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    spec_yaml TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    submitted_by TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    heartbeat_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    error_code TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    data_report TEXT,
    data_hash TEXT,
    run_dir TEXT NOT NULL,
    adapter_path TEXT,
    mlflow_run_id TEXT,
    model_name TEXT,
    model_version TEXT,
    evals_state TEXT,
    evals TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE TABLE IF NOT EXISTS deployments (
    alias TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    backend TEXT NOT NULL,
    served_name TEXT NOT NULL,
    adapter_path TEXT NOT NULL,
    fallback TEXT,
    updated_at REAL NOT NULL,
    actor TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    model TEXT,
    version TEXT,
    job_id TEXT,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}'
);
"""
# The first release, before adapter evaluation (that release's code added the two columns with ALTER TABLE).
FINETUNE_FIRST = FINETUNE_0.replace("model_version TEXT,\n    evals_state TEXT,\n    evals TEXT\n",
                                    "model_version TEXT\n")

INGEST_0 = """
CREATE TABLE IF NOT EXISTS rag_snapshots (
    id TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    embedding_model TEXT NOT NULL,
    sparse_encoder TEXT NOT NULL,
    chunker_config TEXT NOT NULL,
    paths TEXT NOT NULL,
    prune INTEGER NOT NULL,
    counts TEXT NOT NULL DEFAULT '{}',
    rejections TEXT NOT NULL DEFAULT '[]',
    error TEXT
);
CREATE INDEX IF NOT EXISTS rag_snapshots_collection ON rag_snapshots(collection, started_at);
CREATE TABLE IF NOT EXISTS rag_snapshot_files (
    snapshot_id TEXT NOT NULL REFERENCES rag_snapshots(id) ON DELETE CASCADE,
    doc_id TEXT NOT NULL,
    source TEXT NOT NULL,
    source_sha256 TEXT NOT NULL,
    version TEXT NOT NULL,
    chunks INTEGER NOT NULL,
    PRIMARY KEY (snapshot_id, doc_id)
);
"""


# --- the stores: how to open one, seed a row into an old database, and check it -----------------------


def _greeting() -> Any:
    from prompts.testing import content

    return content("Hello {{ name }}", variables=[{"name": "name"}])


@dataclass
class Case:
    name: str
    migrations: Callable[[], Migrations]
    open: Callable[[Path], Any]
    legacy: dict[str, str]  # variant -> the old release's DDL
    seed: list[tuple[str, tuple[Any, ...]]]  # rows written into the old database (valid for every variant)
    check: Callable[[Any], None]  # the seeded rows, read through the new store
    use: Callable[[Any], None]  # a write and a read through the store
    extra: dict[str, Any] = field(default_factory=dict)


def _keys_case() -> Case:
    from app.security.keys import MIGRATIONS, KeyStore

    def use(store: Any) -> None:
        key, raw = store.create("new", ["chat"])
        assert store.verify(raw).id == key.id

    return Case(
        "keys", lambda: MIGRATIONS, lambda p: KeyStore(p), {"previous": KEYS_0},
        [("INSERT INTO api_keys VALUES ('k1', 'old', ?, '[\"chat\"]', 30, '2025-01-01T00:00:00+00:00', NULL)",
          (hashlib.sha256(b"keel-k1-secret").hexdigest(),))],
        lambda s: _expect(s.verify("keel-k1-secret"), name="old", rate_limit_per_minute=30), use)


def _audit_case() -> Case:
    from app.guardrails.audit import MIGRATIONS, AuditRecord, AuditStore

    def use(store: Any) -> None:
        store.write([AuditRecord(request_id="req-new", stage="output", policy="default", policy_version="2",
                                 validator="toxicity", registered="toxicity", verdict="pass", action="allow",
                                 score=0.1, latency_ms=3.0)])
        assert store.query(request_id="req-new")[0].validator == "toxicity"

    return Case(
        "audit", lambda: MIGRATIONS, lambda p: AuditStore(p), {"previous": AUDIT_0},
        [("INSERT INTO guardrail_audit (ts, request_id, stage, policy, policy_version, validator, registered,"
          " verdict, action, score, latency_ms, reason, window) VALUES (1.0, 'req-old', 'input', 'default', '1',"
          " 'pii', 'pii', 'fail', 'block', 1.0, 2.0, 'email', NULL)", ())],
        lambda s: _expect(s.query(request_id="req-old")[0], validator="pii", action="block", reason="email"), use)


def _runs_case() -> Case:
    from agents.runs import MIGRATIONS, RunRecord, RunStore

    def use(store: Any) -> None:
        store.create(RunRecord(run_id="run-new", thread_id="t-new", workflow="research", owner="bob",
                               namespace=["users", "bob"], status="running", question="q", guardrails="default@2"))
        store.update("run-new", status="completed", answer="a")
        _expect(store.get("run-new"), status="completed", guardrails="default@2", answer="a")

    return Case(
        "runs", lambda: MIGRATIONS, lambda p: RunStore(p), {"previous": RUNS_0, "first": RUNS_FIRST},
        [("INSERT INTO agent_runs (run_id, thread_id, workflow, owner, namespace, status, question, answer,"
          " created_at, updated_at, finished_at) VALUES ('run-old', 't-old', 'rag-qa', 'alice',"
          " '[\"users\", \"alice\"]', 'completed', 'why', 'a.', 1.0, 2.0, 2.0)", ())],
        lambda s: _expect(s.get("run-old"), status="completed", answer="a.", guardrails=None,
                          namespace=["users", "alice"]), use)


def _prompts_case() -> Case:
    from prompts.store import MIGRATIONS, SqlitePromptStore

    c = _greeting()

    def use(store: Any) -> None:
        v = store.save("other", c, author="bob", message="new", base_version=None)
        assert store.get_version("other", 1).hash == v.hash and store.audit_log(name="other")[0].actor == "bob"

    def check(store: Any) -> None:
        # the label stays for the registry to hand over to the routing table (test_prompts_registry: handed over)
        assert store.get_version("greet", 1).content == c and store.legacy_labels() == [("greet", "prod", 1, "alice")]
        assert store.revision() >= 7 and store.audit_log(name="greet")[0].details == {"hash": c.content_hash()}

    return Case(
        "prompts", lambda: MIGRATIONS, lambda p: SqlitePromptStore(p), {"previous": PROMPTS_0},
        [("INSERT INTO prompt_templates VALUES ('greet', 1, 'hi', '2025-01-01', '2025-01-01')", ()),
         ("INSERT INTO prompt_versions VALUES ('greet', 1, ?, ?, NULL, 'alice', 'first', '2025-01-01')",
          (c.canonical_json(), c.content_hash())),
         ("INSERT INTO prompt_labels VALUES ('greet', 'prod', 1, '2025-01-01', 'alice')", ()),
         ("INSERT INTO prompt_audit (at, actor, action, name, to_version, details) VALUES"
          " ('2025-01-01', 'alice', 'version.create', 'greet', 1, ?)", (json.dumps({"hash": c.content_hash()}),)),
         ("UPDATE prompt_meta SET value = 7 WHERE key = 'revision'", ())],
        check, use)


def _evals_case() -> Case:
    from evals.store import MIGRATIONS, EvalStore

    def use(store: Any) -> None:
        run = store.create_run(suite="s2", suite_hash="h2", identity_key="k2", identity={"kind": "model"},
                               cases_total=1)
        store.save_result(run, "c1", record={"answer": "x"}, scores={"exact": {"score": 1.0}},
                          error=None, cached=False)
        assert store.done_cases(run) == {"c1"} and store.get_run(run).suite == "s2"

    def check(store: Any) -> None:
        _expect(store.get_run("run-old"), suite="smoke", status="completed", passed=True)
        assert [r.case_id for r in store.results("run-old")] == ["c1"] and store.cache_get("ck") == {"a": 1}

    return Case(
        "evals", lambda: MIGRATIONS, lambda p: EvalStore(p), {"previous": EVALS_0},
        [("INSERT INTO eval_runs (id, suite, suite_hash, identity_key, identity, target_kind, status, passed,"
          " cases_total, started_at) VALUES ('run-old', 'smoke', 'h', 'k', '{\"kind\": \"model\"}', 'model',"
          " 'completed', 1, 1, '2025-01-01T00:00:00+00:00')", ()),
         ("INSERT INTO eval_results VALUES ('run-old', 'c1', '{}', '{}', NULL, 0, '2025-01-01')", ()),
         ("INSERT INTO eval_cache VALUES ('ck', '{\"a\": 1}', '2025-01-01')", ())],
        check, use)


def _finetune_case() -> Case:
    from finetune.jobs import MIGRATIONS, JobStore

    def use(store: Any) -> None:
        job = store.create(name="new", spec_yaml="a: 1", spec_hash="h2")
        assert store.get(job.id).state == "queued"

    return Case(
        "finetune", lambda: MIGRATIONS, lambda p: JobStore(p, p.parent / "runs"),
        {"previous": FINETUNE_0, "first": FINETUNE_FIRST},
        [("INSERT INTO jobs (id, name, state, spec_yaml, spec_hash, created_at, updated_at, run_dir, model_name,"
          " model_version) VALUES ('ft-old', 'old', 'succeeded', 'x: 1', 'h', 1.0, 2.0, '/runs/ft-old', 'm', '3')",
          ()),
         ("INSERT INTO audit (at, actor, action, model) VALUES (1.0, 'alice', 'deploy', 'm')", ())],
        lambda s: _expect(s.find_by_model_version("m", "3"), id="ft-old", state="succeeded", evals_state=None),
        use)


def _ingest_case() -> Case:
    from ingest.manifest import MIGRATIONS, FileEntry, SnapshotStore

    def use(store: Any) -> None:
        sid = store.start("docs", embedding_model="m", sparse_encoder="s", chunker_config={}, paths=["/d"],
                          prune=False)
        store.finish(sid, files=[FileEntry(doc_id="d1", source="/d/a.md", source_sha256="x", version="v1",
                                           chunks=2)], counts={"files": 1}, rejections=[])
        _expect(store.get(sid), status="completed", counts={"files": 1})

    def opened(path: Path) -> Any:
        store = SnapshotStore(path)
        store.list()  # the store connects (and migrates) on first use
        return store

    return Case(
        "ingest", lambda: MIGRATIONS, opened, {"previous": INGEST_0},
        [("INSERT INTO rag_snapshots (id, collection, status, started_at, embedding_model, sparse_encoder,"
          " chunker_config, paths, prune) VALUES ('snap_old', 'docs', 'completed', '2025-01-01', 'm', 's', '{}',"
          " '[\"/d\"]', 1)", ()),
         ("INSERT INTO rag_snapshot_files VALUES ('snap_old', 'd0', '/d/z.md', 'y', 'v0', 3)", ())],
        lambda s: _expect(s.get("snap_old"), collection="docs", prune=True, paths=["/d"]), use)


CASES: dict[str, Callable[[], Case]] = {
    "keys": _keys_case, "audit": _audit_case, "runs": _runs_case, "prompts": _prompts_case,
    "evals": _evals_case, "finetune": _finetune_case, "ingest": _ingest_case,
}
LEGACY_VARIANTS = [("keys", "previous"), ("audit", "previous"), ("runs", "previous"), ("runs", "first"),
                   ("prompts", "previous"), ("evals", "previous"), ("finetune", "previous"),
                   ("finetune", "first"), ("ingest", "previous")]


def _expect(obj: Any, **attrs: Any) -> None:
    assert obj is not None
    got = {k: getattr(obj, k) for k in attrs}
    assert got == attrs


def _versions(path: Path, table: str) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        return [r[0] for r in conn.execute(f"SELECT version_num FROM {table}")]


def _schema(path: Path) -> dict[str, Any]:
    """Every table's columns (order aside: ALTER TABLE appends) and indexes, without Alembic's own table."""
    with closing(sqlite3.connect(path)) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT "
                                             "LIKE 'alembic_version%' AND name != 'sqlite_sequence'")]
        out = {}
        for t in tables:
            cols = sorted(tuple(r[1:]) for r in conn.execute(f"PRAGMA table_info({t})"))
            indexes = sorted((r[1], r[2], tuple(c[2] for c in conn.execute(f"PRAGMA index_info('{r[1]}')")))
                             for r in conn.execute(f"PRAGMA index_list({t})"))
            fks = sorted(tuple(r[2:]) for r in conn.execute(f"PRAGMA foreign_key_list({t})"))
            out[t] = (cols, indexes, fks)
        return out


def _at_baseline(path: Path, m: Migrations) -> Path:
    """A new database at the store's baseline revision (0001) only: the schema of the release before Alembic."""
    from alembic import command
    from sqlalchemy import create_engine

    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as bind:
            command.upgrade(migrate.alembic_config(bind, m), "0001")
    finally:
        engine.dispose()
    return path


def _legacy_db(path: Path, ddl: str, seed: list[tuple[str, tuple[Any, ...]]]) -> None:
    """A database as the release before Alembic left it: its DDL (WAL, as it opened files), then rows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(ddl)
    for sql, args in seed:
        conn.execute(sql, args)
    conn.close()


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]()


# --- SQLite: every store ---------------------------------------------------------------------------------


def test_upgrade_from_empty_reaches_head_with_the_previous_release_schema(case, tmp_path):
    path = tmp_path / "new.db"
    store = case.open(path)
    try:
        case.use(store)
    finally:
        store.close()
    m = case.migrations()
    assert _versions(path, m.version_table) == [m.head]
    # The baseline is the previous release's schema, to the column: a new database and an old one are alike
    # (at head, the old database's schema equals the new one's: test_upgrade_from_the_previous_release_keeps_rows).
    old = tmp_path / "old.db"
    _legacy_db(old, case.legacy["previous"], [])
    assert _schema(_at_baseline(tmp_path / "base.db", m)) == _schema(old)


@pytest.mark.parametrize(("name", "variant"), LEGACY_VARIANTS, ids=[f"{n}-{v}" for n, v in LEGACY_VARIANTS])
def test_upgrade_from_the_previous_release_keeps_rows(name, variant, tmp_path):
    case = CASES[name]()
    path = tmp_path / "old.db"
    _legacy_db(path, case.legacy[variant], case.seed)
    store = case.open(path)
    try:
        case.check(store)  # the old rows, read through the new code
        case.use(store)
    finally:
        store.close()
    m = case.migrations()
    assert _versions(path, m.version_table) == [m.head]
    fresh = tmp_path / "fresh.db"
    case.open(fresh).close()
    assert _schema(path) == _schema(fresh)  # the first release's table got the columns added since
    again = case.open(path)  # and it opens again, rows still there
    try:
        case.check(again)
    finally:
        again.close()


def test_reopening_at_head_runs_no_migration(case, tmp_path, monkeypatch):
    path = tmp_path / "store.db"
    case.open(path).close()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a store at head ran a migration")

    monkeypatch.setattr(migrate, "_upgrade", refuse)
    store = case.open(path)
    try:
        case.use(store)
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert upgrade_sqlite(conn, case.migrations()) is False


def test_concurrent_openers_do_not_fail(case, tmp_path):
    path = tmp_path / "store.db"
    n = 4
    barrier = threading.Barrier(n)
    stores: list[Any] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(case.open(path))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == [] and len(stores) == n
        case.use(stores[0])
    finally:
        for s in stores:
            s.close()
    m = case.migrations()
    assert _versions(path, m.version_table) == [m.head]


def test_threads_migrating_different_stores_at_once(tmp_path):
    """Alembic keeps its running context in module globals: two threads of one process migrating two
    stores at once (an API opening its stores) must take turns, not mix their revisions up."""

    def open_one(c: Case, home: Path, barrier: threading.Barrier, errors: list[BaseException]) -> None:
        barrier.wait()
        try:
            c.open(home / f"{c.name}.db").close()
        except BaseException as e:  # reported below
            errors.append(e)

    for round_ in range(3):
        cases = [make() for make in CASES.values()]
        barrier = threading.Barrier(len(cases))
        errors: list[BaseException] = []
        home = tmp_path / str(round_)
        home.mkdir()
        threads = [threading.Thread(target=open_one, args=(c, home, barrier, errors)) for c in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        for c in cases:
            assert _versions(home / f"{c.name}.db", c.migrations().version_table) == [c.migrations().head]


def test_baseline_downgrade_and_upgrade_again(case, tmp_path):
    from alembic import command
    from sqlalchemy import create_engine

    path = tmp_path / "store.db"
    case.open(path).close()
    m = case.migrations()
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as bind:
            command.downgrade(migrate.alembic_config(bind, m), "base")
            left = {r[0] for r in bind.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
        # the kernel's audit table stays: the store's downgrade moved its events back into its own table
        assert left <= {m.version_table, "sqlite_sequence", AUDIT_MIGRATIONS.version_table, "audit_events"}
    finally:
        engine.dispose()
    store = case.open(path)
    try:
        case.use(store)
    finally:
        store.close()
    assert _versions(path, m.version_table) == [m.head]


def test_stores_sharing_one_file_keep_their_own_version_tables(tmp_path):
    path = tmp_path / "keel.db"
    cases = [c() for c in CASES.values()]
    for c in cases:
        store = c.open(path)
        try:
            c.use(store)
        finally:
            store.close()
    tables = [c.migrations().version_table for c in cases]
    assert len(set(tables)) == len(tables)
    for c in cases:
        assert _versions(path, c.migrations().version_table) == [c.migrations().head]


def test_shipped_migrations_follow_the_naming_convention():
    from alembic.script import ScriptDirectory

    for make in CASES.values():
        m = make().migrations()
        script = ScriptDirectory(str(m.location))
        assert script.get_heads() == [m.head], m.location
        for rev in script.walk_revisions():
            assert Path(rev.path).name.startswith(rev.revision + "_"), rev.path
        assert (m.location / "__init__.py").exists() and (m.location / "versions" / "__init__.py").exists()


def test_store_open_at_head_does_not_import_alembic(tmp_path):
    """Opening a store whose database is at head reads its version table and nothing more."""
    for name, make in CASES.items():
        c = make()
        c.open(tmp_path / f"{name}.db").close()
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import tests.unit.test_migrations as t
        home = Path({str(tmp_path)!r})
        for name, make in t.CASES.items():
            make().open(home / f"{{name}}.db").close()
        print("alembic" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_processes_opening_one_new_database_at_once(tmp_path):
    """Several processes (an API and workers) open the same new files together: one migrates, the others wait
    on SQLite's write lock and find the schema at head."""
    n = 3
    go = tmp_path / "go"
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        import tests.unit.test_migrations as t
        cases = [t.CASES[name]() for name in ("finetune", "evals", "prompts")]
        import alembic.command, sqlalchemy  # imported before the start, so the processes really race
        home, me = Path({str(tmp_path)!r}), sys.argv[1]
        (home / f"ready-{{me}}").touch()
        while not (home / "go").exists():
            time.sleep(0.005)
        for c in cases:
            c.open(home / f"{{c.name}}.db").close()
        print("ok")
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(n)]
    try:
        for _ in range(6000):
            if all((tmp_path / f"ready-{i}").exists() for i in range(n)) or any(p.poll() for p in procs):
                break
            time.sleep(0.02)
        go.touch()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in results]
    for name in ("finetune", "evals", "prompts"):
        m = CASES[name]().migrations()
        assert _versions(tmp_path / f"{name}.db", m.version_table) == [m.head]


# --- the kernel, on a throwaway migrations folder ------------------------------------------------------------

_REVISION = '''
"""{doc}"""
from alembic import op

revision = "{rev}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
'''


def _folder(root: Path, revisions: list[tuple[str, str | None, str, str]]) -> Migrations:
    """A migrations folder: (file name, down_revision, revision id, upgrade body) per revision."""
    (root / "versions").mkdir(parents=True, exist_ok=True)
    (root / "__init__.py").write_text("")
    (root / "versions" / "__init__.py").write_text("")
    (root / "env.py").write_text("from app.core.migrate import run_env\n\nrun_env()\n")
    for name, down, rev, body in revisions:
        (root / "versions" / name).write_text(
            _REVISION.format(doc=name, rev=rev, down=down, body=textwrap.indent(body, "    ")))
    return Migrations(root, "alembic_version_demo")


_BASE = ("0001_base.py", None, "0001", 'op.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY)")')


def test_a_later_revision_upgrades_a_database_at_the_previous_one(tmp_path):
    db = tmp_path / "demo.db"
    conn = sqlite3.connect(db, isolation_level=None)
    assert upgrade_sqlite(conn, _folder(tmp_path / "m1", [_BASE])) is True
    conn.execute("INSERT INTO items VALUES (1)")
    later = _folder(tmp_path / "m2", [_BASE, ("0002_label.py", "0001", "0002",
                                              'op.execute("ALTER TABLE items ADD COLUMN label TEXT")')])
    assert later.head == "0002"
    assert upgrade_sqlite(conn, later) is True and upgrade_sqlite(conn, later) is False
    assert conn.execute("SELECT id, label FROM items").fetchall() == [(1, None)]
    assert not conn.in_transaction
    conn.close()
    assert _versions(db, "alembic_version_demo") == ["0002"]


def test_a_failed_upgrade_rolls_back_whole(tmp_path):
    db = tmp_path / "demo.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.row_factory = sqlite3.Row
    broken = _folder(tmp_path / "m", [_BASE, ("0002_broken.py", "0001", "0002",
                                              'op.execute("CREATE TABLE half (x INTEGER)")\n'
                                              'op.execute("THIS IS NOT SQL")')])
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):  # the driver's error, not a wrapper
        upgrade_sqlite(conn, broken)
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []  # not even revision 0001
    assert not conn.in_transaction and conn.row_factory is sqlite3.Row
    conn.close()


def test_a_misnamed_revision_is_refused_and_rolled_back(tmp_path):
    conn = sqlite3.connect(":memory:", isolation_level=None)
    misnamed = _folder(tmp_path / "m", [("0001_base.py", None, "abc123", _BASE[3])])
    with pytest.raises(RuntimeError, match=r"name revision files NNNN_<slug>\.py"):
        upgrade_sqlite(conn, misnamed)
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_version_tables_must_be_plain_identifiers(tmp_path):
    with pytest.raises(ValueError, match="plain lower-case SQL identifier"):
        Migrations(tmp_path, "alembic_version; DROP TABLE x")


# --- Postgres: agent runs and the prompt registry ----------------------------------------------------------


def _pg(url: str, statements: list[str], rows: list[tuple[str, tuple[Any, ...]]] = ()) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        for s in statements:
            conn.execute(s)
        for sql, args in rows:
            conn.execute(sql.replace("?", "%s"), args)


def _pg_versions(url: str, table: str) -> list[str]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT version_num FROM {table}")]


def _pg_schema(url: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cols = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity"
            " FROM information_schema.columns WHERE table_schema = 'public'"
            " AND table_name NOT LIKE 'alembic_version%' ORDER BY 1, 2").fetchall()
        idx = conn.execute("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
                           " AND tablename NOT LIKE 'alembic_version%' ORDER BY 1, 2").fetchall()
        return cols + idx


def _pg_at_baseline(url: str, m: Migrations) -> None:
    import psycopg
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    engine = create_engine("postgresql+psycopg://", poolclass=NullPool, creator=lambda: psycopg.connect(url))
    try:
        with engine.begin() as bind:
            command.upgrade(migrate.alembic_config(bind, m), "0001")
    finally:
        engine.dispose()


def _pg_runs() -> dict[str, Any]:
    from agents.runs import MIGRATIONS, PostgresRunStore

    return {"open": PostgresRunStore, "migrations": MIGRATIONS,
            "legacy": {"previous": [*RUNS_PG_0, "ALTER TABLE agent_runs ADD COLUMN IF NOT EXISTS guardrails TEXT"],
                       "first": RUNS_PG_FIRST},
            "seed": _runs_case().seed, "check": _runs_case().check, "use": _runs_case().use}


def _pg_prompts() -> dict[str, Any]:
    from prompts.store import MIGRATIONS
    from prompts.store_pg import PostgresPromptStore

    c = _prompts_case()
    seed = [(sql.replace("VALUES ('2025-01-01', 'alice', 'version.create', 'greet', 1, ?)",
                         "VALUES ('2025-01-01', 'alice', 'version.create', 'greet', 1, ?::jsonb)"), args)
            for sql, args in c.seed]
    return {"open": PostgresPromptStore, "migrations": MIGRATIONS, "legacy": {"previous": PROMPTS_PG_0},
            "seed": seed, "check": c.check, "use": c.use}


PG_CASES = {"runs": _pg_runs, "prompts": _pg_prompts}
PG_LEGACY = [("runs", "previous"), ("runs", "first"), ("prompts", "previous")]


@pytest.mark.parametrize("name", sorted(PG_CASES))
def test_postgres_upgrade_from_empty_and_reopen(name, postgres_url, tmp_path, monkeypatch):
    case = PG_CASES[name]()
    store = case["open"](postgres_url)
    try:
        case["use"](store)
    finally:
        store.close()
    m = case["migrations"]
    assert _pg_versions(postgres_url, m.version_table) == [m.head]
    # The same schema as the previous release's code made (in a database of its own, on the same server).
    import psycopg

    from tests.postgres import with_database

    legacy_db, base_db = f"keel_legacy_{os.getpid()}_{name}", f"keel_base_{os.getpid()}_{name}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        for db in (legacy_db, base_db):
            admin.execute(f"DROP DATABASE IF EXISTS {db}")
            admin.execute(f"CREATE DATABASE {db}")
    try:
        legacy_url, base_url = with_database(postgres_url, legacy_db), with_database(postgres_url, base_db)
        _pg(legacy_url, case["legacy"]["previous"])
        _pg_at_baseline(base_url, m)  # the baseline revision is that schema
        assert _pg_schema(base_url) == _pg_schema(legacy_url)
        case["open"](legacy_url).close()  # and at head, the old database's schema is a new one's
        assert _pg_schema(postgres_url) == _pg_schema(legacy_url)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            for db in (legacy_db, base_db):
                admin.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a store at head ran a migration")

    monkeypatch.setattr(migrate, "_upgrade", refuse)
    case["open"](postgres_url).close()  # at head: no migration


@pytest.mark.parametrize(("name", "variant"), PG_LEGACY, ids=[f"{n}-{v}" for n, v in PG_LEGACY])
def test_postgres_upgrade_from_the_previous_release_keeps_rows(name, variant, postgres_url):
    case = PG_CASES[name]()
    _pg(postgres_url, case["legacy"][variant], case["seed"])
    store = case["open"](postgres_url)
    try:
        case["check"](store)
        case["use"](store)
    finally:
        store.close()
    m = case["migrations"]
    assert _pg_versions(postgres_url, m.version_table) == [m.head]
    cols = {r[1] for r in _pg_schema(postgres_url) if r[0] in ("agent_runs", "prompt_templates")}
    assert name != "runs" or "guardrails" in cols


def test_postgres_concurrent_openers_of_both_stores(postgres_url):
    """Workers starting together on one database (agent runs and prompts share it): none fails, and each
    store's schema is migrated once."""
    opens = [PG_CASES[name]()["open"] for name in ("runs", "prompts", "runs", "prompts", "runs", "prompts")]
    barrier = threading.Barrier(len(opens))
    stores: list[Any] = []
    errors: list[BaseException] = []

    def open_one(make: Callable[[str], Any]) -> None:
        barrier.wait()
        try:
            stores.append(make(postgres_url))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=open_one, args=(make,)) for make in opens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == [] and len(stores) == len(opens)
        PG_CASES["runs"]()["use"](next(s for s in stores if hasattr(s, "mark_stalled")))
        PG_CASES["prompts"]()["use"](next(s for s in stores if hasattr(s, "revision")))
    finally:
        for s in stores:
            s.close()
    for name in PG_CASES:
        m = PG_CASES[name]()["migrations"]
        assert _pg_versions(postgres_url, m.version_table) == [m.head]
