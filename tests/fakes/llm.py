"""A scripted in-memory LLM backend for unit tests (the real ones run in the integration suite)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.core.errors import BackendUnavailable, KeelError
from app.core.types import Finished, GenerationRequest, LLMEvent, TextDelta, TokenLogprobs, ToolCallDelta, Usage


@dataclass
class ScriptedBackend:
    """Answers every request with ``reply`` split into words.

    ``fail_connect`` makes the next N calls fail before the first token (like a refused
    connection); ``fail_after`` raises ``error`` after that many tokens.
    """

    name: str = "fake"
    reply: str = "The capital of France is Paris."
    served: list[str] = field(default_factory=lambda: ["fake-model"])
    fail_connect: int = 0
    fail_after: int | None = None
    error: KeelError | None = None
    delay_s: float = 0.0
    calls: int = 0
    closed_early: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)
    is_ready: bool = True
    #: answers for the next calls, in order, before ``reply`` takes over
    replies: list[str] = field(default_factory=list)
    #: (function name, arguments JSON): what a request that may call tools gets instead of ``reply``, streamed
    #: as OpenAI does (id and name first, then the arguments in pieces)
    call: tuple[str, str] | None = None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[LLMEvent]:
        self.calls += 1
        self.requests.append(request)
        if self.fail_connect > 0:
            self.fail_connect -= 1
            raise BackendUnavailable(f"{self.name} refused the connection")
        if self.call is not None and request.params.calls_tools:
            name, args = self.call
            choice = request.params.tool_choice
            name = choice.name if choice is not None and choice.mode == "function" else name
            for index in range(request.params.n):
                yield ToolCallDelta(0, f"call_{self.calls}_{index}", name, "", index)
                half = len(args) // 2
                yield ToolCallDelta(0, None, None, args[:half], index)
                yield ToolCallDelta(0, None, None, args[half:], index)
                yield Finished("tool_calls", index)
            yield Usage(prompt_tokens=sum(len(m.content.split()) for m in request.messages), completion_tokens=9)
            return
        words = (self.replies.pop(0) if self.replies else self.reply).split(" ")
        limit = request.params.max_tokens or len(words)
        sent = 0
        finished = False
        try:
            for index in range(request.params.n):
                for i, word in enumerate(words[:limit]):
                    if self.fail_after is not None and sent >= self.fail_after:
                        raise self.error or KeelError("scripted failure")
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    yield TextDelta(word if i == 0 else " " + word, index)
                    if request.params.logprobs:  # a made-up but well-formed entry per word
                        token = word if i == 0 else " " + word
                        yield TokenLogprobs(({"token": token, "logprob": -0.5, "bytes": list(token.encode()),
                                              "top_logprobs": []},), index)
                    sent += 1
                yield Finished("length" if limit < len(words) else "stop", index)
            yield Usage(prompt_tokens=sum(len(m.content.split()) for m in request.messages), completion_tokens=sent)
            finished = True
        finally:
            if not finished:
                self.closed_early += 1

    async def models(self) -> list[str]:
        return list(self.served)

    async def ready(self) -> bool:
        return self.is_ready

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
