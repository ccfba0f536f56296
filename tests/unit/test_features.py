"""The feature store on the real Feast (SQLite online store, Parquet offline store): rows derived from Keel's data,
apply, materialize, online reads with versions, point-in-time joins, clear errors; and the agents' tools."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.core.errors import InvalidRequest, NotFound
from lifecycle.features.export import Sources, document_rows, user_rows
from lifecycle.features.service import FeatureService
from lifecycle.features.settings import FeatureSettings

NOW = time.time()
RECORDS = [
    {"owner": "key-a", "created": NOW - 100, "retrieval": [{"doc_id": "d1", "cited": True},
                                                           {"doc_id": "d2", "cited": False}]},
    {"owner": "key-a", "created": NOW - 50, "retrieval": [{"doc_id": "d1", "cited": True}]},
    {"owner": "key-b", "created": NOW - 40 * 86400, "retrieval": None},  # outside the 30-day window
]
RATINGS = [{"owner": "key-a", "at": NOW, "score": 1.0}, {"owner": "key-a", "at": NOW, "score": 0.0},
           {"owner": "key-a", "at": NOW, "score": 1.0}]


class Snapshots:
    """Two ingests: d1 unchanged since the first, d2 changed in the second."""

    def list(self, limit: int = 50):
        return [SimpleNamespace(id="s2", status="completed", finished_at="2026-12-05T00:00:00+00:00"),
                SimpleNamespace(id="s1", status="completed", finished_at="2026-12-01T00:00:00+00:00")]

    def get(self, sid: str, with_files: bool = True):
        files = {"s1": [("d1", "v1"), ("d2", "v1")], "s2": [("d1", "v1"), ("d2", "v2")]}[sid]
        return SimpleNamespace(files=[SimpleNamespace(doc_id=d, version=v) for d, v in files])


def test_rows_are_derived_from_lineage_feedback_and_ingest() -> None:
    users = {r["user_id"]: r for r in user_rows(RECORDS, RATINGS, NOW)}
    assert users["key-a"] == {"user_id": "key-a", "requests_30d": 2, "ratings": 3, "feedback_rate": 2 / 3}
    assert "key-b" not in users  # nothing in the window, no rating: no row (its online value is None)
    s1 = datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    s2 = datetime(2026, 12, 5, tzinfo=UTC).timestamp()
    now = s2 + 86400
    docs = {r["doc_id"]: r for r in document_rows(RECORDS, Snapshots(), now)}
    assert docs["d1"]["freshness_days"] == pytest.approx((now - s1) / 86400)  # unchanged: since the first ingest
    assert docs["d2"]["freshness_days"] == pytest.approx((now - s2) / 86400)  # its new version: the second
    assert (docs["d1"]["retrievals_30d"], docs["d1"]["citations_30d"]) == (2, 2)
    assert (docs["d2"]["retrievals_30d"], docs["d2"]["citations_30d"]) == (1, 0)


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> FeatureService:
    home = tmp_path_factory.mktemp("features")
    return FeatureService(FeatureSettings(), home, Sources(lineage=lambda n: RECORDS[:n], ratings=lambda: RATINGS,
                                                           snapshots=Snapshots()))


def test_before_apply_reads_say_what_to_run(tmp_path: Path) -> None:
    svc = FeatureService(FeatureSettings(), tmp_path)
    with pytest.raises(NotFound, match="keel features apply"):
        svc.online(["user_stats:ratings"], {"user": "key-a"})


def test_apply_materialize_and_read_online_with_versions(features: FeatureService) -> None:
    applied = features.apply(now=NOW - 60)
    assert applied["exported"] == {"user_stats": 1, "document_stats": 2}
    assert {v["name"] for v in applied["views"]} == {"user_stats", "document_stats"}
    features.materialize(now=NOW)
    out = features.online(["user_stats:feedback_rate", "user_stats:requests_30d", "document_stats:citations_30d"],
                          {"user": "key-a", "document": "d1"})
    assert out["values"]["user_stats:feedback_rate"] == pytest.approx(2 / 3)
    assert out["values"]["user_stats:requests_30d"] == 2 and out["values"]["document_stats:citations_30d"] == 2
    versions = {v["name"]: v["version"] for v in features.views()}
    assert out["versions"] == versions
    unknown = features.online(["user_stats:ratings"], {"user": "key-nobody"})
    assert unknown["values"] == {"user_stats:ratings": None}
    assert features.apply()["views"] == features.views()  # re-applying the same code changes no version
    import yaml

    config = yaml.safe_load((features.folder / "feature_store.yaml").read_text())  # for `feast -c <dir> serve`
    assert config["project"] == "keel" and config["online_store"]["type"] == "sqlite"


def test_historical_values_are_point_in_time(features: FeatureService) -> None:
    rows = features.historical(["user_stats:ratings"], [
        {"user_id": "key-a", "event_timestamp": NOW - 30},  # after the first export: its value
        {"user_id": "key-a", "event_timestamp": NOW - 3600},  # before any export: nothing yet, row kept
    ])
    assert [r["ratings"] for r in rows] == [3, None] and rows[0]["user_id"] == "key-a"


@pytest.mark.parametrize("refs, keys, message", [
    (["user_stats"], {"user": "k"}, "not a feature reference"),
    (["user_stats:nope"], {"user": "k"}, "unknown feature 'user_stats:nope'; known: user_stats:"),
    (["document_stats:citations_30d"], {"user": "k"}, "need the key of: document"),
])
def test_bad_references_are_400s_that_say_what_exists(features: FeatureService, refs, keys, message) -> None:
    with pytest.raises(InvalidRequest, match=message):
        features.online(refs, keys)
    with pytest.raises(InvalidRequest, match="event_timestamp"):
        features.historical(["user_stats:ratings"], [{"user_id": "k"}])


# -- features as prompt variables, through the chat API ------------------------------------------------------


async def test_a_prompt_renders_the_callers_features_and_the_answer_records_their_versions(tmp_path: Path) -> None:
    import asyncio

    import httpx

    from app.api.main import create_app
    from app.container import Container
    from app.settings import load_settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder
    from tests.fakes.llm import ScriptedBackend

    settings = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://x/v1"}},
                             models={"m": {"backend": "local", "model": "fake"}}, default_model="m",
                             guardrails={"enabled": False}, auth={"default_rate_limit_per_minute": 10_000})
    backend = ScriptedBackend(reply="Noted.")
    container = await Container.build(settings, backends={"local": backend},
                                      rag=build_rag(settings, embedder=HashingEmbedder()))
    me, key = container.keys.create("app", ["chat", "prompts:write"])
    them, other = container.keys.create("other", ["chat"])
    key_id = me.id
    h = {"Authorization": f"Bearer {key}"}
    try:
        features = container.features
        features.sources = Sources(ratings=lambda: [{"owner": key_id, "at": NOW, "score": 1.0}] * 3 + [
            {"owner": key_id, "at": NOW, "score": 0.0}])
        await asyncio.to_thread(features.apply)
        await asyncio.to_thread(features.materialize)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                     base_url="http://keel") as c:
            content = {"messages": [{"role": "system", "content":
                                     "Ratings: {{ features.user_stats.ratings }}, good: "
                                     "{{ features.user_stats.feedback_rate }}."}],
                       "features": ["user_stats:ratings", "user_stats:feedback_rate"]}
            r = await c.post("/v1/prompts", json={"name": "tone", "content": content}, headers=h)
            assert r.status_code == 201, r.text

            async def ask(headers: dict, **prompt) -> httpx.Response:
                return await c.post("/v1/chat/completions", headers=headers, json={
                    "model": "m", "messages": [{"role": "user", "content": "hi"}],
                    "prompt": {"ref": "tone@latest", **prompt}})

            r = await ask(h)
            assert r.status_code == 200, r.text
            assert backend.requests[-1].messages[0].content == "Ratings: 4, good: 0.75."
            r2 = await ask({"Authorization": f"Bearer {other}"})  # another key: its own (no) values
            assert backend.requests[-1].messages[0].content == "Ratings: None, good: None."
            # the caller cannot set them: the key decides whose features they are
            r3 = await ask(h, variables={"features": {"user_stats": {"ratings": 99}}})
            assert r3.status_code == 400 and "unknown variable" in r3.json()["error"]["message"]

            container.front.flush()
            record = (await c.get(f"/v1/lineage/{r.json()['id']}", headers=h)).json()
            versions = {v["name"]: v["version"] for v in features.views()}
            assert record["prompt"]["features"] == {
                "values": {"user_stats:ratings": 4, "user_stats:feedback_rate": 0.75},
                "versions": {"user_stats": versions["user_stats"]}}
            assert r2.status_code == 200 and them.id != key_id

            bad = dict(content, variables=[{"name": "features", "type": "object"}])
            r = await c.post("/v1/prompts", json={"name": "clash", "content": bad}, headers=h)
            assert r.status_code == 400 and "holds the template's feature values" in r.json()["error"]["message"]
            r = await c.post("/v1/prompts/preview", json={"content": content}, headers=h)
            assert r.status_code == 200 and "Ratings: None" in r.text
    finally:
        await container.aclose()


def test_the_api_does_not_import_feast_until_features_are_used() -> None:
    """Feast's import takes ~6 s (it imports torch and type-checks its classes): every API start paid it before a
    constant moved out of definitions.py."""
    code = "import sys, app.api.main; assert 'feast' not in sys.modules, 'feast imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
