"""The composition root finds what the project ships whatever the working directory (systemd, a container's WORKDIR)."""

from __future__ import annotations

from app.container import build_guards
from app.core.metrics import Metrics
from app.settings import Settings


def test_the_shipped_guardrail_policy_is_found_from_another_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = build_guards(Settings(home=tmp_path / "home"), Metrics())  # cheap: nothing is loaded before warm-up
    assert engine.settings.policy_path.is_file(), engine.settings.policy_path
    assert engine.settings.policy_path.name == "default.yaml"
