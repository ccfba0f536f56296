"""OpenAI-compatible wire models: the contract of /v1/chat/completions, /v1/embeddings and /v1/models."""

from __future__ import annotations

import time
from typing import Annotated, Any, ClassVar, Literal

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from app.core.errors import InvalidRequest
from app.core.types import ChatMessage, GenerationParams, ResponseFormat, ToolCall, ToolChoice, ToolSpec

#: The largest integer a SQLite INTEGER (and a Postgres BIGINT) holds: the bound of every id and offset parameter.
SQL_INT_MAX = 2**63 - 1


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Out(_Wire):
    """A response object whose ``_required`` fields the OpenAI spec marks required: always in the JSON, ``null``
    when unset, even where the route drops the other unset (Keel's optional) fields with ``exclude_none``; and
    listed as required in the published schema."""

    _required: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _keep_required(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self._required:
                if name not in data:
                    data[name] = None
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        required = target.setdefault("required", [])
        required += [n for n in cls._required if n not in required]
        return schema


class TextPart(_Wire):
    type: Literal["text"]
    text: str


_FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCallIn(_Wire):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(default="", description="The arguments the model wrote, as JSON text.")


class ToolCallIn(_Wire):
    """A call an earlier assistant turn made (sent back with the history, before the tool's result)."""

    id: str = Field(min_length=1, max_length=200)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class Message(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, max_length=128, description=(
        "assistant: the function calls it made."))
    tool_call_id: str | None = Field(default=None, max_length=200, description=(
        "tool: the id of the call this message answers."))

    def to_domain(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = "system" if self.role == "developer" else self.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return ChatMessage(role=role, content=content or "", tool_calls=calls, tool_call_id=self.tool_call_id)


def check_tool_turns(messages: list[Message]) -> None:
    """The history's function calls hang together as OpenAI requires: only assistant turns call, and every tool
    turn answers a call made before it."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest(f"messages[{i}] is a {m.role} message with tool_calls; only assistant messages "
                                 "carry them", param=f"messages[{i}].tool_calls")
        called.update(c.id for c in m.tool_calls or ())
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequest(f"messages[{i}] is a tool message without tool_call_id: give the id of the "
                                     "call it answers", param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in called:
                raise InvalidRequest(f"messages[{i}] answers tool call {m.tool_call_id!r}, which no earlier "
                                     "assistant message made", param=f"messages[{i}].tool_call_id")


class FunctionDef(_Wire):
    name: str = Field(pattern=_FUNCTION_NAME, description="Letters, digits, '_' and '-', at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON Schema of the arguments.")
    strict: bool | None = None


class ToolIn(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: str = Field(min_length=1)


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


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


class GroundingInfo(_Wire):
    """Keel, grounded answers: what the answer turned out to be."""

    outcome: Literal["answered", "not_in_sources", "withdrawn"] = Field(
        description="answered from the passages; not_in_sources: the sources do not answer the question (the "
        "model said so, or nothing was retrieved); withdrawn: the groundedness guard withdrew the answer.")
    attributed: int = Field(default=0, description="Citation markers Keel added to sentences the model left "
                            "uncited, each pointing at the passage that supports the sentence.")


class ReleaseInfo(_Wire):
    """Keel: the release endpoint that routed the request and the variant that answered it."""

    name: str
    variant: str


class ChatCompletionRequest(_Wire):
    """Fields Keel does not implement are rejected with a 400 rather than silently dropped."""

    # allowed so the route can name an unknown parameter in its 400; the document says none is accepted
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

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
    tools: list[ToolIn] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(default=None, description=(
        "auto (the default with tools): the model decides; required: some function; a named function: that one. "
        "required and named calls are guided decoding on vLLM: valid arguments for the schema, any model."))
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = Field(default=None, description=(
        "Return each token's log probability (vLLM backends; refused under a guardrail policy with output "
        "validators, which may redact or withdraw text the log probabilities would still show)."))
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(default=None, description=(
        "Accepted for OpenAI compatibility: Keel has one processing tier, and a response to a request that "
        "names one says 'default'."))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def params(self) -> GenerationParams:
        fmt = response_format(self.response_format)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        tools, choice = self._tools()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return GenerationParams(
            logprobs=bool(self.logprobs),
            top_logprobs=self.top_logprobs,
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=self.parallel_tool_calls,
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


    def _tools(self) -> tuple[tuple[ToolSpec, ...], ToolChoice | None]:
        check_tool_turns(self.messages)
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return tool_params([t.function for t in self.tools or ()], "function", "tools[{i}].function",
                               named=choice.function.name)
        return tool_params([t.function for t in self.tools or ()], choice, "tools[{i}].function")


def response_format(wire: ResponseFormatIn | None, param: str = "response_format") -> ResponseFormat | None:
    """Constrained output as the domain has it (``json_schema`` is guided decoding on vLLM)."""
    if wire is None or wire.type == "text":
        return None
    spec = wire.json_schema
    if wire.type == "json_schema" and spec is None:
        raise InvalidRequest(f"{param}.type 'json_schema' needs a schema", param=param)
    return ResponseFormat(
        type=wire.type,
        schema=spec.schema_ if spec else None,
        name=spec.name if spec else "response",
        strict=bool(spec.strict) if spec and spec.strict is not None else True,
    )


def tool_params(functions: list[FunctionDef], choice: str | None, where: str, named: str | None = None
                ) -> tuple[tuple[ToolSpec, ...], ToolChoice | None]:
    """The functions and the choice, checked (chat completions and responses alike): a schema that is not JSON
    Schema, a duplicate name or a choice naming no given function is a 400 that names the tool. ``choice``: none,
    auto, required, or function (``named``); ``where``: the wire path of function ``i``, for the error's param."""
    specs: list[ToolSpec] = []
    for i, fn in enumerate(functions):
        at = where.format(i=i)
        if any(s.name == fn.name for s in specs):
            raise InvalidRequest(f"tools[{i}]: a second function named {fn.name!r}; names must be unique",
                                 param=f"{at}.name")
        if fn.parameters is not None:
            try:
                validator_for(fn.parameters).check_schema(fn.parameters)
            except SchemaError as exc:
                path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
                raise InvalidRequest(f"tools[{i}] ({fn.name}): parameters is not a valid JSON Schema at {path}: "
                                     f"{exc.message}", param=f"{at}.parameters") from None
        specs.append(ToolSpec(fn.name, fn.description, fn.parameters, fn.strict))
    if choice is None:
        return tuple(specs), None
    if not specs:
        if choice == "none":
            return (), None
        raise InvalidRequest("tool_choice needs tools: give the functions the model may call", param="tool_choice")
    if choice != "function":
        return tuple(specs), ToolChoice(choice)
    if not any(s.name == named for s in specs):
        raise InvalidRequest(f"tool_choice names function {named!r}, which is not in tools "
                             f"({', '.join(s.name for s in specs)})", param="tool_choice")
    return tuple(specs), ToolChoice("function", named)


class UsageOut(_Out):
    _required = ("prompt_tokens", "completion_tokens", "total_tokens")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Out):
    """``refusal`` is OpenAI's field for a model that declines to follow a structured-output schema: Keel's
    models never fill it, so it is always null. A guardrail's refusal is the answer itself (``content``, with
    ``finish_reason: content_filter``), where every chat client shows it."""

    _required = ("role", "content", "refusal")

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class FunctionCallOut(_Out):
    _required = ("name", "arguments")

    name: str
    arguments: str = Field(description="JSON text, as the model wrote it (check it before you call the function).")


class ToolCallOut(_Out):
    _required = ("id", "type", "function")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChoiceLogprobs(_Out):
    _required = ("content", "refusal")

    content: list[dict[str, Any]] | None = None
    refusal: list[dict[str, Any]] | None = None


class Choice(_Out):
    _required = ("index", "message", "finish_reason", "logprobs")

    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = Field(default=None, description="With logprobs: true, each token's.")


class ChatCompletion(_Out):
    _required = ("id", "object", "created", "model", "choices")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageOut | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = Field(default=None, description="'default' when the request named a tier.")
    prompt: PromptInfo | None = Field(default=None, description="Keel: the prompt version used.")
    release: ReleaseInfo | None = Field(default=None, description="Keel: the release and variant that answered.")
    citations: list[dict[str, Any]] | None = Field(
        default=None, description="Keel, grounded answers: the passages given to the model, numbered as cited."
    )
    grounding: GroundingInfo | None = Field(default=None, description="Keel, grounded answers: the outcome.")
    guardrails: str | None = Field(default=None, description="Keel: the guardrail policy@version applied.")
    guardrail_events: list[dict[str, Any]] | None = Field(
        default=None, description="Keel: redactions, retractions or a blocked input, as in the stream's events."
    )


class DeltaFunction(_Wire):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Wire):
    """A piece of a function call: the first carries ``id``, ``type`` and the name, the rest argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class Delta(_Wire):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Out):
    _required = ("index", "delta", "finish_reason", "logprobs")

    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Out):
    _required = ("id", "object", "created", "model", "choices")

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageOut | None = None
    service_tier: str | None = None
    prompt: PromptInfo | None = None
    release: ReleaseInfo | None = None
    citations: list[dict[str, Any]] | None = None
    grounding: GroundingInfo | None = None
    guardrails: str | None = None
    guardrail: dict[str, Any] | None = None


class EmbeddingRequest(_Wire):
    """POST /v1/embeddings, OpenAI's wire format. Parameters Keel does not know are refused with a 400."""

    # allowed so the route can name an unknown parameter in its 400; the document says none is accepted
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    input: str | list[str] | list[int] | list[list[int]] = Field(description=(
        "A text or a list of texts (up to 2048). Token ids (a list of integers, or of lists of integers) are "
        "refused: the model has its own tokenizer."))
    model: str = Field(min_length=1, description="The embedding model's id (GET /v1/models) or its short name.")
    encoding_format: Literal["float", "base64"] = Field(default="float", description=(
        "float: a JSON array; base64: the vector's little-endian float32 bytes, base64-encoded."))
    dimensions: Annotated[int, Field(ge=1)] | None = Field(default=None, description=(
        "Accepted only when it equals the model's dimension: the model cannot shorten its vectors."))
    user: str | None = Field(default=None, description="Accepted and ignored.")
    truncate: bool = Field(default=False, description=(
        "Keel: embed only the first tokens of a text longer than the model's window (as sentence-transformers "
        "does) instead of refusing it."))

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v: Any) -> Any:
        """One clear message for a wrong shape (pydantic's would list every member of the union); token ids
        pass here and are refused by the route, which names the parameter."""
        if isinstance(v, str) or (isinstance(v, list) and (
                all(isinstance(t, str) for t in v) or all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                or all(isinstance(t, list) for t in v))):
            return v
        raise ValueError("must be a string or a list of strings")


class Embedding(_Out):
    _required = ("object", "index", "embedding")

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description=(
        "The L2-normalised vector (the very vectors Keel's RAG stores), or with encoding_format=base64 its "
        "little-endian float32 bytes in base64."))


class EmbeddingUsage(_Out):
    _required = ("prompt_tokens", "total_tokens")

    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Out):
    _required = ("object", "data", "model", "usage")

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


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
