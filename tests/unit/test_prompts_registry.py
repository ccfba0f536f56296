"""PromptRegistry: refs, cached rendering, change detection, includes and the promotion gate."""

from __future__ import annotations

import time

import pytest

from app.core.errors import NotFound
from prompts.errors import LabelProtected, PromotionGateFailed, TemplateInvalid
from prompts.registry import GateVerdict
from prompts.testing import RecordingGate, content, sqlite_registry


@pytest.fixture
def reg(tmp_path):
    r = sqlite_registry(tmp_path / "p.db")
    yield r
    r.close()


def _two_versions(reg):
    reg.create("greet", content("Hi {{ who }}", variables=[{"name": "who"}]), author="ann")
    reg.save("greet", content("Hello {{ who }}!", variables=[{"name": "who"}], temperature=0.1),
             author="bob", message="warmer", base_version=1)


def test_refs(reg):
    _two_versions(reg)
    with pytest.raises(NotFound, match=r"has no label 'production'.*greet@latest"):
        reg.render("greet", {"who": "x"})
    reg.move_label("greet", "production", 1, actor="ann")
    reg.move_label("greet", "staging", 2, actor="ann")
    assert reg.render("greet", {"who": "Al"}).messages[0].content == "Hi Al"
    staged = reg.render("greet@staging", {"who": "Al"})
    assert (staged.messages[0].content, staged.ref, staged.params.temperature) == ("Hello Al!", "greet@2", 0.1)
    assert staged.hash == reg.resolve("greet@2").hash
    assert reg.render("greet@latest", {"who": "x"}).version == 2
    assert reg.render("greet@v1", {"who": "x"}).version == 1


def test_invalid_save_writes_nothing(reg):
    with pytest.raises(TemplateInvalid, match="undeclared"):
        reg.create("bad", content("{{ nope }}"), author="a")
    assert reg.list_templates() == []


