from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import load_settings


def test_defaults_give_a_managed_vllm_backend_and_the_smollm2_alias(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    assert s.backends["local"].kind == "vllm"
    assert s.backends["local"].managed is not None
    assert s.backends["local"].managed.model_path == tmp_path / "models" / "smollm2"
    assert s.models["smollm2"].backend == "local"
    assert s.server.url == "http://127.0.0.1:8000"


def test_env_vars_deep_merge_into_the_default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_BACKENDS__LOCAL__MANAGED__PORT", "9123")
    monkeypatch.setenv("KEEL_SERVER__PORT", "9000")
    s = load_settings()
    assert s.backends["local"].managed.port == 9123
    assert s.backends["local"].kind == "vllm"  # not wiped by the partial override
    assert s.models["smollm2"].defaults.temperature == 0.2
    assert s.server.port == 9000


def test_base_url_means_connect_instead_of_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_BACKENDS__LOCAL__BASE_URL", "http://gpu-box:8000/v1")
    s = load_settings()
    assert s.backends["local"].base_url == "http://gpu-box:8000/v1"
    assert s.backends["local"].managed is None


def test_yaml_file_adds_backends_and_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "keel.yaml"
    cfg.write_text(
        "backends:\n  hosted:\n    kind: openai\n    base_url: http://127.0.0.1:1/v1\n"
        "models:\n  big:\n    backend: hosted\n    model: llama\n    fallback: smollm2\n"
    )
    monkeypatch.setenv("KEEL_CONFIG", str(cfg))
    s = load_settings()
    assert set(s.backends) == {"local", "hosted"}
    assert s.models["big"].fallback == "smollm2"
    assert "smollm2" in s.models


def test_alias_naming_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValidationError, match="unknown backend 'nope'"):
        load_settings(models={"x": {"backend": "nope", "model": "m"}})


def test_openai_backend_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="needs base_url"):
        load_settings(backends={"h": {"kind": "openai"}})


def test_missing_config_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_CONFIG", "/nonexistent/keel.yaml")
    with pytest.raises(FileNotFoundError, match="KEEL_CONFIG"):
        load_settings()


def test_a_local_backend_of_another_kind_gets_no_managed_vllm(tmp_path: Path) -> None:
    """The built-in default merged its managed-vLLM block into any backend named 'local', so `keel serve` with
    `local: {kind: openai, base_url: ...}` ran the vLLM preflight checks for a server it never starts."""
    s = load_settings(home=tmp_path, backends={"local": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}})
    assert s.backends["local"].kind == "openai" and s.backends["local"].managed is None


def test_one_database_url_covers_every_store_that_can_live_in_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import Settings

    monkeypatch.setenv("KEEL_DATABASE_URL", "postgresql://keel:pw@db:5432/keel")
    monkeypatch.setenv("KEEL_RELEASES__URL", "postgresql://keel:pw@other:5432/rel")  # a store's own URL wins
    s = Settings()
    urls = {name: url.get_secret_value() for name, url in (
        ("auth", s.auth.url), ("routing", s.routing.url), ("prompts", s.prompts.url),
        ("releases", s.releases.url), ("agents", s.agents.postgres_url), ("evals", s.evals.url),
        ("lineage", s.monitor.url), ("guardrail audit", s.guardrails.audit_url))}
    assert urls.pop("releases") == "postgresql://keel:pw@other:5432/rel"
    assert set(urls.values()) == {"postgresql://keel:pw@db:5432/keel"}
    assert s.jobs.url is None  # the queue's jobs read files under home: sharing it is a choice of its own
    own_file = Settings(guardrails={"audit_db": "/tmp/audit.db"})
    assert own_file.guardrails.audit_url is None  # a store's own setting wins, a file as well as a URL
    with pytest.raises(ValueError) as refused:
        Settings(evals={"url": "postgresql+psycopg://keel:hunter2@db/keel"})
    assert "evals.url must be a postgresql:// URL" in str(refused.value) and "hunter2" not in str(refused.value)
    assert "pw" not in str(s.database_url)  # masked wherever the settings are printed
    with pytest.raises(ValueError, match="database_url must be a postgresql:// URL"):
        Settings(database_url="mysql://db/keel")


def test_the_routing_table_is_shared_where_prompts_or_releases_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt labels and release splits live in the routing table: a shared prompt registry (or release store)
    without a shared routing table would keep labels (splits) per machine."""
    from app.settings import Settings

    prompts = Settings(prompts={"url": "postgresql://keel:pw@db:5432/prompts"})
    assert prompts.routing.url.get_secret_value() == "postgresql://keel:pw@db:5432/prompts"
    releases = Settings(releases={"url": "postgresql://keel:pw@db:5432/rel"})
    assert releases.routing.url.get_secret_value() == "postgresql://keel:pw@db:5432/rel"
    own = Settings(prompts={"url": "postgresql://keel:pw@db:5432/prompts"},
                   routing={"url": "postgresql://keel:pw@db:5432/routing"})
    assert own.routing.url.get_secret_value() == "postgresql://keel:pw@db:5432/routing"  # its own setting wins
    assert Settings().routing.url is None  # one machine: <home>/routing.db
