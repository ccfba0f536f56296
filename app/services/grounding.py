"""Grounded answers: retrieve passages, render the RAG prompt around them, cite them back."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from app.core.errors import InvalidRequest
from app.core.types import ChatMessage, Finished, TextDelta, Usage
from app.guardrails.validators.base import ABBREVIATION_END, TextEmbedder, split_sentences
from app.guardrails.validators.groundedness import SupportIndex, abstains, is_claim

if TYPE_CHECKING:
    from ingest.factory import RagServices
    from ingest.retriever import RetrievedChunk
    from ingest.settings import GroupBy
    from prompts.registry import PromptRegistry, RenderedPrompt

log = logging.getLogger("keel.rag")
E = TypeVar("E")  # a chat stream's events: only text and finish events are read here

RAG_PREFIX = "rag:"
_ANY_CITE = re.compile(r"\[\s*\d{1,3}(?:\s*[,;-]\s*\d{1,3})*\s*\]")
# a sentence ends at . ! or ? (closing quotes or brackets may follow) before whitespace, except after an
# abbreviation or an initial ("e.g.", "Dr.", "J. Smith")
_END = re.compile(r"[.!?][\"'\u201d\u2019)]*(?:\[\d[\d\s,;-]*\])*$")

#: The answer when retrieval found nothing (the rag-answer prompt asks the model for the same words when its
#: passages do not answer the question)
NOT_IN_SOURCES = "I don't know based on the provided documents."

#: What a grounded answer turned out to be: answered from the passages, "the sources do not answer this"
#: (the model said so, or retrieval found nothing), or withdrawn by the groundedness guard.
Outcome = Literal["answered", "not_in_sources", "withdrawn"]


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
    #: retrieved, but left out of the prompt by the screen (passages carrying instructions for the model)
    dropped: list[RetrievedChunk] = field(default_factory=list)


#: Given the retrieved passages' texts, the indexes of those to leave out of the prompt.
Screen = Callable[[list[str]], Awaitable[list[int]]]


def words_within(max_tokens: int) -> int:
    """Words an answer may ask for within ``max_tokens``: English runs ~1.3 tokens a word in these
    tokenizers, and citation markers ([1]) cost three more each; 0.6 leaves that margin."""
    return max(5, int(max_tokens * 0.6))


def cited_markers(text: str) -> set[int]:
    """Passage numbers in any marker form the groundedness check accepts: [1], [1, 3], [2-4]."""
    out: set[int] = set()
    for m in _ANY_CITE.finditer(text):
        nums = [int(n) for n in re.findall(r"\d+", m.group(0))]
        if "-" in m.group(0) and len(nums) == 2 and 0 <= nums[1] - nums[0] <= 20:
            out.update(range(nums[0], nums[1] + 1))
        else:
            out.update(nums)
    return out


def outcome_of(answer: str, *, withdrawn: bool, passages: int) -> Outcome:
    if withdrawn:
        return "withdrawn"
    sentences = split_sentences(_ANY_CITE.sub("", answer))
    if not passages or (abstains(answer) and not any(is_claim(s) for s in sentences)):
        return "not_in_sources"
    return "answered"


def withdrawal_message(base: str, chunks: list[RetrievedChunk], *, most: int = 3) -> str:
    """The guard's refusal, then what the sources do hold: the best passages' titles and sources, one per
    document, numbered as in the citations event, so the user has somewhere to read on."""
    seen: set[str] = set()
    items = []
    for n, chunk in enumerate(chunks, start=1):
        c = chunk.citation
        if c.doc_id in seen:
            continue
        seen.add(c.doc_id)
        # the file's name, not where the server keeps it: this text goes into the answer and its history
        name = PurePosixPath(c.source).name if c.source else ""
        where = f" ({name})" if name and name != c.title else ""
        items.append(f"[{n}] {c.label()}{where}")
        if len(items) == most:
            break
    if not items:
        return base
    return f"{base} The sources that came closest: " + "; ".join(items) + "."


async def said(text: str, n: int = 1) -> AsyncIterator[TextDelta | Finished | Usage]:
    """An answer Keel gives without the model, as every one of ``n`` choices; no token was used."""
    for i in range(n):
        yield TextDelta(text, i)
        yield Finished("stop", i)
    yield Usage(0, 0)


@dataclass
class Attribution:
    """Counts of what :func:`attribute` did to one answer."""

    sentences: int = 0
    model_cited: int = 0
    attributed: int = 0

    def reset(self) -> None:
        """A re-asked answer replaces the first: count only what the delivered one got."""
        self.sentences = self.model_cited = self.attributed = 0


async def attribute(events: AsyncIterator[E], passages: Sequence[str], embedder: TextEmbedder, *,
                    question: str | None = None, stats: Attribution | None = None) -> AsyncIterator[E | TextDelta]:
    """Cite as the answer streams: a sentence of choice 0 that ends without a citation marker gets ``[n]`` for
    the passage that supports it (the groundedness check's own measure, so a marker never points at a passage
    the guard would not accept), right after its final punctuation. Small models often ignore the prompt's
    citation rules; a sentence no passage supports gets no marker. Runs before the output guard, so markers
    are part of what it checks and of what a retraction withdraws. Nothing is held back but the whitespace
    after a sentence end, until the next character shows whether the model cites the sentence itself."""
    if not passages:
        async for ev in events:
            yield ev
        return
    cite = _Citer(passages, embedder, question, stats if stats is not None else Attribution())
    try:
        async for ev in events:
            if isinstance(ev, TextDelta) and ev.index == 0:
                piece = await cite.feed(ev.text)
                if piece:
                    yield TextDelta(piece, 0)
                continue
            if isinstance(ev, Finished) and ev.index == 0:
                # a sentence cut off by the token limit is no claim to cite
                piece = await cite.finish(cut=ev.reason == "length")
                if piece:
                    yield TextDelta(piece, 0)
            yield ev
    finally:
        cite.close()


class _Citer:
    def __init__(self, passages: Sequence[str], embedder: TextEmbedder, question: str | None,
                 stats: Attribution) -> None:
        # the passages' windows are embedded while the model reads the prompt, not at the first sentence end
        self.index = asyncio.ensure_future(asyncio.to_thread(SupportIndex, list(passages), embedder,
                                                             question=question))
        self.stats = stats
        self.sentence = ""  # the current sentence, as released so far
        self.ended = ""  # a sentence that ended; its marker is decided at the next non-space character
        self.held = ""  # the whitespace after it (and a "[" that may open the model's own marker)
        self.in_marker = False  # inside the model's own "[n]" after a sentence end
        self.after_marker = False  # right after it
        self.in_code = False  # inside `code` or a ``` block: no sentence ends there, no marker goes in

    async def marker(self, text: str) -> str:
        self.stats.sentences += 1
        if _ANY_CITE.search(text):
            self.stats.model_cited += 1
            return ""
        if not is_claim(text):
            return ""
        try:
            index = await self.index
            support = (await asyncio.to_thread(index.support, [text]))[0]
        except Exception as e:  # attribution is a courtesy: an embedder failure must not break the answer
            log.warning("citation attribution off for this answer: %s: %s", type(e).__name__, e)
            return ""
        if not support.supported or support.best_passage < 0:
            return ""
        self.stats.attributed += 1
        return f"[{support.best_passage + 1}]"

    async def feed(self, text: str) -> str:
        out: list[str] = []
        for ch in text:
            if self.in_marker:
                out.append(ch)
                self.in_marker = ch != "]"
                self.after_marker = not self.in_marker
                continue
            if self.after_marker:  # "[1][2]": a second marker right after the first belongs to the same sentence
                self.after_marker = False
                if ch == "[":
                    out.append(ch)
                    self.in_marker = True
                    continue
            if self.ended:
                if ch.isspace() and not self.held.endswith("["):
                    self.held += ch
                    continue
                if ch == "[" and not self.held.endswith("["):
                    self.held += ch  # a marker of the model's own, or a bracket: the next character tells
                    continue
                if self.held.endswith("[") and ch.isdigit():  # the model cites the sentence itself
                    self.stats.sentences += 1
                    self.stats.model_cited += 1
                    out.append(self.held + ch)
                    self.in_marker = True
                    self.sentence = ""
                else:
                    out.append(await self.marker(self.ended) + self.held + ch)
                    self.sentence = ("[" if self.held.endswith("[") else "") + ch
                    self.in_code = ch == "`"
                self.ended = self.held = ""
                continue
            if ch == "`":
                self.in_code = not self.in_code
            elif (ch.isspace() and not self.in_code and _END.search(self.sentence)
                  and not ABBREVIATION_END.search(self.sentence)):
                self.ended, self.held, self.sentence = self.sentence.strip(), ch, ""
                continue
            self.sentence += ch
            out.append(ch)
        return "".join(out)

    async def finish(self, cut: bool = False) -> str:
        if self.ended:
            piece = await self.marker(self.ended) + self.held
        elif self.sentence.strip() and not cut and not self.in_code:
            piece = await self.marker(self.sentence.strip())
        else:
            piece = ""
        self.sentence = self.ended = self.held = ""
        return piece

    def close(self) -> None:
        self.index.cancel()
        # a failure of the index build is reported by marker(), or not at all when no sentence asked for it
        self.index.add_done_callback(lambda f: f.cancelled() or f.exception())


def citations(chunks: list[RetrievedChunk], answer: str) -> list[dict[str, Any]]:
    """The wire form of the passages given to the model, numbered as in the prompt, with whether
    the answer actually cited each one."""
    cited = cited_markers(answer)
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

    async def ground(self, messages: tuple[ChatMessage, ...], use: RagUse, max_tokens: int | None = None,
                     screen: Screen | None = None) -> Grounded:
        """``max_tokens``: the request's own budget, if it set one (else the template's applies). ``screen``: which
        retrieved passages to leave out of the prompt (the guardrails' indirect-injection check)."""
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
        chunks, dropped = list(result.chunks), []
        if screen is not None and chunks:
            out = set(await screen([c.text for c in chunks]))
            chunks, dropped = [c for i, c in enumerate(chunks) if i not in out], [chunks[i] for i in sorted(out)]
        passages = [{"text": c.text, "title": c.citation.label()} for c in chunks]
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
        return Grounded(tuple(system + history + turns), rendered, chunks, dropped)

