"""The drift monitor on synthetic drift features in a real lineage store, with Evidently's real tests (the real
MiniLM embeddings of real questions: tests/integration/test_drift_real.py).

Synthetic traffic: questions are unit vectors around 6 topic centres (384-d, as MiniLM's), with a topic mix,
question lengths, retrieval scores, refusals and guard hits drawn with fixed seeds. "Shifted" traffic asks about
other topics, with longer questions; everything else keeps its distribution.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from app.api.main import create_app
from app.cli import monitor as monitor_cli
from app.container import Container
from app.core.errors import InvalidRequest, NotFound
from app.core.metrics import Metrics
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from lifecycle.lineage import Features, LineageStore
from lifecycle.monitor.drift import DriftMonitor, ReferenceSpec, Window, build_monitor, suite_loader
from lifecycle.monitor.settings import MonitorSettings
from lifecycle.monitor.store import DriftStore
from tests.fakes.llm import ScriptedBackend

ROWS = 240  # per window
CENTRES = np.random.default_rng(7).normal(0, 1, (6, 384)).astype(np.float32)
USUAL = [0.3, 0.3, 0.2, 0.1, 0.05, 0.05]
OTHER = [0.05, 0.05, 0.1, 0.1, 0.35, 0.35]
# The windows (unix seconds): a reference, one more of the same traffic, one shifted.
REF, SAME, SHIFTED = Window(10_000, 20_000), Window(20_000, 30_000), Window(30_000, 40_000)


def traffic(n: int, window: Window, *, seed: int, shifted: bool = False, prefix: str = "",
            release: str | None = None, variant: str | None = None, embed: bool = True) -> list[Features]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(6, p=OTHER if shifted else USUAL)
        v = CENTRES[topic] + rng.normal(0, 1.2, 384)
        v /= np.linalg.norm(v)
        q = max(5, int(rng.normal(95 if shifted else 60, 15)))
        grounded = bool(rng.random() < 0.6)
        ok = rng.random() > 0.02
        rows.append(Features(
            id=f"{prefix}{seed}-{i}", at=window.since + (window.seconds - 1) * i / n, owner="k", model="m",
            release=release, variant=variant, question_chars=q, input_chars=q + int(rng.integers(0, 40)),
            answer_chars=max(0, int(rng.normal(400, 80))) if ok else 0,
            prompt_tokens=int(rng.integers(200, 400)), completion_tokens=max(1, int(rng.normal(90, 20))) if ok else 0,
            top_score=float(rng.uniform(0.012, 0.033)) if grounded else None, grounded=grounded,
            refused=bool(rng.random() < 0.05), validators="pii" if rng.random() < 0.04 else "",
            outcome="ok" if ok else "error", embedding=v.astype(np.float16).tobytes() if embed else None))
    return rows


def fast(**overrides) -> MonitorSettings:
    """Test settings: a small t-SNE picture in the reports (the checks themselves are the defaults)."""
    return MonitorSettings(**{"report_points": 60, **overrides})


def metric(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory) -> LineageStore:
    store = LineageStore(tmp_path_factory.mktemp("drift") / "lineage.db")
    store.write([], traffic(ROWS, REF, seed=1))
    store.write([], traffic(ROWS, SAME, seed=2))
    store.write([], traffic(ROWS, SHIFTED, seed=3, shifted=True))
    yield store
    store.close()


@pytest.fixture
def monitor(lineage: LineageStore, tmp_path: Path) -> DriftMonitor:
    mon = DriftMonitor(fast(), lineage, DriftStore(tmp_path / "monitor.db"), home=tmp_path, metrics=Metrics())
    yield mon
    mon.close()


# -- the checks ------------------------------------------------------------------------------------------------


def test_shifted_questions_are_flagged_and_two_samples_of_one_traffic_are_not(monitor: DriftMonitor) -> None:
    events = []
    monitor.subscribe(events.append)  # drift only
    every = []
    monitor.subscribe(every.append, drift_only=False)

    same = monitor.check((SAME.since, SAME.until), actor="test")  # default reference: the window before
    assert same.verdict == "no_drift", [(c.name, c.statistic) for c in same.checks if c.drifted]
    checks = {c.name: c for c in same.checks}
    assert checks["input_embedding"].state == checks["topic_mix"].state == checks["question_length"].state == "ok"
    assert same.reference == {"kind": "window", "since": REF.since, "until": REF.until, "rows": ROWS}
    assert same.current["rows"] == ROWS and same.drift_share is not None and same.drift_share < 0.2

    shifted = monitor.check((SHIFTED.since, SHIFTED.until), ReferenceSpec(since=REF.since, until=REF.until),
                            actor="test")
    assert shifted.verdict == "drift" and shifted.drifted
    checks = {c.name: c for c in shifted.checks}
    assert {"input_embedding", "topic_mix", "question_length"} <= set(shifted.drifted_checks)
    emb = checks["input_embedding"]
    assert emb.statistic_kind == "roc_auc" and emb.statistic > emb.threshold > 0.5 and "PCA" in emb.method
    # Under 1000 reference rows Evidently's defaults are two-sample p-value tests (TVD: a permutation test).
    assert checks["question_length"].method == "K-S p_value" and checks["question_length"].statistic < 0.05
    assert checks["question_length"].current_value > checks["question_length"].reference_value + 20
    assert checks["topic_mix"].method == "TVD" and checks["topic_mix"].statistic_kind == "p_value"
    assert checks["refusal"].method == "Z-test p_value" and checks["refusal"].state == "ok"
    assert checks["guard:pii"].kind == "categorical" and checks["guard:pii"].state == "ok"
    ran = [c for c in shifted.checks if c.state != "skipped"]
    assert shifted.drift_share == round(len(shifted.drifted_checks) / len(ran), 4)
    assert [c.name for c in shifted.checks][:4] == ["input_embedding", "topic_mix", "question_length", "input_length"]
    assert {c.name for c in shifted.checks} >= {"top_score", "no_good_passage", "answer_length", "completion_tokens"}

    # The event other parts react to: drift only by default, every result on request.
    assert [r.id for r in events] == [shifted.id]
    assert [r.id for r in every] == [same.id, shifted.id]

    # Stored (newest first), with its HTML report, metrics and an audit event.
    listed = monitor.list()
    assert [r["id"] for r in listed] == [shifted.id, same.id]
    stored = monitor.get(shifted.id)
    assert stored == json.loads(json.dumps(shifted.public()))
    assert stored["drifted"] is True and stored["report_url"] == f"/v1/monitor/drift/{shifted.id}/report"
    html = monitor.report_path(shifted.id).read_text(encoding="utf-8")
    assert shifted.id in html and "input_embedding" in html and "question_length" in html
    assert Path(shifted.report) == monitor.reports_dir / f"{shifted.id}.html"
    assert monitor.list(verdict="no_drift")[0]["id"] == same.id
    events_ = monitor.store.audit_events()
    assert [(e.action, e.subject, e.actor, e.to_ref) for e in events_] == [
        ("drift.check", shifted.id, "test", "drift"), ("drift.check", same.id, "test", "no_drift")]
    assert events_[0].details["drifted_checks"] == shifted.drifted_checks

    m = monitor.metrics
    assert metric(m, "keel_drift_runs_total", outcome="drift") == 1
    assert metric(m, "keel_drift_runs_total", outcome="no_drift") == 1
    assert metric(m, "keel_drift_detected", check="input_embedding") == 1
    assert metric(m, "keel_drift_detected", check="refusal") == 0
    assert metric(m, "keel_drift_share") == shifted.drift_share
    assert metric(m, "keel_drift_last_run_timestamp_seconds") == shifted.created


def test_more_answers_rated_down_is_a_drift_and_only_the_answering_keys_ratings_count(lineage: LineageStore,
                                                                                      tmp_path: Path) -> None:
    rng = np.random.default_rng(5)

    def rated(seed: int, down: float) -> dict[tuple[str, str], float]:  # half the answers rated
        return {(f"{seed}-{i}", "k"): float(rng.random() >= down) for i in range(ROWS) if i % 2 == 0}

    ratings = rated(1, 0.1) | rated(2, 0.1)
    asked = []

    def scores(answers):
        asked.append(len(answers))
        return {i: ratings[(i, o)] for i, o in answers if (i, o) in ratings}

    mon = DriftMonitor(fast(), lineage, DriftStore(tmp_path / "m.db"), home=tmp_path, feedback=scores)
    same = {c.name: c for c in mon.check((SAME.since, SAME.until), actor="test").checks}
    fb = same["negative_feedback"]
    assert fb.state == "ok" and fb.kind == "categorical" and fb.current_rows == fb.reference_rows == ROWS // 2
    assert asked == [ROWS, ROWS]
    ratings |= rated(2, 0.4)  # users now rate 4 in 10 answers down
    worse = mon.check((SAME.since, SAME.until), actor="test")
    fb = {c.name: c for c in worse.checks}["negative_feedback"]
    assert fb.state == "drift" and fb.current_value > fb.reference_value + 0.15
    # Ratings by other keys (the answers' key is "k") are not the users' verdict on their own answers.
    ratings = {(i, "someone-else"): 0.0 for i, _ in ratings}
    skipped = {c.name: c for c in mon.check((SAME.since, SAME.until), actor="test").checks}["negative_feedback"]
    assert skipped.state == "skipped" and skipped.current_rows == 0
    mon.close()
    # Without a feedback source (releases off) there is no such check.
    plain = DriftMonitor(fast(), lineage, DriftStore(tmp_path / "p.db"), home=tmp_path)
    assert "negative_feedback" not in {c.name for c in plain.check((SAME.since, SAME.until)).checks}
    plain.close()


def test_not_enough_data_is_a_state_not_a_pass(lineage: LineageStore, tmp_path: Path) -> None:
    mon = DriftMonitor(fast(min_rows=50), lineage, DriftStore(tmp_path / "m.db"), home=tmp_path, metrics=Metrics())
    calls = []
    mon.subscribe(calls.append, drift_only=False)
    # 20 rows of the reference window against the 20 before them (none).
    result = mon.check((REF.since, REF.since + 19.5 * (REF.seconds - 1) / ROWS), actor="test")
    assert result.verdict == "not_enough_data" and not result.drifted and result.checks == []
    assert result.current["rows"] == 20 and result.reference["rows"] == 0
    assert "not enough data" in result.notes[0] and result.report is None
    assert metric(mon.metrics, "keel_drift_runs_total", outcome="not_enough_data") == 1
    assert metric(mon.metrics, "keel_drift_share") == 0.0  # no verdict: the gauges keep the last one (none here)
    assert metric(mon.metrics, "keel_drift_detected", check="input_embedding") is None
    assert calls == [result] and mon.get(result.id)["verdict"] == "not_enough_data"
    with pytest.raises(NotFound, match="not enough data"):
        mon.report_path(result.id)
    mon.close()


def test_a_check_without_enough_values_for_one_column_skips_just_that_check(tmp_path: Path) -> None:
    store = LineageStore(tmp_path / "lineage.db")
    # Enough rows, but no embeddings in the current window and no grounded reference question.
    ref = [replace(r, grounded=False, top_score=None) for r in traffic(60, REF, seed=11)]
    store.write([], ref + traffic(60, SAME, seed=12, embed=False))
    mon = DriftMonitor(fast(), store, DriftStore(tmp_path / "m.db"), home=tmp_path)
    result = mon.check((SAME.since, SAME.until), min_rows=30)
    checks = {c.name: c for c in result.checks}
    assert checks["input_embedding"].state == checks["topic_mix"].state == "skipped"
    assert "not enough embedded questions (0 current" in checks["input_embedding"].note
    assert checks["top_score"].state == "skipped" and checks["top_score"].reference_rows == 0
    assert checks["question_length"].state in ("ok", "drift") and result.verdict in ("drift", "no_drift")
    mon.close()
    store.close()


def test_release_arms_and_the_scheduled_run(tmp_path: Path) -> None:
    store = LineageStore(tmp_path / "lineage.db")
    store.write([], traffic(ROWS, SAME, seed=21, release="support", variant="stable", prefix="b")
                + traffic(ROWS, SAME, seed=22, release="support", variant="new", shifted=True, prefix="c"))
    spec = SimpleNamespace(baseline="stable", candidate="new", variants=[SimpleNamespace(name="stable"),
                                                                         SimpleNamespace(name="new")])

    class Releases:
        def get(self, name):
            if name != "support":
                raise NotFound(f"no release {name!r}")
            return SimpleNamespace(spec=spec)

    mon = DriftMonitor(fast(window_s=SAME.seconds, reference="release:support"), store,
                       DriftStore(tmp_path / "m.db"), home=tmp_path, releases=Releases(),
                       clock=lambda: SAME.until)
    result = mon.run_scheduled()  # the last window_s: the baseline arm vs the candidate, over the same window
    assert result.scheduled and result.actor == "scheduler"
    assert result.current == {"since": SAME.since, "until": SAME.until, "release": "support", "variant": "new",
                              "rows": ROWS}
    assert result.reference["variant"] == "stable" and result.reference["compare"] == "candidate"
    assert result.verdict == "drift" and "input_embedding" in result.drifted_checks

    with pytest.raises(NotFound):
        mon.check(None, ReferenceSpec(kind="release", release="nope"))
    with pytest.raises(InvalidRequest, match="no variant 'x'"):
        mon.check(None, ReferenceSpec(kind="release", release="support", variant="x"))
    with pytest.raises(InvalidRequest, match="compare=earlier"):
        mon.check(None, ReferenceSpec(kind="release", release="support", current_variant="stable"))
    # compare=earlier: the baseline arm against its own previous window (empty here).
    earlier = mon.check(None, ReferenceSpec(kind="release", release="support", compare="earlier"))
    assert earlier.verdict == "not_enough_data" and earlier.current["variant"] == "stable"
    mon.close()
    store.close()


def test_an_eval_suite_as_the_reference(tmp_path: Path) -> None:
    embedder = HashingEmbedder()
    inputs, system = suite_loader(Path("evals/suites"))("golden-rag")
    assert len(inputs) == 20 and all(inputs)
    other = [q["q"] for q in json.loads(Path("tests/data/pydocs/questions.json").read_text())][:20]

    def rows(questions: list[str], window: Window, prefix: str) -> list[Features]:
        vectors = embedder.embed_documents(questions)
        return [Features(f"{prefix}{i}", window.since + i, "k", "m", None, None, len(q), len(system) + len(q), 300,
                         100, 80, None, False, False, "", "ok", None, v.astype(np.float16).tobytes())
                for i, (q, v) in enumerate(zip(questions, vectors, strict=True))]

    store = LineageStore(tmp_path / "lineage.db")
    store.write([], rows(inputs, SAME, "s") + rows(other, SHIFTED, "o"))
    mon = DriftMonitor(fast(keep_reports=1), store, DriftStore(tmp_path / "m.db"), home=tmp_path,
                       embed=embedder.embed_documents, suite_inputs=suite_loader(Path("evals/suites")))
    suite = ReferenceSpec(kind="suite", suite="golden-rag")
    same = mon.check((SAME.since, SAME.until), suite, min_rows=10)
    assert same.reference == {"kind": "suite", "suite": "golden-rag", "rows": 20}
    checks = {c.name: c for c in same.checks}
    assert checks["question_length"].statistic == 1.0  # the same texts: identical lengths
    assert checks["refusal"].state == "skipped" and "eval suite" in checks["refusal"].note
    assert not checks["input_embedding"].drifted and same.verdict == "no_drift"
    # Other questions: another topic mix and other lengths. (20 bag-of-words hashes are too few for the embedding
    # classifier; the real-embedding test shows it on MiniLM.)
    moved = mon.check((SHIFTED.since, SHIFTED.until), suite, min_rows=10)
    assert moved.verdict == "drift" and {"topic_mix", "question_length"} <= set(moved.drifted_checks)
    # monitor.keep_reports: only the newest report stays; the older result is still there.
    assert mon.report_path(moved.id).is_file() and mon.get(same.id)["report"]
    with pytest.raises(NotFound, match="was removed"):
        mon.report_path(same.id)
    with pytest.raises(NotFound, match="no suite 'nope'"):
        mon.check(None, ReferenceSpec(kind="suite", suite="nope"), min_rows=10)
    with pytest.raises(InvalidRequest, match="not a suite name"):
        mon.check(None, ReferenceSpec(kind="suite", suite="../etc/passwd"), min_rows=10)
    mon.close()
    store.close()


def test_bad_windows_and_references_say_what_to_fix() -> None:
    with pytest.raises(InvalidRequest, match="must be before"):
        Window(5, 5)
    with pytest.raises(InvalidRequest, match="since and until together"):
        ReferenceSpec(since=1)
    with pytest.raises(InvalidRequest, match="release's name"):
        ReferenceSpec(kind="release")
    with pytest.raises(InvalidRequest, match="window, release:NAME or suite:NAME"):
        ReferenceSpec.parse("yesterday")
    assert ReferenceSpec.parse("suite:golden-rag") == ReferenceSpec(kind="suite", suite="golden-rag")
    with pytest.raises(ValueError, match=r"monitor\.reference"):
        MonitorSettings(reference="release:")


def test_a_failing_subscriber_is_logged_and_the_others_still_hear(monitor: DriftMonitor, caplog) -> None:
    heard = []

    def broken(result):
        raise RuntimeError("boom")

    monitor.subscribe(broken, drift_only=False)
    unsubscribe = monitor.subscribe(heard.append, drift_only=False)
    result = monitor.check((REF.since, REF.since + 10), min_rows=50)  # not enough data: quick
    assert heard == [result] and "drift subscriber" in caplog.text
    unsubscribe()
    monitor.check((REF.since, REF.since + 10), min_rows=50)
    assert heard == [result]


# -- the API and the CLI -------------------------------------------------------------------------------------------


@pytest.fixture
async def api(tmp_path: Path):
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake"}}, default_model="m", guardrails={"enabled": False},
        releases={"check_interval_s": 0}, auth={"default_rate_limit_per_minute": 10_000},
        monitor={"report_points": 60},
    )
    container = await Container.build(settings, backends={"local": ScriptedBackend(reply="ok")},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    keys = {name: container.keys.create(name, scopes)[1] for name, scopes in
            {"admin": ["admin"], "chat": ["chat"]}.items()}
    app = create_app(container=container)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel") as client:
        yield {"c": client, "keys": keys, "container": container, "app": app}
    await container.aclose()


def h(api, key: str = "admin") -> dict:
    return {"Authorization": f"Bearer {api['keys'][key]}"}


async def test_the_api_runs_lists_and_serves_checks(api) -> None:
    c, container = api["c"], api["container"]
    wired, container.monitor = container.monitor, None
    r = await c.post("/v1/monitor/drift", headers=h(api), json={})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"  # a server without one
    container.monitor = wired
    container.front.store.write([], traffic(ROWS, REF, seed=1) + traffic(ROWS, SHIFTED, seed=3, shifted=True))
    assert (await c.post("/v1/monitor/drift", headers=h(api, "chat"), json={})).status_code == 403

    for body, status, fragment in [
        ({"since": 5, "until": 5}, 400, "must be before"),
        ({"window_s": 60, "since": 1}, 400, "either window_s or since/until"),
        ({"window_s": -1}, 400, "window_s"),
        ({"since": 1, "reference": {"kind": "window", "since": 9}}, 400, "since and until together"),
        ({"since": 1, "reference": {"kind": "suite", "suite": "nope"}}, 404, "no suite 'nope'"),
        ({"since": 1, "reference": {"kind": "release", "release": "nope"}}, 404, "nope"),
        ({"since": 1, "reference": {"kind": "moon"}}, 400, "reference.kind"),
        ({"since": 1, "min_rows": 1}, 400, "min_rows"),
    ]:
        r = await c.post("/v1/monitor/drift", headers=h(api), json=body)
        assert r.status_code == status and fragment in r.json()["error"]["message"], (body, r.text)

    # A real release: its arms by name (no traffic on them yet: not enough data, which is not an error).
    r = await c.post("/v1/releases", headers=h(api), json={
        "name": "support", "strategy": "ab", "weights": {"a": 50, "b": 50},
        "variants": [{"name": "a", "model": "m"}, {"name": "b", "model": "m"}]})
    assert r.status_code == 201, r.text
    r = await c.post("/v1/monitor/drift", headers=h(api), json={"reference": {"kind": "release", "release": "support"}})
    assert r.status_code == 200 and r.json()["verdict"] == "not_enough_data", r.text
    assert r.json()["reference"]["variant"] == "a" and r.json()["current"]["variant"] == "b"
    r = await c.post("/v1/monitor/drift", headers=h(api), json={
        "reference": {"kind": "release", "release": "support", "variant": "c"}})
    assert r.status_code == 400 and "no variant 'c'" in r.json()["error"]["message"]

    r = await c.post("/v1/monitor/drift", headers=h(api), json={
        "since": SHIFTED.since, "until": SHIFTED.until, "reference": {"since": REF.since, "until": REF.until}})
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["verdict"] == "drift" and "input_embedding" in result["drifted_checks"]
    assert result["actor"].startswith("admin [")

    listed = (await c.get("/v1/monitor/drift", headers=h(api))).json()["data"]
    assert result["id"] in [x["id"] for x in listed]
    assert (await c.get(f"/v1/monitor/drift/{result['id']}", headers=h(api))).json() == result
    report = await c.get(f"/v1/monitor/drift/{result['id']}/report", headers=h(api))
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert result["id"] in report.text
    r = await c.get("/v1/monitor/drift/not-an-id", headers=h(api))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_drift_id"
    r = await c.get("/v1/monitor/drift/drift-0000000000000000", headers=h(api))
    assert r.status_code == 404 and r.json()["error"]["code"] == "drift_check_not_found"
    assert (await c.get("/v1/monitor/drift?verdict=maybe", headers=h(api))).status_code == 400
    metrics = (await c.get("/metrics")).text
    assert 'keel_drift_detected{check="input_embedding"} 1.0' in metrics


async def test_the_cli_prints_the_checks_and_exits_3_on_drift(api, monkeypatch) -> None:
    from fastapi.testclient import TestClient

    container = api["container"]
    container.monitor = build_monitor(container.settings, container.front.store, container.metrics, None)
    now = SHIFTED.until
    container.monitor.clock = lambda: now
    container.front.store.write([], traffic(ROWS, SAME, seed=2) + traffic(ROWS, SHIFTED, seed=3, shifted=True))
    client = TestClient(api["app"])

    def request(method, url, *, json=None, params=None, headers=None, timeout=None):
        return client.request(method, url.removeprefix("http://keel"), json=json, params=params, headers=headers)

    monkeypatch.setattr(httpx, "request", request)
    monkeypatch.setattr(monitor_cli, "console", Console(width=200, highlight=False))
    runner = CliRunner()
    args = ["--url", "http://keel", "--api-key", api["keys"]["admin"]]
    r = runner.invoke(monitor_cli.monitor_app, ["drift", "--window", f"{SHIFTED.seconds:.0f}s", "--reference",
                                                "window", *args])
    # The window before the last 10000 s is the usual traffic: the shifted traffic drifted from it.
    assert r.exit_code == 3, r.output
    assert "input_embedding" in r.output and "drift" in r.output and "/report" in r.output
    r = runner.invoke(monitor_cli.monitor_app, ["drift", "--window", "1h", "--min-rows", "1000", *args])
    assert r.exit_code == 4 and "not enough data" in r.output, r.output
    r = runner.invoke(monitor_cli.monitor_app, ["drift", "--reference", "suite:nope", *args])
    assert r.exit_code == 1 and "suite_not_found" in r.output
    r = runner.invoke(monitor_cli.monitor_app, ["drift", "--window", "soon", *args])
    assert r.exit_code == 2
    r = runner.invoke(monitor_cli.monitor_app, ["history", *args])
    assert r.exit_code == 0 and "drift-" in r.output
    assert monitor_cli.parse_duration("2d") == 172_800 and monitor_cli.parse_duration("90") == 90


async def test_the_scheduled_loop_runs_every_interval_until_cancelled(lineage: LineageStore, tmp_path: Path) -> None:
    mon = DriftMonitor(fast(interval_s=0.05, window_s=10), lineage, DriftStore(tmp_path / "m.db"), home=tmp_path,
                       clock=lambda: REF.since + 5)  # 10 s of traffic: not enough data, quickly
    task = asyncio.create_task(mon.loop())
    for _ in range(200):
        await asyncio.sleep(0.05)
        if len(mon.list()) >= 2:
            break
    task.cancel()
    runs = mon.list()
    assert len(runs) >= 2 and all(r["scheduled"] and r["actor"] == "scheduler" for r in runs)
    off = DriftMonitor(fast(interval_s=0), lineage, DriftStore(tmp_path / "off.db"), home=tmp_path)
    await asyncio.wait_for(off.loop(), 1)  # 0: returns at once
    mon.close()
    off.close()


async def test_a_process_that_loses_the_round_runs_no_check_and_leaves_the_gauges(tmp_path: Path) -> None:
    # Processes sharing a lineage store (Postgres) take turns; one that lost the round must not keep alerting
    # on its own older verdict (alerts read the max over processes).
    store = LineageStore(tmp_path / "lineage.db")
    metrics = Metrics()
    metrics.drift_detected.labels("input_embedding").set(1)
    metrics.drift_share.set(0.8)
    assert store.claim("drift-check", 3600, now=time.time() + 60)  # another process has the rounds for a while
    mon = DriftMonitor(fast(interval_s=0.02), store, DriftStore(tmp_path / "m.db"), home=tmp_path, metrics=metrics)
    task = asyncio.create_task(mon.loop())
    await asyncio.sleep(0.2)
    task.cancel()
    assert mon.list() == []  # no check ran here
    assert metric(metrics, "keel_drift_detected", check="input_embedding") is None
    assert metric(metrics, "keel_drift_share") == 0.0
    mon.close()
    store.close()


def test_a_failed_check_is_counted_and_a_bad_request_is_not(lineage: LineageStore, tmp_path: Path) -> None:
    metrics = Metrics()
    mon = DriftMonitor(fast(methods={"question_length": "no-such-test"}), lineage, DriftStore(tmp_path / "m.db"),
                       home=tmp_path, metrics=metrics, suite_inputs=suite_loader(Path("evals/suites")))
    with pytest.raises(NotFound):
        mon.check((SAME.since, SAME.until), ReferenceSpec(kind="suite", suite="nope"))
    assert metric(metrics, "keel_drift_runs_total", outcome="error") is None
    with pytest.raises(Exception, match="no-such-test"):
        mon.check((SAME.since, SAME.until))
    assert metric(metrics, "keel_drift_runs_total", outcome="error") == 1 and mon.list() == []
    mon.close()
