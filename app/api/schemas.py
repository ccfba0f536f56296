"""OpenAI-compatible wire models: the contract of /v1/chat/completions and /v1/models."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.errors import InvalidRequest
from app.core.types import ChatMessage, GenerationParams, ResponseFormat


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_domain(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=content or "")


class StreamOptions(_Wire):
    include_usage: bool = False


class JsonSchemaSpec(_Wire):
    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormatIn(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class PromptIn(_Wire):
    """Keel extension: render a registry template (``name``, ``name@7``, ``name@label``) in front of
    ``messages``. OpenAI clients send it with ``extra_body={"prompt": {...}}``."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=200)
    variables: dict[str, Any] = Field(default_factory=dict)


class RagIn(_Wire):
    """Keel extension: answer from a document collection, citing passages (``extra_body={"rag": ...}``;
    or use the model alias ``rag:<collection>``)."""

    model_config = ConfigDict(extra="forbid")

    collection: str = Field(min_length=1, max_length=64)
    top_k: int | None = Field(default=None, ge=1, le=50, description=(
        "Passages given to the model: chunks (one document can give several), or documents with "
        "group_by='document'. Default: rag.retrieval.top_k."))
    filters: dict[str, Any] | None = None
    prompt: str = Field(default="rag-answer", description="Registry template that frames the passages.")
    group_by: Literal["document"] | None = Field(default=None, description=(
        "'document': at most one passage per document, its best chunk, so top_k counts documents."))


class PromptInfo(_Wire):
    ref: str
    hash: str


class ReleaseInfo(_Wire):
    """Keel: the release endpoint that routed the request and the variant that answered it."""

    name: str
    variant: str


class ChatCompletionRequest(_Wire):
    """Fields Keel does not implement are rejected with a 400 rather than silently dropped."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, min_length=1, description="Optional only when a prompt names one.")
    messages: list[Message] = Field(default_factory=list, max_length=10_000)
    prompt: PromptIn | None = None
    rag: RagIn | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    response_format: ResponseFormatIn | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logprobs: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def params(self) -> GenerationParams:
        fmt = None
        if self.response_format is not None and self.response_format.type != "text":
            spec = self.response_format.json_schema
            if self.response_format.type == "json_schema" and spec is None:
                raise InvalidRequest(
                    "response_format.type 'json_schema' needs response_format.json_schema.schema",
                    param="response_format",
                )
            fmt = ResponseFormat(
                type=self.response_format.type,
                schema=spec.schema_ if spec else None,
                name=spec.name if spec else "response",
                strict=bool(spec.strict) if spec and spec.strict is not None else True,
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return GenerationParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=stop,
            seed=self.seed,
            n=self.n,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            response_format=fmt,
        )


class UsageOut(_Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Wire):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class Choice(_Wire):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(_Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None
    prompt: PromptInfo | None = Field(default=None, description="Keel: the prompt version used.")
    release: ReleaseInfo | None = Field(default=None, description="Keel: the release and variant that answered.")
    citations: list[dict[str, Any]] | None = Field(
        default=None, description="Keel, grounded answers: the passages given to the model, numbered as cited."
    )
    guardrails: str | None = Field(default=None, description="Keel: the guardrail policy@version applied.")
    guardrail_events: list[dict[str, Any]] | None = Field(
        default=None, description="Keel: redactions, retractions or a blocked input, as in the stream's events."
    )


class Delta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Wire):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Wire):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    prompt: PromptInfo | None = None
    release: ReleaseInfo | None = None
    citations: list[dict[str, Any]] | None = None
    guardrails: str | None = None
    guardrail: dict[str, Any] | None = None


class ModelCard(_Wire):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "keel"
    description: str = ""


class ModelList(_Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(_Wire):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(_Wire):
    error: ErrorDetail
