"""Where stored responses live (``POST /v1/responses`` with ``store``, the default): ``<home>/responses.db``, or
the shared Postgres (``database_url``), so a ``previous_response_id`` made through one API process goes on through any.

A response is kept as its OpenAI ``Response`` object plus the conversation it ends, as Responses API items (the
earlier turns, this request's input and its output), so a request naming it as ``previous_response_id`` goes on
from there without the client sending the history again. Only the key that created a response reads, continues
or deletes it. The schema is Alembic's (``app/services/response_migrations``, version table
``alembic_version_responses``), brought to head on open.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.db import open_store_file
from app.core.migrate import Migrations

MIGRATIONS = Migrations(Path(__file__).with_name("response_migrations"), "alembic_version_responses",
                        pg_lock_key=0x6B65656C_7273)  # "keelrs"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    id: str
    owner: str
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # Responses API items, oldest first, this response's output last


class ResponseStore:
    def __init__(self, home: Path, *, url: Any = None) -> None:
        """``url``: the shared Postgres (a ``SecretStr``), else ``<home>/responses.db``."""
        self._file = open_store_file(url, Path(home) / "responses.db", MIGRATIONS, what="the response store",
                                     setting="database_url", name="keel-responses",
                                     filled_by=None)

    def put(self, stored: StoredResponse) -> None:
        r = stored.response
        with self._file.tx() as db:
            db.execute("INSERT INTO responses (id, owner, created_at, previous_id, conversation, response) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (stored.id, stored.owner, int(r.get("created_at") or 0), r.get("previous_response_id"),
                        _dump(stored.conversation), _dump(r)))

    def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response, if ``owner`` created it (another key's response is as absent as an unknown one)."""
        rows = self._file.read("SELECT response, conversation FROM responses WHERE id = ? AND owner = ?",
                               (response_id, owner))
        return StoredResponse(response_id, owner, json.loads(rows[0][0]), json.loads(rows[0][1])) if rows else None

    def delete(self, response_id: str, owner: str) -> bool:
        with self._file.tx() as db:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0

    def close(self) -> None:
        self._file.close()


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
