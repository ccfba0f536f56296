"""Keel's feature definitions, as code (Feast objects): what is known about a user (an API key) and a document.

Every value is derived from Keel's own stores by :mod:`lifecycle.features.export` into the Parquet files these
sources read; ``keel features apply`` registers them, ``materialize`` loads the latest values into the online
store. Entity keys come from the server's side only: a user is the API key that made the request (never a field
of the request body), a document is the id ingest gave it.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float32, Int64

from lifecycle.features.export import DOCUMENT_SOURCE, USER_SOURCE


def definitions(data: Path, *, ttl_days: float = 30.0) -> list:
    ttl = timedelta(days=ttl_days)
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
                  description="A caller: the API key id that made the request.")
    document = Entity(name="document", join_keys=["doc_id"], value_type=ValueType.STRING,
                      description="An ingested document (its ingest doc_id).")
    users = FileSource(name="user_stats_source", path=str(data / USER_SOURCE), timestamp_field="event_timestamp")
    documents = FileSource(name="document_stats_source", path=str(data / DOCUMENT_SOURCE),
                           timestamp_field="event_timestamp")
    return [
        user, document, users, documents,
        FeatureView(
            name="user_stats", entities=[user], ttl=ttl, source=users, online=True,
            description="A caller's activity and how it rates answers (from lineage and feedback).",
            schema=[Field(name="requests_30d", dtype=Int64, description="Chat answers in the last 30 days."),
                    Field(name="ratings", dtype=Int64, description="Answers it rated, ever."),
                    Field(name="feedback_rate", dtype=Float32, description="Share of its ratings that are good "
                          "(score >= 0.5); -1 without ratings.")]),
        FeatureView(
            name="document_stats", entities=[document], ttl=ttl, source=documents, online=True,
            description="How current a document is and how often answers use it (from ingest and lineage).",
            schema=[Field(name="freshness_days", dtype=Float32, description="Days since its current version was "
                          "ingested."),
                    Field(name="retrievals_30d", dtype=Int64, description="Answers it was retrieved for, 30 days."),
                    Field(name="citations_30d", dtype=Int64, description="Answers that cited it, 30 days.")]),
    ]