def test_hot_path_is_served_from_memory(tmp_path):
    now = [0.0]
    from prompts.registry import PromptRegistry
    from prompts.settings import PromptSettings
    from prompts.store import SqlitePromptStore

    store = SqlitePromptStore(tmp_path / "p.db")
    reg = PromptRegistry(store, PromptSettings(), clock=lambda: now[0])
    _two_versions(reg)
    reg.move_label("greet", "production", 2, actor="a")
    calls: list[str] = []
    for where, methods in ((store, ("get_version", "latest_version", "revision")),
                           (reg.routes.store, ("revision", "load"))):  # the labels live in the routing table
        for method in methods:
            original = getattr(where, method)

            def spy(*args, _original=original, _name=f"{type(where).__name__}.{method}", **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            setattr(where, method, spy)
    reg.render("greet", {"who": "a"})
    first = len(calls)
    for _ in range(50):
        reg.render("greet", {"who": "a"})
    assert len(calls) == first  # no store access within the check interval
    now[0] += 0.6
    reg.render("greet", {"who": "a"})
    # one cheap check of each store, nothing changed
    assert calls[first:] == ["SqlitePromptStore.revision", "SqliteRoutingStore.revision"]
    store.close()


def test_label_move_by_another_worker_is_seen_within_a_second(tmp_path):
    a = sqlite_registry(tmp_path / "p.db")
    _two_versions(a)
    a.move_label("greet", "production", 1, actor="a")
    b = sqlite_registry(tmp_path / "p.db")
    assert b.render("greet", {"who": "x"}).version == 1
    moved_at = time.monotonic()
    a.move_label("greet", "production", 2, actor="a")
    while b.render("greet", {"who": "x"}).version != 2:
        assert time.monotonic() - moved_at < 1.0, "worker b did not see the label move within 1 s"
        time.sleep(0.02)
    a.close()
    b.close()


def test_includes_follow_labels(reg):
    reg.create("footer", content("-- {{ who }} --", variables=[{"name": "who"}]), author="a")
    reg.save("footer", content("== {{ who }} ==", variables=[{"name": "who"}]), author="a", base_version=1)
    reg.move_label("footer", "production", 1, actor="a")
    reg.create("letter", content("Dear {{ who }}\n{% include 'footer@production' %} {% include 'footer@2' %}",
                                 variables=[{"name": "who"}]), author="a")
    reg.move_label("letter", "production", 1, actor="a")
    assert reg.render("letter", {"who": "Al"}).messages[0].content == "Dear Al\n-- Al -- == Al =="
    reg.move_label("footer", "production", 2, actor="a")
    assert reg.render("letter", {"who": "Al"}).messages[0].content == "Dear Al\n== Al == == Al =="


def test_include_checks(reg):
    with pytest.raises(TemplateInvalid, match="cannot be resolved"):
        reg.create("x", content("{% include 'missing@production' %}"), author="a")
    reg.create("two", content("a", "b"), author="a")
    with pytest.raises(TemplateInvalid, match="exactly one message"):
        reg.create("x", content("{% include 'two@1' %}"), author="a")
    reg.create("needs", content("{{ secret }}", variables=[{"name": "secret"}]), author="a")
    with pytest.raises(TemplateInvalid, match=r"partial needs@1 uses variable\(s\) secret; declare them"):
        reg.create("x", content("{% include 'needs@1' %}"), author="a")


def test_include_cycle_via_label_move_is_caught_at_render(reg):
    reg.create("a", content("A"), author="x")
    reg.move_label("a", "production", 1, actor="x")
    reg.create("b", content("B{% include 'a@production' %}"), author="x")
    reg.move_label("b", "production", 1, actor="x")
    reg.save("a", content("A2{% include 'b@production' %}"), author="x", base_version=1)
    assert reg.render("a@2").messages[0].content == "A2BA"
    reg.move_label("a", "production", 2, actor="x")
    with pytest.raises(TemplateInvalid, match="include cycle: a@2 -> b@1 -> a@2"):
        reg.render("a")


def test_include_depth_limit(tmp_path):
    reg = sqlite_registry(tmp_path / "p.db", limits={"max_include_depth": 2})
    reg.create("p0", content("end"), author="x")
    for i in range(1, 4):
        src = f"{{% include 'p{i - 1}@1' %}}"
        if i < 3:
            reg.create(f"p{i}", content(src), author="x")
        else:
            with pytest.raises(TemplateInvalid, match="includes nest deeper than 2"):
                reg.create(f"p{i}", content(src), author="x")
    reg.close()


def test_default_gate_allows_and_is_recorded(reg):
    _two_versions(reg)
    move = reg.move_label("greet", "production", 2, actor="ann")
    assert move.changed and move.verdict == GateVerdict(passed=True, reason="no gate configured")
    entry = reg.label_history("greet", "production")[0]
    assert entry.details["gate"]["reason"] == "no gate configured"
    assert not reg.move_label("greet", "production", 2, actor="ann").changed  # no-op, no audit row
    assert len(reg.label_history("greet", "production")) == 1


def test_promotion_gate_refuses_and_admin_overrides(reg):
    _two_versions(reg)
    gate = RecordingGate(allow={1})
    reg.set_gate(gate)
    reg.move_label("greet", "staging", 2, actor="ann")  # unprotected: no gate call
    assert gate.calls == []
    move = reg.move_label("greet", "production", 1, actor="ann")
    assert gate.calls == [("greet", 1)] and move.verdict.passed
    with pytest.raises(PromotionGateFailed, match=r"eval score 0\.41 < 0\.80") as e:
        reg.move_label("greet", "production", 2, actor="ann")
    assert (e.value.code, e.value.status) == ("promotion_gate_failed", 409)
    assert e.value.reason == "eval score 0.41 < 0.80"
    assert reg.labels("greet")["production"] == 1
    move = reg.move_label("greet", "production", 2, actor="root", override_reason="hotfix, evals flaky")
    assert move.overridden and not move.verdict.passed
    entry = reg.label_history("greet", "production")[0]
    assert (entry.action, entry.actor, entry.reason, entry.from_version, entry.to_version) == (
        "label.override", "root", "hotfix, evals flaky", 1, 2)
    assert entry.details["gate"]["details"] == {"score": 0.41}
    # rollback is moving the label back (version 1 passes the gate)
    reg.move_label("greet", "production", 1, actor="ann")
    assert [(h.from_version, h.to_version) for h in reg.label_history("greet", "production")] == [
        (2, 1), (1, 2), (None, 1)]


def test_broken_gate_fails_closed(reg):
    _two_versions(reg)

    def broken(name, version):
        raise RuntimeError("eval service down")

    reg.set_gate(broken)
    with pytest.raises(PromotionGateFailed, match="the gate raised RuntimeError: eval service down"):
        reg.move_label("greet", "production", 1, actor="a")


def test_custom_protected_labels_and_removal(tmp_path):
    reg = sqlite_registry(tmp_path / "p.db", protected_labels=["production", "canary"])
    _two_versions(reg)
    reg.set_gate(RecordingGate())
    with pytest.raises(PromotionGateFailed):
        reg.move_label("greet", "canary", 2, actor="a")
    reg.move_label("greet", "production", 1, actor="a", override_reason="bootstrap")
    with pytest.raises(LabelProtected, match="protected label"):
        reg.remove_label("greet", "production", actor="a")
    reg.move_label("greet", "beta", 1, actor="a")
    reg.remove_label("greet", "beta", actor="a")
    reg.remove_label("greet", "production", actor="root", override_reason="retired")
    assert reg.labels("greet") == {}
    reg.close()


def test_diff(reg):
    _two_versions(reg)
    d = reg.diff("greet", "1", "latest")
    assert (d.from_ref, d.to_ref) == ("greet@1", "greet@2")
    assert "--- greet@1" in d.diff and "+++ greet@2" in d.diff
    assert "-  content: Hi {{ who }}" in d.diff and "+  content: Hello {{ who }}!" in d.diff
    assert "+  temperature: 0.1" in d.diff
    assert d.changed == ["messages", "params"]
    assert reg.diff("greet", "2", "greet@2").diff == ""


def test_preview_of_unsaved_content(reg):
    out = reg.preview(content("Hi {{ n * 2 }}", variables=[{"name": "n", "type": "integer"}]), {"n": 4})
    assert out.messages[0].content == "Hi 8" and out.version is None and out.ref == "draft@draft"


def test_labels_of_an_earlier_release_are_handed_over_to_the_routing_table(tmp_path):
    """Labels used to live in the prompt store: the first registry opened on it moves them to the routing table
    (a label the table already has wins: it was moved since), once, audited."""
    from app.llm.routing import Label, RoutingTable, SqliteRoutingStore
    from prompts.registry import PromptRegistry
    from prompts.settings import PromptSettings
    from prompts.store import SqlitePromptStore

    store = SqlitePromptStore(tmp_path / "prompts.db")
    for i in (1, 2):
        store.save("greet", content(f"Hi {i} {{{{ who }}}}", variables=[{"name": "who"}]), author="a",
                   message="", base_version=i - 1 or None)
    store._db.executemany("INSERT INTO prompt_labels VALUES (?, ?, ?, '2025-01-01', ?)",
                          [("greet", "production", 2, "alice"), ("greet", "staging", 1, "")])
    routes = RoutingTable({}, {}, SqliteRoutingStore(tmp_path / "routing.db"), check_interval_s=0.0)
    routes.set_label(Label("prompt", "greet", "staging", 2, actor="bob"))
    reg = PromptRegistry(store, PromptSettings(seed_library=False), routes=routes, owns_routes=True)
    assert reg.adopt_legacy_labels() == 1
    assert reg.labels("greet") == {"production": 2, "staging": 2} and store.legacy_labels() == []
    # the old rows stay as they were (what a process of the earlier release, or a downgrade, reads)
    assert store._db.execute("SELECT count(*) FROM prompt_labels").fetchone() == (2,)
    assert reg.adopt_legacy_labels() == 0
    [event] = routes.label_events("prompt", label="production")
    assert (event.action, event.actor, event.to_ref, event.details["ref"]) == (
        "label.adopt", "alice", "2", store.get_version("greet", 2).hash)
    assert reg.render("greet", {"who": "x"}).version == 2
    reg.close()
