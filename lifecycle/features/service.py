"""The feature store: Feast over Keel's own data, for prompts, agents and training sets.

``apply`` exports the current rows (:mod:`lifecycle.features.export`) and registers the definitions
(:mod:`lifecycle.features.definitions`); ``materialize`` exports again and loads the newest values into the online
store; ``online`` reads them by entity key (milliseconds: a prompt render can afford it); ``historical`` joins
them point-in-time onto rows stamped with their own times (a training example sees the values of its moment, never
later ones). The online store is SQLite in ``<home>/features`` by default and Redis or Postgres by configuration
(``features.online_store``); Feast is imported on first use (~7 s), never at start-up.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from app.core.errors import InvalidRequest, NotFound
from lifecycle.features.export import Sources, export
from lifecycle.features.settings import FeatureSettings

_REF = re.compile(r"^([a-z][a-z0-9_]{0,62}):([a-z][a-z0-9_]{0,62})$")
ENTITY_KEYS = {"user": "user_id", "document": "doc_id"}


def parse_ref(ref: str) -> tuple[str, str]:
    m = _REF.match(ref) if isinstance(ref, str) else None
    if m is None:
        raise InvalidRequest(f"{str(ref)[:80]!r} is not a feature reference: write view:feature, e.g. "
                             "user_stats:feedback_rate", param="features", code="invalid_feature_ref")
    return m.group(1), m.group(2)


class FeatureService:
    def __init__(self, settings: FeatureSettings, home: Path, sources: Sources | None = None) -> None:
        self.settings = settings
        self.folder = settings.folder(home)
        self.data = self.folder / "data"
        self.sources = sources or Sources()
        self._store: Any = None
        self._lock = threading.Lock()

    # -- the Feast store ---------------------------------------------------------------------------------

    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                from feast import FeatureStore  # lazy: Feast takes seconds to import; only feature users pay
                from feast.repo_config import RepoConfig  # lazy: as above

                self.folder.mkdir(parents=True, exist_ok=True)
                config = self.repo_config()
                # The same configuration for Feast's own tools: `feast -c <home>/features serve` runs its feature
                # server over this registry and online store (when other services read features over HTTP).
                (self.folder / "feature_store.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
                self._store = FeatureStore(config=RepoConfig(repo_path=str(self.folder), **config))
            return self._store

    def repo_config(self) -> dict[str, Any]:
        s = self.settings
        return {"project": "keel", "provider": "local", "registry": s.registry or str(self.folder / "registry.db"),
                "online_store": s.online_store or {"type": "sqlite", "path": str(self.folder / "online.db")},
                "offline_store": s.offline_store or {"type": "file"}, "entity_key_serialization_version": 3}

    def _definitions(self) -> list:
        from lifecycle.features.definitions import definitions  # lazy: imports Feast

        return definitions(self.data, ttl_days=self.settings.ttl_days)

    # -- writes ------------------------------------------------------------------------------------------

    def apply(self, *, now: float | None = None) -> dict[str, Any]:
        """Export the current rows and register the definitions (idempotent: the same code applies no change)."""
        exported = self._export(now)
        self.store.apply(self._definitions())
        return {"exported": exported, "views": self.views()}

    def materialize(self, *, now: float | None = None) -> dict[str, Any]:
        """Export this moment's rows and load every view's newest values into the online store."""
        from datetime import UTC, datetime

        now = time.time() if now is None else now
        self._views()  # applied first, or a clear 404
        exported = self._export(now)
        t0 = time.perf_counter()
        self.store.materialize_incremental(end_date=datetime.fromtimestamp(now, UTC))
        return {"exported": exported, "at": now, "seconds": round(time.perf_counter() - t0, 3), "views": self.views()}

    def _export(self, now: float | None) -> dict[str, int]:
        return export(self.data, self.sources, max_records=self.settings.max_records,
                      now=time.time() if now is None else now)

    # -- reads -------------------------------------------------------------------------------------------

    def _views(self) -> dict[str, Any]:
        views = {v.name: v for v in self.store.list_feature_views()}
        if not views:
            raise NotFound("no feature views are registered here: run `keel features apply` first",
                           code="features_not_applied")
        return views

    def views(self) -> list[dict[str, Any]]:
        """The registered views: features, entities and a version (the hash of the view's definition)."""
        return [{"name": v.name, "entities": list(v.entities), "features": [f.name for f in v.features],
                 "version": view_version(v), "ttl_s": v.ttl.total_seconds() if v.ttl else None,
                 "description": v.description} for v in self._views().values()]

    def check(self, refs: Sequence[str], views: Mapping[str, Any] | None = None) -> dict[str, str]:
        """``refs`` -> the entity each needs; unknown views or features are a 400 naming what exists. ``views``:
        the registered views when the caller has read them already."""
        views = self._views() if views is None else views
        out = {}
        for ref in refs:
            view, feature = parse_ref(ref)
            if view not in views or feature not in {f.name for f in views[view].features}:
                known = ", ".join(f"{v}:{f.name}" for v in views for f in views[v].features)
                raise InvalidRequest(f"unknown feature {ref!r}; known: {known}", param="features",
                                     code="unknown_feature")
            out[ref] = views[view].entities[0]
        return out

    def online(self, refs: Sequence[str], keys: Mapping[str, str]) -> dict[str, Any]:
        """The newest value of each feature for one entity of each kind (``{"user": key_id}``); a value nobody
        materialized is None. Returns ``{"values": {ref: value}, "versions": {view: version}}``."""
        views = self._views()  # once per lookup: this is on the prompt-render path
        entities = self.check(refs, views)
        missing = sorted({e for e in entities.values() if e not in keys})
        if missing:
            raise InvalidRequest(f"these features need the key of: {', '.join(missing)}", param="entities")
        row = {ENTITY_KEYS[e]: str(keys[e]) for e in set(entities.values())}
        result = self.store.get_online_features(features=list(refs), entity_rows=[row]).to_dict()
        values = {ref: _plain(result.get(parse_ref(ref)[1], [None])[0]) for ref in refs}
        return {"values": values, "versions": {v: view_version(views[v]) for v in {parse_ref(r)[0] for r in refs}}}

    def historical(self, refs: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Point-in-time join: each row (its entity keys and an ``event_timestamp``) with the values as they were
        at that time."""
        import pandas as pd  # lazy: only historical joins need pandas here

        entities = self.check(refs)
        if not rows:
            raise InvalidRequest("give at least one row (entity keys and event_timestamp)", param="rows")
        frame = pd.DataFrame([dict(r) for r in rows])
        needed = {ENTITY_KEYS[e] for e in entities.values()} | {"event_timestamp"}
        if not needed <= set(frame.columns):
            raise InvalidRequest(f"each row needs {', '.join(sorted(needed))}", param="rows")
        try:
            ts = frame["event_timestamp"]
            numeric = pd.api.types.is_numeric_dtype(ts)  # unix seconds; otherwise ISO 8601 text
            frame["event_timestamp"] = pd.to_datetime(ts, utc=True, unit="s" if numeric else None)
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(f"event_timestamp: {exc}", param="rows") from None
        frame["_row"] = range(len(frame))
        joined = self.store.get_historical_features(entity_df=frame, features=list(refs)).to_df()
        found = {int(r["_row"]): r for r in joined.to_dict(orient="records")}
        names = [parse_ref(ref)[1] for ref in refs]
        out = []
        for i, row in enumerate(frame.drop(columns="_row").to_dict(orient="records")):
            # a row with no value at its time yet is kept, its features None: one output row per input row
            values = found.get(i, {})
            out.append({**{k: _plain(v) for k, v in row.items()}, "event_timestamp": row["event_timestamp"].isoformat(),
                        **{n: _plain(values.get(n)) for n in names}})
        return out


def view_version(view: Any) -> str:
    """What a served value was computed under: the view's definition (name, entities, typed features, ttl), hashed;
    the same definition has the same version on every machine (its source's path is left out)."""
    doc = {"name": view.name, "entities": sorted(view.entities),
           "ttl_s": view.ttl.total_seconds() if view.ttl else None,
           "features": sorted((f.name, str(f.dtype)) for f in view.features)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """numpy and pandas scalars as JSON values (NaN -> None)."""
    if value is None:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value
