"""The one protocol every inference backend implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from app.core.types import GenerationRequest, LLMEvent


@runtime_checkable
class LLMBackend(Protocol):
    """An inference engine.

    ``stream`` yields :class:`TextDelta` events as tokens arrive, one
    :class:`Finished` per choice, and a final :class:`Usage`. Closing the
    iterator early (client gone) must abort the work upstream. Errors are
    :class:`app.core.errors.KeelError` subclasses; a :class:`BackendUnavailable`
    raised before the first event means nothing was generated and the call may
    be retried or sent elsewhere.
    """

    name: str

    def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]: ...

    async def models(self) -> list[str]:
        """Model names this backend serves right now."""
        ...

    async def ready(self) -> bool:
        """True when a request sent now would be served."""
        ...

    async def start(self) -> None:
        """Warm up: load weights or start the server. Must be cheap to call twice."""
        ...

    async def aclose(self) -> None: ...
