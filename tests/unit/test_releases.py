"""Releases: specs, sticky assignment, the canary state machine, and the whole path through the API against
scripted backends (tests/integration/test_releases_e2e.py runs it through the real vLLM server and model)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import ValidationError

from app.api.main import create_app
from app.container import Container
from app.core.errors import BackendUnavailable, Conflict
from app.core.settings import BackendSettings, ModelAlias
from app.llm.routing import RoutingTable, SqliteRoutingStore
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder
from lifecycle.releases import controller
from lifecycle.releases.assign import choose
from lifecycle.releases.service import ReleaseService
from lifecycle.releases.spec import ReleaseSpec
from lifecycle.releases.store import Decision, Moments, Release, SqliteReleaseStore, VariantTotals
from tests.fakes.llm import ScriptedBackend

TWO = [{"name": "stable", "model": "m"}, {"name": "canary", "model": "m2"}]


def spec(**kw) -> ReleaseSpec:
    return ReleaseSpec.model_validate({"name": "support", "strategy": "canary", "variants": TWO, **kw})


# -- specs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"strategy": "ab", "weights": {"stable": 50, "canary": 40}}, "adding up to 100"),
    ({"strategy": "ab", "weights": {"stable": 100}}, "name every variant"),
    ({"weights": {"stable": 50, "canary": 50}}, "weights are for A/B"),
    ({"baseline": "blue"}, "baseline 'blue' is not a variant"),
    ({"canary": {"steps": [5, 25, 50]}}, "must end at 100"),
    ({"canary": {"steps": [50, 25, 100]}}, "increase strictly"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "unique"),
    ({"variants": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}, "exactly two variants"),
    ({"name": "Support!"}, "lower-case"),
    ({"variants": [{"name": "a", "rag": "docs", "prompt": "p@1"}, {"name": "b"}]}, "drop 'prompt' or 'rag'"),
])
def test_bad_specs_are_refused_with_what_to_fix(bad, message) -> None:
    with pytest.raises(ValidationError, match=message):
        spec(**bad)


def test_initial_weights_per_strategy() -> None:
    assert spec().initial_weights() == {"stable": 95, "canary": 5}
    assert spec(strategy="ab").initial_weights() == {"stable": 50, "canary": 50}
    assert spec(strategy="shadow").initial_weights() == {"stable": 100, "canary": 0}
    assert spec(strategy="bluegreen").initial_weights() == {"stable": 100, "canary": 0}


# -- assignment --------------------------------------------------------------------------------------------


def test_assignment_is_sticky_and_splits_within_tolerance() -> None:
    order, weights = ["a", "b", "c"], {"a": 50, "b": 30, "c": 20}
    first = {f"user-{i}": choose("seed", f"user-{i}", order, weights) for i in range(10_000)}
    assert first == {u: choose("seed", u, order, weights) for u in first}  # same unit, same variant
    counts = Counter(first.values())
    for v, w in weights.items():
        assert abs(counts[v] / 10_000 - w / 100) < 0.02, counts
    # another seed (another release) reshuffles
    assert sum(first[u] != choose("other", u, order, weights) for u in first) > 3000


def test_a_growing_canary_keeps_every_unit_it_already_has() -> None:
    units = [f"k{i}" for i in range(5000)]
    on_canary: set[str] = set()
    for share in (5, 25, 50, 100):
        now = {u for u in units if choose("s", u, ["stable", "canary"], {"stable": 100 - share, "canary": share})
               == "canary"}
        assert on_canary <= now
        assert abs(len(now) / len(units) - share / 100) < 0.03
        on_canary = now


def test_assignment_is_the_same_in_another_process(tmp_path: Path) -> None:
    """Two services on one store (as two API processes) put every unit on the same variant."""
    a, b = (ReleaseService(SqliteReleaseStore(tmp_path / "r.db"), check_interval_s=0,
                           routes=RoutingTable({}, {}, SqliteRoutingStore(tmp_path / "routing.db"),
                                               check_interval_s=0)) for _ in range(2))
    a.create(spec(strategy="ab"), actor="t")
    ra, rb = a.active("support"), b.active("support")
    assert ra is not None and rb is not None
    assert all(a.assign(ra, f"u{i}").variant.name == b.assign(rb, f"u{i}").variant.name for i in range(500))
    a.close()
    b.close()


# -- the canary state machine ------------------------------------------------------------------------------


def totals(n: int, errors: int = 0, blocked: int = 0, since: int | None = None) -> VariantTotals:
    return VariantTotals(n, {"errors": Moments(n, errors, errors), "guardrail_blocks": Moments(n, blocked, blocked),
                             "latency_ms": Moments(n, 100.0 * n, 10_000.0 * n), "ttft_ms": Moments(0),
                             "negative_feedback": Moments(0)}, 0, 0, n if since is None else since, n)


def release(step: int = 0, status: str = "running", started: float = 0.0, margin: float = 0.2,
            promotion: str = "auto", **kw) -> Release:
    s = spec(canary={"steps": [5, 25, 50, 100], "min_requests": 20, "min_duration_s": 10, "max_duration_s": 100,
                     "promotion": promotion},
             metrics=[{"name": "errors", "margin": margin}, {"name": "guardrail_blocks", "margin": margin}], **kw)
    return Release(1, s, status, controller.weights_at(s, step), step, started, None, "t", 0, 0, 1)


def test_canary_holds_until_its_window_is_full() -> None:
    v = controller.judge_canary(release(), {"stable": totals(400), "canary": totals(10)}, now=50)
    assert v.action == "hold" and "10/20 canary requests" in v.reason
    v = controller.judge_canary(release(), {"stable": totals(400), "canary": totals(30)}, now=5)
    assert v.action == "hold" and "5/10 s" in v.reason


def test_canary_fails_fast_on_a_worse_metric_even_before_its_window() -> None:
    v = controller.judge_canary(release(), {"stable": totals(400), "canary": totals(12, blocked=12)}, now=1)
    assert v.action == "rollback" and "guardrail_blocks" in v.reason


def test_canary_advances_then_promotes_when_as_good() -> None:
    ok = {"stable": totals(2000), "canary": totals(600)}
    assert controller.judge_canary(release(step=0), ok, now=50).action == "advance"
    assert controller.judge_canary(release(step=2), ok, now=50).action == "promote"


def test_a_manual_canary_holds_ready_at_its_last_step_and_still_rolls_back_when_worse(tmp_path: Path) -> None:
    """Argo's indefinite pause: the analysis passed, a person (or a pipeline's approval) promotes."""
    ok = {"stable": totals(2000), "canary": totals(600)}
    assert controller.judge_canary(release(step=0, promotion="manual"), ok, now=50).action == "advance"
    v = controller.judge_canary(release(step=2, promotion="manual"), ok, now=50)
    assert v.action == "hold" and v.reason.startswith(controller.READY)
    bad = {"stable": totals(2000), "canary": totals(600, errors=300)}
    assert controller.judge_canary(release(step=2, promotion="manual"), bad, now=50).action == "rollback"

    svc = ReleaseService(SqliteReleaseStore(tmp_path / "r.db"), check_interval_s=0)
    r = svc.create(spec(canary={"promotion": "manual"}), actor="t")
    assert not controller.is_ready(r)
    svc.store.note(r, v.reason)
    r = svc.get("support")
    assert controller.is_ready(r) and r.status == "running"
    assert svc.promote("support", actor="person").status == "promoted"
    svc.close()


def test_undecided_canary_times_out_to_rollback() -> None:
    few = {"stable": totals(60), "canary": totals(20)}
    assert controller.judge_canary(release(margin=0.02), few, now=50).action == "hold"
    v = controller.judge_canary(release(margin=0.02), few, now=150)
    assert v.action == "rollback" and "inconclusive" in v.reason


def test_a_paused_canary_holds_but_still_rolls_back_when_worse() -> None:
    ok = {"stable": totals(2000), "canary": totals(600)}
    assert controller.judge_canary(release(status="paused"), ok, now=50).action == "hold"
    bad = {"stable": totals(2000), "canary": totals(600, errors=300)}
    assert controller.judge_canary(release(status="paused"), bad, now=50).action == "rollback"


def test_ab_stops_on_sample_ratio_mismatch() -> None:
    s = spec(strategy="ab")
    r = Release(1, s, "running", {"stable": 50, "canary": 50}, 0, 0, None, "t", 0, 0, 1)
    assert controller.judge_ab(r, {"stable": totals(5000), "canary": totals(5000)}).action == "hold"
    assert controller.judge_ab(r, {"stable": totals(6000), "canary": totals(4000)}).action == "stop"


# -- through the API ---------------------------------------------------------------------------------------


@pytest.fixture
async def env(tmp_path: Path):
    settings = load_settings(
        home=tmp_path,
        backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0},
                  "other": {"kind": "openai", "base_url": "http://unused2/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}, "m2": {"backend": "other", "model": "fake-2"}},
        default_model="m", auth={"default_rate_limit_per_minute": 10_000}, guardrails={"enabled": False},
        releases={"check_interval_s": 0},
    )
    stable, candidate = ScriptedBackend(reply="Stable answer."), ScriptedBackend(reply="Candidate answer.")
    rag = build_rag(settings, embedder=HashingEmbedder())
    container = await Container.build(settings, backends={"local": stable, "other": candidate}, rag=rag)
    app = create_app(container=container)
    keys = {name: container.keys.create(name, scopes)[1] for name, scopes in
            [("admin", ["admin"]), ("rel", ["releases"]), ("chat", ["chat"]), ("chat2", ["chat"])]}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://keel") as client:
        yield {"client": client, "container": container, "keys": keys, "stable": stable, "candidate": candidate,
               "transport": transport, "settings": settings}
    await container.aclose()


def auth(env, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {env['keys'][who]}"}


async def create(env, body: dict, who: str = "rel") -> httpx.Response:
    return await env["client"].post("/v1/releases", json=body, headers=auth(env, who))


async def ask(env, who: str = "chat", *, stream: bool = False, **extra) -> httpx.Response:
    body = {"model": "support", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}
    return await env["client"].post("/v1/chat/completions", json=body, headers=auth(env, who))


async def test_release_lifecycle_through_the_api(env) -> None:
    r = await create(env, {"name": "support", "strategy": "ab", "variants": TWO, "unit": "user"})
    assert r.status_code == 201, r.text
    assert r.json()["weights"] == {"stable": 50, "canary": 50}
    seen: dict[str, str] = {}
    for i in range(40):
        for _ in range(2):  # the same user twice: the same variant
            resp = await ask(env, user=f"u{i}")
            assert resp.status_code == 200, resp.text
            body = resp.json()
            name, variant = resp.headers["x-keel-release"].split("/")
            assert name == "support" and body["release"] == {"name": "support", "variant": variant}
            assert body["model"] == "support"
            assert body["choices"][0]["message"]["content"] == (
                "Stable answer." if variant == "stable" else "Candidate answer.")
            assert seen.setdefault(f"u{i}", variant) == variant
    assert set(seen.values()) == {"stable", "canary"}
    report = (await env["client"].get("/v1/releases/support", headers=auth(env, "rel"))).json()
    assert sum(v["requests"] for v in report["variants"].values()) == 80
    assert report["variants"]["stable"]["latency_ms"]["p50"] is not None
    assert report["comparisons"]["canary"]["errors"]["state"] in ("pass", "inconclusive")
    # the key decides, not the body: a chat key cannot steer releases
    r = await env["client"].post("/v1/releases/support/promote", json={}, headers=auth(env, "chat"))
    assert r.status_code == 403
    r = await env["client"].post("/v1/releases/support/promote", json={"variant": "canary", "reason": "better"},
                                 headers=auth(env, "rel"))
    assert r.status_code == 200 and r.json()["status"] == "promoted"
    assert [(await ask(env, user=f"u{i}")).json()["release"]["variant"] for i in range(10)] == ["canary"] * 10
    r = await env["client"].post("/v1/releases/support/rollback", json={"reason": "oops"}, headers=auth(env, "rel"))
    assert r.json()["status"] == "rolled_back" and r.json()["weights"] == {"stable": 100, "canary": 0}
    decisions = (await env["client"].get("/v1/releases/support", headers=auth(env, "rel"))).json()["decisions"]
    assert [d["action"] for d in decisions][:3] == ["rollback", "promote", "create"]
    assert decisions[0]["reason"] == "oops" and "rel" in decisions[0]["actor"]
    audit = await env["client"].get("/v1/admin/audit", params={"trail": "releases"}, headers=auth(env, "admin"))
    assert audit.status_code == 200 and len(audit.json()) >= 3


async def test_a_variant_answers_from_its_own_documents(env) -> None:
    doc = "# Lighthouses\n\nThe Eddystone lighthouse stands on rocks south of Plymouth. It was completed in 1882.\n"
    r = await env["client"].post("/v1/ingest", files=[("files", ("lighthouse.md", doc.encode(), "text/plain"))],
                                 data={"collection": "docs"}, headers=auth(env, "admin"))
    job = (await env["client"].get(f"/v1/ingest/jobs/{r.json()['id']}?wait_s=30", headers=auth(env, "admin"))).json()
    assert job["state"] == "succeeded", job
    r = await create(env, {"name": "support", "strategy": "ab", "weights": {"plain": 0, "grounded": 100},
                           "variants": [{"name": "plain", "model": "m"}, {"name": "grounded", "rag": "docs"}]})
    assert r.status_code == 201, r.text
    resp = await ask(env, messages=[{"role": "user", "content": "When was the Eddystone lighthouse completed?"}])
    body = resp.json()
    assert resp.status_code == 200 and body["release"] == {"name": "support", "variant": "grounded"}, resp.text
    assert [c["doc_id"] for c in body["citations"]] == ["lighthouse.md"]
    prompt = " ".join(m.content for m in env["stable"].requests[-1].messages)
    assert "completed in 1882" in prompt  # the passage reached the model
    # a variant that decides the documents refuses a request that brings its own
    r = await ask(env, rag={"collection": "other"})
    assert r.status_code == 400 and "drop 'rag'" in r.json()["error"]["message"]


def test_a_variant_bundle_decides_policy_workflow_and_prompt() -> None:
    from app.core.errors import InvalidRequest
    from app.core.types import ChatMessage
    from app.services.chat import ChatRequest, RagUse
    from lifecycle.releases.serving import apply_variant
    from lifecycle.releases.spec import VariantSpec

    asked = ChatRequest(model="support", messages=(ChatMessage("user", "hi"),), policy="default")
    strict = apply_variant(asked, VariantSpec(name="b", model="m2", policy="strict"), "support")
    assert (strict.model, strict.policy, strict.rag, strict.prompt) == ("m2", "strict", None, None)
    agent = apply_variant(asked, VariantSpec(name="b", workflow="research"), "support")
    assert agent.model == "agent:research" and agent.policy == "default"  # the bound policy unless the variant sets one
    prompted = apply_variant(asked, VariantSpec(name="b", prompt="greet@2"), "support")
    assert prompted.prompt.ref == "greet@2" and prompted.model is None  # the server's default model
    with pytest.raises(InvalidRequest, match="drop 'rag'"):
        apply_variant(ChatRequest(model="support", messages=asked.messages, rag=RagUse(collection="x")),
                      VariantSpec(name="b", workflow="research"), "support")


async def test_streaming_names_the_release_and_the_openai_client_works_unchanged(env) -> None:
    assert (await create(env, {"name": "support", "strategy": "ab", "variants": TWO})).status_code == 201
    resp = await ask(env, stream=True)
    assert resp.status_code == 200 and "x-keel-release" in resp.headers
    first = json.loads(next(line[6:] for line in resp.text.splitlines() if line.startswith("data: ")))
    assert first["release"]["name"] == "support" and first["model"] == "support"
    client = openai.AsyncOpenAI(api_key=env["keys"]["chat"], base_url="http://keel/v1",
                                http_client=httpx.AsyncClient(transport=env["transport"]))
    variants = set()
    for _ in range(5):  # unit: the key, so one key sticks to one variant
        out = await client.chat.completions.with_raw_response.create(
            model="support", messages=[{"role": "user", "content": "hi"}])
        variants.add(out.headers["x-keel-release"])
        assert out.parse().choices[0].message.content
    assert len(variants) == 1


@pytest.mark.parametrize("body, status, code", [
    ({"name": "support", "strategy": "ab", "variants": [{"name": "a", "model": "nope"}, {"name": "b"}]},
     400, "unknown_model"),
    ({"name": "support", "strategy": "ab", "variants": [{"name": "a", "prompt": "missing@1"}, {"name": "b"}]},
     400, "unknown_prompt"),
    ({"name": "support", "strategy": "ab", "variants": [{"name": "a", "policy": "nope"}, {"name": "b"}]},
     400, "unknown_policy"),
    ({"name": "support", "strategy": "ab", "variants": [{"name": "a", "rag": "nope"}, {"name": "b"}]},
     400, "unknown_collection"),
    ({"name": "m", "strategy": "ab", "variants": TWO}, 409, "release_name_taken"),
    ({"name": "support", "strategy": "ab", "variants": TWO, "weights": {"stable": 60, "canary": 50}},
     400, "invalid_request"),
])
async def test_bad_releases_get_a_clear_error(env, body, status, code) -> None:
    r = await create(env, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert (await env["client"].get("/v1/releases", headers=auth(env, "rel"))).json()["data"] == []


async def test_two_releases_on_one_endpoint_conflict_until_the_first_is_finished(env) -> None:
    body = {"name": "support", "strategy": "canary", "variants": TWO}
    assert (await create(env, body)).status_code == 201
    r = await create(env, body)
    assert r.status_code == 409 and r.json()["error"]["code"] == "release_exists"
    await env["client"].post("/v1/releases/support/rollback", json={}, headers=auth(env, "rel"))
    r = await create(env, body)
    assert r.status_code == 201 and r.json()["status"] == "running"
    history = (await env["client"].get("/v1/releases/support/history", headers=auth(env, "rel"))).json()["data"]
    assert [h["status"] for h in history] == ["running", "rolled_back"]


async def test_a_canary_whose_backend_errors_is_rolled_back(env) -> None:
    body = {"name": "support", "strategy": "canary", "variants": TWO, "unit": "request",
            "canary": {"steps": [50, 100], "min_requests": 5, "min_duration_s": 0},
            "metrics": [{"name": "errors", "margin": 0.2}]}
    assert (await create(env, body)).status_code == 201
    env["candidate"].error = BackendUnavailable("the canary's server is down")
    env["candidate"].fail_after = 0
    statuses = Counter()
    for _ in range(60):
        statuses[(await ask(env)).status_code] += 1
    assert statuses[200] > 0 and sum(statuses.values()) == 60
    releases = env["container"].releases
    changes = releases.tick()
    assert changes and changes[0][1] == "rollback" and "errors" in changes[0][2]
    assert releases.get("support").status == "rolled_back"
    assert {(await ask(env)).json()["release"]["variant"] for _ in range(10)} == {"stable"}


async def test_a_good_canary_is_promoted_step_by_step_and_survives_a_restart(env) -> None:
    body = {"name": "support", "strategy": "canary", "variants": TWO, "unit": "request",
            "canary": {"steps": [25, 50, 100], "min_requests": 20, "min_duration_s": 0},
            "metrics": [{"name": "errors", "margin": 0.3}]}
    assert (await create(env, body)).status_code == 201
    releases = env["container"].releases
    for expected_step in (1, 2):
        for _ in range(120):
            assert (await ask(env)).status_code == 200
        (_, action, reason), = releases.tick()
        assert action == ("advance" if expected_step == 1 else "promote"), reason
    # another process on the same home sees the same state, and its numbers
    other = ReleaseService(SqliteReleaseStore(env["settings"].home / "releases.db"), check_interval_s=0)
    r = other.get("support")
    assert r.status == "promoted" and r.weights == {"stable": 0, "canary": 100}
    assert other.report("support")["variants"]["canary"]["requests"] > 40
    other.close()


async def test_feedback_counts_only_from_the_key_that_got_the_answer(env) -> None:
    assert (await create(env, {"name": "support", "strategy": "ab", "variants": TWO})).status_code == 201
    resp = (await ask(env)).json()
    r = await env["client"].post("/v1/feedback", json={"id": resp["id"], "rating": "down", "comment": "wrong"},
                                 headers=auth(env, "chat"))
    assert r.status_code == 201, r.text
    r = await env["client"].post("/v1/feedback", json={"id": resp["id"], "rating": "down"},
                                 headers=auth(env, "chat2"))
    assert r.status_code == 201
    r = await env["client"].post("/v1/feedback", json={"id": resp["id"]}, headers=auth(env, "chat"))
    assert r.status_code == 400 and "rating" in r.text
    report = (await env["client"].get("/v1/releases/support", headers=auth(env, "rel"))).json()
    fb = report["variants"][resp["release"]["variant"]]["feedback"]
    assert fb == {"rated": 1, "negative": 1, "negative_rate": 1.0}


async def shadow_pairs(env, n: int) -> list:
    """The release's stored shadow pairs once ``n`` are there (shadows answer in the background)."""
    releases = env["container"].releases
    for _ in range(100):
        releases.flush()
        pairs = releases.store.pairs(releases.get("support").id)
        if len(pairs) == n:
            break
        await asyncio.sleep(0.05)
    return pairs


