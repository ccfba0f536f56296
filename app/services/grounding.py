"""Grounded answers: retrieve passages, render the RAG prompt around them, cite them back."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.core.errors import InvalidRequest
from app.core.types import ChatMessage

if TYPE_CHECKING:
    from ingest.factory import RagServices
    from ingest.retriever import RetrievedChunk
    from ingest.settings import GroupBy
    from prompts.registry import PromptRegistry, RenderedPrompt

RAG_PREFIX = "rag:"
_CITE = re.compile(r"\[(\d{1,3})\]")


@dataclass(frozen=True, slots=True)
class RagUse:
    """Answer from a collection. Comes from a ``rag:<collection>`` model alias or the ``rag`` field."""

    collection: str
    top_k: int | None = None
    filters: dict[str, Any] | None = None
    prompt_ref: str = "rag-answer"
    #: "document": one passage (the best chunk) per document, so top_k counts documents.
    group_by: GroupBy | None = None


@dataclass(frozen=True, slots=True)
class Grounded:
    messages: tuple[ChatMessage, ...]
    rendered: RenderedPrompt
    chunks: list[RetrievedChunk] = field(default_factory=list)


def words_within(max_tokens: int) -> int:
    """Words an answer may ask for within ``max_tokens``: English runs ~1.3 tokens a word in these
    tokenizers, and citation markers ([1]) cost three more each; 0.6 leaves that margin."""
    return max(5, int(max_tokens * 0.6))


def cited_numbers(text: str) -> set[int]:
    """Passage numbers the answer cites as ``[n]``."""
    return {int(n) for n in _CITE.findall(text)}


def citations(chunks: list[RetrievedChunk], answer: str) -> list[dict[str, Any]]:
    """The wire form of the passages given to the model, numbered as in the prompt, with whether
    the answer actually cited each one."""
    cited = cited_numbers(answer)
    out = []
    for n, chunk in enumerate(chunks, start=1):
        c = chunk.citation
        out.append({
            "index": n, "cited": n in cited, "score": round(chunk.score, 6),
            "source": c.source, "title": c.title, "heading_path": c.heading_path, "label": c.label(),
            "page": c.page, "char_start": c.char_start, "char_end": c.char_end,
            "doc_id": c.doc_id, "chunk_id": c.chunk_id, "snapshot_id": c.snapshot_id, "text": chunk.text,
        })
    return out


class Grounder:
    def __init__(self, rag: RagServices, prompts: PromptRegistry) -> None:
        self.rag = rag
        self.prompts = prompts

    async def ground(self, messages: tuple[ChatMessage, ...], use: RagUse, max_tokens: int | None = None
                     ) -> Grounded:
        """``max_tokens``: the request's own budget, if it set one (else the template's applies)."""
        question_at = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
        if question_at is None or not messages[question_at].content.strip():
            raise InvalidRequest("a grounded (rag) request needs a user message with the question", param="messages")
        question = messages[question_at].content
        # Embedding the query is CPU work: keep it off the event loop.
        result = await asyncio.to_thread(
            self.rag.retriever.retrieve, question, collection=use.collection, top_k=use.top_k,
            filters=use.filters or None,  # validated by the store (InvalidFilter is a 400)
            group_by=use.group_by,
        )
        passages = [{"text": c.text, "title": c.citation.label()} for c in result.chunks]
        variables: dict[str, Any] = {"question": question, "passages": passages}
        content = self.prompts.compiled(use.prompt_ref).version.content
        words = next((v for v in content.variables if v.name == "max_words"), None)
        budget = max_tokens or content.params.max_tokens
        if words is not None and budget:
            # The length the prompt asks for must fit the token budget, or answers stop mid-sentence.
            variables["max_words"] = min(words.default or budget, words_within(budget))
        rendered = self.prompts.render(use.prompt_ref, variables)
        system = [ChatMessage(m.role, m.content) for m in rendered.messages if m.role == "system"]
        turns = [ChatMessage(m.role, m.content) for m in rendered.messages if m.role != "system"]
        # Earlier turns stay in place so follow-up questions keep their context.
        history = [m for i, m in enumerate(messages) if i != question_at and m.role != "system"]
        return Grounded(tuple(system + history + turns), rendered, result.chunks)

