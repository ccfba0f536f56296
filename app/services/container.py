"""The application's long-lived objects, built once in the API lifespan (or a CLI command)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from app.core.metrics import Metrics
from app.core.settings import Settings
from app.llm.base import LLMBackend
from app.llm.router import ModelRouter
from app.security.keys import KeyStore
from app.security.ratelimit import RateLimiter
from app.services.chat import ChatService
from prompts.registry import PromptRegistry, build_registry

log = logging.getLogger("keel")


@dataclass
class Container:
    settings: Settings
    metrics: Metrics
    keys: KeyStore
    rate_limiter: RateLimiter
    llm: ModelRouter
    chat: ChatService
    prompts: PromptRegistry
    _closers: list = field(default_factory=list)

    @classmethod
    async def build(
        cls, settings: Settings, *, backends: dict[str, LLMBackend] | None = None, start_backends: bool = True
    ) -> Container:
        """``backends`` replaces the configured backend of the same name (tests, embedding Keel)."""
        settings.home.mkdir(parents=True, exist_ok=True)
        metrics = Metrics()
        keys = KeyStore(settings.db_path)
        prompts = build_registry(settings)
        llm = ModelRouter(settings, metrics, backends)
        if start_backends:
            await llm.start()
        chat = ChatService(settings, llm, metrics, prompts)
        return cls(settings, metrics, keys, RateLimiter(), llm, chat, prompts)

    async def aclose(self) -> None:
        for close in reversed(self._closers):
            await close()
        await self.llm.aclose()
        self.prompts.close()
        self.keys.close()