async def test_shadow_answers_are_stored_and_never_returned(env) -> None:
    body = {"name": "support", "strategy": "shadow", "variants": TWO}
    assert (await create(env, body)).status_code == 201
    for _ in range(5):
        resp = await ask(env)
        assert resp.json()["choices"][0]["message"]["content"] == "Stable answer."
        assert resp.json()["release"]["variant"] == "stable"
    pairs = await shadow_pairs(env, 5)
    assert len(pairs) == 5 and all(p.shadow_text == "Candidate answer." and p.primary_text == "Stable answer."
                                   for p in pairs)
    assert all(p.similarity is not None for p in pairs)
    r = await env["client"].get("/v1/releases/support/shadow", headers=auth(env, "rel"))
    assert len(r.json()["data"]) == 5


async def test_shadow_answers_are_not_counted_against_the_callers_token_budget(env, monkeypatch) -> None:
    """A shadow is the operator's experiment: the caller's token budget pays for the answer it got, once."""
    made = env["container"].keys.create("metered", ["chat"], tokens_per_minute=100_000)
    env["keys"]["metered"] = made[1]
    spent: list[tuple[str, int, int]] = []

    async def spend(key_id: str, budget: int, tokens: int) -> None:
        spent.append((key_id, budget, tokens))

    monkeypatch.setattr(env["container"].rate_limiter, "aspend_tokens", spend)
    assert (await create(env, {"name": "support", "strategy": "shadow", "variants": TWO})).status_code == 201
    for _ in range(3):
        assert (await ask(env, "metered")).status_code == 200
    assert len(await shadow_pairs(env, 3)) == 3
    await env["container"].token_meter.drain()
    assert len(spent) == 3 and {k for k, _, _ in spent} == {made[0].id}


