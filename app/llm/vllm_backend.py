"""vLLM backend: an OpenAI-compatible client, plus the supervised server when Keel runs it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

from opentelemetry.trace import TracerProvider

from app.core.errors import BackendUnavailable
from app.core.metrics import Metrics
from app.core.settings import BackendSettings
from app.core.types import GenerationRequest, LLMEvent
from app.llm.openai_backend import OpenAIBackend
from app.llm.vllm_server import VLLMSupervisor


class VLLMBackend(OpenAIBackend):
    def __init__(self, name: str, settings: BackendSettings, log_dir: Path, on_restart=None, *,
                 metrics: Metrics | None = None, tracer_provider: TracerProvider | None = None) -> None:
        managed = settings.managed if settings.base_url is None else None
        base_url = settings.base_url or f"http://{managed.host}:{managed.port}/v1"
        super().__init__(name, settings, base_url, metrics=metrics, tracer_provider=tracer_provider)
        self.supervisor = (
            VLLMSupervisor(name, managed, log_dir / f"vllm-{name}.log", on_restart=on_restart,
                           fixed_key=settings.api_key.get_secret_value() if settings.api_key else None)
            if managed is not None else None
        )

    def api_key(self) -> str | None:
        # A server Keel runs accepts only the key it was started with (the configured one, else a random one).
        if self.supervisor is not None:
            return self.supervisor.api_key
        return super().api_key()

    async def start(self) -> None:
        await super().start()
        if self.supervisor is not None:
            await self.supervisor.start()

    async def aclose(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        await super().aclose()

    async def ready(self) -> bool:
        if self.supervisor is not None and self.supervisor.state != "ready":
            return False
        return await super().ready()

    def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        sup = self.supervisor
        if sup is not None and sup.state != "ready":
            # Fail fast with the reason instead of waiting out connection retries.
            detail = f": {sup.last_error}" if sup.last_error and sup.state == "failed" else ""
            raise BackendUnavailable(f"vLLM server {self.name!r} is {sup.state}{detail}; retry shortly")
        return super().stream(request)
