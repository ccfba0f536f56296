"""Build the prompt registry once (API lifespan or a CLI command): the store the settings pick, seeded with the
starter library when empty."""

from __future__ import annotations

import logging
from pathlib import Path

from app.llm.routing import RoutingTable, open_routing_table
from prompts.portable import import_dir
from prompts.registry import LIBRARY_DIR, PromotionGate, PromptRegistry
from prompts.settings import PromptConfig, PromptSettings
from prompts.store import PromptStore, SqlitePromptStore

log = logging.getLogger("keel.prompts")


def build_prompt_store(settings: PromptSettings, home: Path) -> PromptStore:
    """Postgres when ``settings.url`` is set, else the SQLite file (``db_path`` or ``<home>/prompts.db``)."""
    if settings.url:
        from prompts.store_pg import PostgresPromptStore  # lazy: psycopg is loaded only when Postgres is used

        return PostgresPromptStore(settings.url.get_secret_value(), audit_retention=settings.audit_retention)
    return SqlitePromptStore(settings.resolved_db_path(home), audit_retention=settings.audit_retention)


def build_registry(settings: PromptConfig, *, gate: PromotionGate | None = None,
                   routes: RoutingTable | None = None) -> PromptRegistry:
    """The registry on SQLite or Postgres (``prompts.url``), its labels in ``routes`` (the process's routing table;
    opened here, and closed with the registry, when not given), seeded with the starter library when empty."""
    store = build_prompt_store(settings.prompts, settings.home)
    try:
        table = routes if routes is not None else open_routing_table(settings)
    except BaseException:
        store.close()
        raise
    registry = PromptRegistry(store, settings.prompts, gate=gate, routes=table, owns_routes=routes is None)
    registry.adopt_legacy_labels()
    if settings.prompts.seed_library and LIBRARY_DIR.is_dir() and not store.list_templates():
        report = import_dir(registry, LIBRARY_DIR, actor="system:seed")
        log.info("seeded the prompt registry with %d starter templates", len(report.templates))
    return registry