async def test_a_slow_shadow_never_slows_the_primary_and_drops_when_full(env) -> None:
    body = {"name": "support", "strategy": "shadow", "variants": TWO,
            "shadow": {"concurrency": 1, "queue": 2, "timeout_s": 30}}
    assert (await create(env, body)).status_code == 201
    env["candidate"].delay_s = 5.0  # per token: the shadow takes ages
    t0 = time.perf_counter()
    for _ in range(6):
        assert (await ask(env)).json()["choices"][0]["message"]["content"] == "Stable answer."
    assert time.perf_counter() - t0 < 5.0  # (not a speed claim: the primary did not wait for a 10 s shadow)
    dropped = env["container"].metrics.release_shadow.labels("support", "canary", "dropped")._value.get()
    assert dropped >= 3


async def test_a_shadow_backend_that_is_down_costs_the_primary_nothing_and_is_recorded(env) -> None:
    body = {"name": "support", "strategy": "shadow", "variants": TWO}
    assert (await create(env, body)).status_code == 201
    env["candidate"].fail_connect = 1_000  # the shadow's backend refuses every connection
    for _ in range(4):
        resp = await ask(env)
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Stable answer."
    pairs = await shadow_pairs(env, 4)
    assert len(pairs) == 4 and all(p.shadow_error and p.primary_text == "Stable answer." for p in pairs)
    errors = env["container"].metrics.release_shadow.labels("support", "canary", "error")._value.get()
    assert errors == 4
    report = (await env["client"].get("/v1/releases/support", headers=auth(env, "rel"))).json()
    assert report["variants"]["stable"]["requests"] == 4 and report["status"] == "running"


