"""Test doubles of the API key store and the rate limiter (app.security's protocols) for route tests."""

from __future__ import annotations

from collections.abc import Mapping

from app.security.keys import ApiKey


class FakeKeys:
    """Keys by their raw value."""

    def __init__(self, keys: Mapping[str, ApiKey]) -> None:
        self.keys = keys

    def verify(self, raw: str) -> ApiKey | None:
        return self.keys.get(raw)

    async def averify(self, raw: str) -> ApiKey | None:
        return self.verify(raw)

    def get(self, key_id: str) -> ApiKey | None:
        return next((k for k in self.keys.values() if k.id == key_id), None)


class NoLimit:
    """Every request allowed."""

    def check(self, key_id: str, limit: int) -> None:
        return None

    async def acheck(self, key_id: str, limit: int) -> None:
        return None

    def check_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        return None

    async def acheck_tokens(self, key_id: str, tokens_per_minute: int) -> None:
        return None

    def spend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        return None

    async def aspend_tokens(self, key_id: str, tokens_per_minute: int, tokens: int) -> None:
        return None