async def test_blue_green_switches_only_when_green_answers_its_probes(env) -> None:
    body = {"name": "support", "strategy": "bluegreen", "variants": [{"name": "blue", "model": "m"},
                                                                       {"name": "green", "model": "m2"}],
            "probes": ["ping one", "ping two"]}
    assert (await create(env, body)).status_code == 201
    assert (await ask(env)).json()["release"]["variant"] == "blue"
    env["candidate"].fail_connect = 1
    r = await env["client"].post("/v1/releases/support/promote", json={}, headers=auth(env, "rel"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_ready"
    assert (await ask(env)).json()["release"]["variant"] == "blue"
    r = await env["client"].post("/v1/releases/support/promote", json={}, headers=auth(env, "rel"))
    assert r.status_code == 200 and "2/2 probes" in r.json()["decision"]["reason"]
    assert (await ask(env)).json()["release"]["variant"] == "green"
    r = await env["client"].post("/v1/releases/support/rollback", json={}, headers=auth(env, "rel"))
    assert (await ask(env)).json()["release"]["variant"] == "blue"


async def test_a_canary_starts_only_for_a_variant_that_passed_its_eval_gate(env) -> None:
    content = {"messages": [{"role": "system", "content": "Answer in one sentence."}]}
    r = await env["client"].post("/v1/prompts", json={"name": "greet", "content": content},
                                 headers=auth(env, "admin"))
    assert r.status_code == 201, r.text
    body = {"name": "support", "strategy": "canary",
            "variants": [{"name": "stable", "model": "m"}, {"name": "canary", "model": "m", "prompt": "greet@1"}]}
    r = await create(env, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "gate_failed", r.text
    assert "greet@1" in r.json()["error"]["message"]
    r = await create(env, {**body, "override_reason": "hotfix"})
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    r = await create(env, {**body, "override_reason": "hotfix, evals run after"}, who="admin")
    assert r.status_code == 201, r.text
    assert "gate overridden" in r.json()["decision"]["reason"] and "hotfix" in r.json()["decision"]["reason"]
    # the variant's prompt is rendered in front of the request's messages
    await env["client"].post("/v1/releases/support/promote", json={}, headers=auth(env, "rel"))
    resp = await ask(env, "chat")
    assert resp.status_code == 200 and resp.json()["release"]["variant"] == "canary"
    sent = env["stable"].requests[-1].messages
    assert [m.content for m in sent] == ["Answer in one sentence.", "hi"]
    assert resp.json()["prompt"]["ref"] == "greet@1"


async def test_the_online_judge_scores_answers_and_can_fail_a_canary(env) -> None:
    r = await create(env, {"name": "support", "strategy": "ab", "variants": TWO, "judge": {"metric": "exact_match"}})
    assert r.status_code == 400 and "reference" in r.json()["error"]["message"]
    r = await create(env, {"name": "support", "strategy": "ab", "variants": TWO, "judge": {"metric": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_metric"
    env["candidate"].reply = "Shut up, you stupid idiot, I will hurt you."
    body = {"name": "support", "strategy": "canary", "variants": TWO, "unit": "request",
            "canary": {"steps": [50, 100], "min_requests": 100, "min_duration_s": 0},
            "judge": {"metric": "no_toxicity", "sample": 1.0},
            "metrics": [{"name": "errors", "margin": 0.2}, {"name": "judge_score", "margin": 0.1}]}
    assert (await create(env, body)).status_code == 201, body
    for _ in range(40):
        assert (await ask(env)).status_code == 200
    releases = env["container"].releases
    for _ in range(100):  # scores arrive in the background
        report = releases.report("support")
        if sum(v["judge"]["scored"] for v in report["variants"].values()) == 40:
            break
        await asyncio.sleep(0.05)
    assert report["variants"]["stable"]["judge"]["mean"] == 1.0
    assert report["variants"]["canary"]["judge"]["mean"] == 0.0
    (_, action, reason), = releases.tick()
    assert action == "rollback" and "judge_score" in reason


async def test_a_canary_resumes_at_its_step_with_its_data_after_a_restart(tmp_path: Path) -> None:
    settings = load_settings(
        home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0},
                                 "other": {"kind": "openai", "base_url": "http://unused2/v1", "retries": 0}},
        models={"m": {"backend": "local", "model": "fake-model"}, "m2": {"backend": "other", "model": "fake-2"}},
        default_model="m", auth={"default_rate_limit_per_minute": 10_000}, guardrails={"enabled": False},
        releases={"check_interval_s": 0})
    body = {"name": "support", "strategy": "canary", "variants": TWO, "unit": "request",
            "canary": {"steps": [25, 50, 100], "min_requests": 20, "min_duration_s": 0},
            "metrics": [{"name": "errors", "margin": 0.3}]}

    async def process():
        container = await Container.build(settings, backends={"local": ScriptedBackend(), "other": ScriptedBackend()},
                                          rag=build_rag(settings, embedder=HashingEmbedder()))
        key = container.keys.create(f"k{len(container.keys.list())}", ["admin"])[1]
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                   base_url="http://keel", headers={"Authorization": f"Bearer {key}"})
        return container, client

    async def traffic(client, n: int) -> None:
        for _ in range(n):
            r = await client.post("/v1/chat/completions", json={"model": "support",
                                                                "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200

    first, client = await process()
    try:
        assert (await client.post("/v1/releases", json=body)).status_code == 201
        # per-request assignment at 25%: send until the canary arm has enough to be judged (a fixed 120 left it
        # under 20 about one run in fifty)
        for _ in range(20):
            await traffic(client, 20)
            if first.releases.report("support")["variants"]["canary"]["requests"] >= 30:
                break
        assert [a for _, a, _ in first.releases.tick()] == ["advance"]
        before = first.releases.report("support")
    finally:  # a failure here must not leave the container's threads keeping pytest from exiting
        await client.aclose()
        await first.aclose()  # the process stops mid-canary

    second, client = await process()
    try:
        after = second.releases.report("support")
        assert after["status"] == "running" and after["step"] == 1 and after["weights"] == {"stable": 50,
                                                                                            "canary": 50}
        assert {v: d["requests"] for v, d in after["variants"].items()} == {
            v: d["requests"] for v, d in before["variants"].items()}
        assert after["step_started_at"] == before["step_started_at"]  # its window did not restart
        await traffic(client, 120)
        assert [a for _, a, _ in second.releases.tick()] == ["promote"]
    finally:
        await client.aclose()
        await second.aclose()


async def test_a_release_endpoint_is_listed_as_a_model_and_no_route_can_take_its_name(env) -> None:
    from app.core.errors import Conflict
    from app.core.settings import ModelAlias

    assert (await create(env, {"name": "support", "strategy": "ab", "variants": TWO})).status_code == 201
    models = (await env["client"].get("/v1/models", headers=auth(env, "chat"))).json()["data"]
    card = next(m for m in models if m["id"] == "support")
    assert "release (ab, running)" in card["description"] and "stable 50%" in card["description"]
    with pytest.raises(Conflict, match="release endpoint"):
        env["container"].llm.routes.set("support", ModelAlias(backend="local", model="x"), owner="finetune:x",
                                        actor="test")


async def test_an_agent_workflow_can_shadow_and_its_runs_are_not_the_callers(env) -> None:
    """A shadow agent run reads what the caller's would and acts on nothing (tests/unit/test_agent_shadow.py)."""
    body = {"name": "support", "strategy": "shadow",
            "variants": [{"name": "stable", "model": "m"}, {"name": "agent", "workflow": "rag-qa"}]}
    assert (await create(env, body)).status_code == 201
    for _ in range(2):
        resp = await ask(env)
        assert resp.json()["choices"][0]["message"]["content"] == "Stable answer."
    pairs = await shadow_pairs(env, 2)
    assert len(pairs) == 2 and all(p.primary_text == "Stable answer." and p.shadow_text and not p.shadow_error
                                   for p in pairs)
    agents = env["container"].agents
    caller = env["container"].keys.verify(env["keys"]["chat"]).id
    runs = await agents.list_runs()
    assert len(runs) == 2 and {r["owner"] for r in runs} == {f"shadow:{caller}"}, runs
    assert await agents.list_runs(owner=caller) == []
    r = await env["client"].get("/v1/agents/runs", headers=auth(env, "chat"))
    assert r.status_code == 200 and r.json()["data"] == []  # the caller's own list does not show them


# -- the routing table decides what an endpoint serves ---------------------------------------------------------


def _shared(tmp_path: Path, **kw) -> ReleaseService:
    """A service as one API process opens it: its releases and its routing table on files others share."""
    return ReleaseService(SqliteReleaseStore(tmp_path / "r.db"), check_interval_s=0,
                          routes=RoutingTable({}, {}, SqliteRoutingStore(tmp_path / "routing.db"),
                                              check_interval_s=0), **kw)


def test_every_traffic_change_of_a_release_is_a_split_in_the_routing_table(tmp_path: Path) -> None:
    svc = _shared(tmp_path)
    svc.create(spec(), actor="ann", reason="try v2")
    svc.pause("support", actor="bob")  # the same traffic: nothing to write
    svc.resume("support", actor="bob")
    svc.promote("support", actor="carl", reason="looks good")
    split = svc.routes.split("support")
    assert (split.owner, split.weights, split.actor) == ("release:support", {"stable": 0.0, "canary": 100.0}, "carl")
    events = svc.routes.split_events("support")
    assert [(e.action, e.actor, e.from_ref, e.to_ref) for e in events] == [
        ("split.set", "carl", "stable 95%, canary 5%", "stable 0%, canary 100%"),
        ("split.set", "ann", None, "stable 95%, canary 5%")]
    assert events[0].reason == "promote: looks good" and events[0].details["release_id"] == 1
    svc.rollback("support", actor="dana")  # blue/green's instant rollback is a split too
    assert svc.routes.split("support").weights == {"stable": 100.0, "canary": 0.0}
    # one namespace: the endpoint is not a model alias anyone may route
    with pytest.raises(Conflict, match="release endpoint"):
        svc.routes.set("support", ModelAlias(backend="x", model="m"), owner="finetune:m", actor="eve")


def test_serving_follows_the_split_and_a_split_left_behind_is_reconciled(tmp_path: Path, monkeypatch) -> None:
    """A process dies (or the routing store is down) between the release's transition and its split: the
    endpoint keeps serving the split it had, the controller's next tick writes the new one, and no late writer
    takes a split back to an older state."""
    svc = _shared(tmp_path)
    first = svc.create(spec(), actor="ann")
    other = _shared(tmp_path)  # another API process
    monkeypatch.setattr(svc.routes.store, "put_split", _down)
    svc.promote("support", actor="carl")
    assert svc.get("support").weights == {"stable": 0, "canary": 100}  # the decision landed
    for s in (svc, other):
        s.refresh(force=True)
        assert s.active("support").weights == {"stable": 95.0, "canary": 5.0}  # traffic as the split says
        assert {s.assign(s.active("support"), f"u{i}").variant.name for i in range(200)} == {"stable", "canary"}
    monkeypatch.undo()
    assert other.tick() == [] and other.active("support").weights == {"stable": 0.0, "canary": 100.0}
    svc.refresh(force=True)
    assert {svc.assign(svc.active("support"), f"u{i}").variant.name for i in range(200)} == {"canary"}
    # a writer still holding the first state cannot turn the split back
    svc._publish(first, actor="late", reason="stale")
    assert svc.routes.split("support").weights == {"stable": 0.0, "canary": 100.0}
    assert [e.actor for e in svc.routes.split_events("support")] == ["controller", "ann"]


def test_a_release_without_its_split_is_not_served_until_reconciled(tmp_path: Path, monkeypatch) -> None:
    svc = _shared(tmp_path)
    monkeypatch.setattr(svc.routes.store, "put_split", _down)
    svc.create(spec(strategy="ab"), actor="ann")
    assert svc.active("support") is None  # nothing in the routing table says it serves
    monkeypatch.undo()
    assert _shared(tmp_path).active("support").weights == {"stable": 50.0, "canary": 50.0}  # reconciled on start


def _down(*args, **kwargs):
    from app.core.errors import StoreUnavailable

    raise StoreUnavailable("the routing table's database is down")


def test_a_blue_green_switch_moves_every_unit_whatever_the_variants_order(tmp_path: Path) -> None:
    """Blue listed second: the switch's split has the same numbers in another order; assignment follows it."""
    svc = _shared(tmp_path)
    svc.create(ReleaseSpec.model_validate({
        "name": "support", "strategy": "bluegreen", "baseline": "blue",
        "variants": [{"name": "green", "model": "m"}, {"name": "blue", "model": "m"}]}), actor="ann")
    units = [f"u{i}" for i in range(100)]
    assert {svc.assign(svc.active("support"), u).variant.name for u in units} == {"blue"}
    svc.promote("support", actor="bob")
    assert {svc.assign(svc.active("support"), u).variant.name for u in units} == {"green"}
    svc.rollback("support", actor="bob")
    assert {svc.assign(svc.active("support"), u).variant.name for u in units} == {"blue"}


def test_a_name_taken_by_a_model_alias_stops_that_release_only(tmp_path: Path, caplog) -> None:
    """Upgrading a home where an adapter deploy already routed a release's name (before the routing table knew
    release endpoints): the service starts, the other releases serve, the clash is logged."""
    svc = _shared(tmp_path)
    svc.create(spec(strategy="ab"), actor="ann")
    svc.create(spec(name="billing", strategy="ab"), actor="ann")
    routes = RoutingTable({}, {"local": BackendSettings(kind="openai", base_url="http://127.0.0.1:9/v1")},
                          SqliteRoutingStore(tmp_path / "routing.db"), check_interval_s=0)
    with routes.store._tx() as db:  # as an earlier release could leave it: a route and a split on one name
        db.execute("DELETE FROM route_splits WHERE endpoint = 'support'")
    routes.refresh(force=True)
    routes.set("support", ModelAlias(backend="local", model="m-v2"), owner="finetune:m", actor="old")
    svc.store.transition(svc.get("billing"), weights={"stable": 10.0, "canary": 90.0},
                         decision=Decision("hold", "moved while down", 0.0))
    again = ReleaseService(SqliteReleaseStore(tmp_path / "r.db"), check_interval_s=0, routes=RoutingTable(
        {}, {"local": BackendSettings(kind="openai", base_url="http://127.0.0.1:9/v1")},
        SqliteRoutingStore(tmp_path / "routing.db"), check_interval_s=0))
    assert again.active("support") is None and "its split cannot be written" in caplog.text
    assert again.active("billing").weights == {"stable": 10.0, "canary": 90.0}  # reconciled
    assert again.tick() == []


def test_a_new_release_on_an_endpoint_serves_the_old_outcome_until_its_split_is_written(tmp_path: Path,
                                                                                           monkeypatch) -> None:
    svc = _shared(tmp_path)
    svc.create(spec(strategy="ab"), actor="ann")
    svc.promote("support", actor="ann", variant="canary")
    monkeypatch.setattr(SqliteRoutingStore, "put_split", _down)  # in every process
    second = svc.create(spec(strategy="ab"), actor="bob")
    served = _shared(tmp_path).active("support")  # another process: its start's reconcile cannot write either
    assert served.id == second.id - 1 and served.weights == {"stable": 0.0, "canary": 100.0}
    monkeypatch.undo()
    svc.tick()
    assert svc.active("support").id == second.id and svc.active("support").weights == {"stable": 50.0,
                                                                                        "canary": 50.0}
