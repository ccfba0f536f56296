"""The OpenAI Responses API's wire models (``POST /v1/responses``): the request, its input items, the response.

Keel answers a response on its chat path (prompts' models, releases, guardrails, traces, lineage): the input items
become chat messages (:func:`app.api.routes.responses.conversation`), the chat events become output items and,
streamed, the Responses API's typed events.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from app.api.schemas import _FUNCTION_NAME, FunctionDef, JsonSchemaSpec, _Out, _Wire


class TextPartIn(_Wire):
    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(_Wire):
    """A turn (OpenAI's message item, or its short form without ``type``)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPartIn]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Wire):
    """A function call the model made (sent back with its output when the client manages the history)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Wire):
    """What the client's function returned, for the call ``call_id``."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=200)
    output: str | list[TextPartIn]
    id: str | None = None
    status: str | None = None


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem, Field(discriminator="type")]


class FunctionTool(_Wire):
    """A function the model may call (the Responses API's flat form of chat's ``tools[].function``)."""

    type: Literal["function"]
    name: str = Field(pattern=_FUNCTION_NAME, description="Letters, digits, '_' and '-', at most 64.")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="A JSON Schema of the arguments.")
    strict: bool | None = None

    def function(self) -> FunctionDef:
        return FunctionDef(name=self.name, description=self.description, parameters=self.parameters,
                           strict=self.strict)


class FunctionChoice(_Wire):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def spec(self) -> JsonSchemaSpec | None:
        return JsonSchemaSpec(name=self.name, schema=self.schema_, strict=self.strict) if self.schema_ else None


class TextConfig(_Wire):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponseCreate(_Wire):
    """Fields Keel does not implement are refused with a 400 that names them, not silently dropped."""

    # allowed so the route can name an unknown parameter in its 400; the document says none is accepted
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    model: str | None = Field(default=None, min_length=1, description="Default: the server's default model.")
    input: str | list[InputItem] = Field(description="A user message, or a list of items (messages, function "
                                                     "calls and their outputs).")
    instructions: str | None = Field(default=None, description=(
        "A system message in front of the input (not carried over to a response that continues this one)."))
    previous_response_id: str | None = Field(default=None, description=(
        "Go on from a stored response of this key: its conversation comes before the input."))
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = Field(default=True, description="Keep the response for GET and previous_response_id.")
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = Field(default=None, description="Only 'disabled': Keel refuses an "
                                                                               "input over the model's context.")
    include: list[str] | None = Field(default=None, max_length=0, description="Nothing extra can be included.")
    reasoning: None = Field(default=None, description="The served models do not reason: must be null.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _message_type(cls, data: Any) -> Any:
        """OpenAI's short form of a message item has no ``type``: it is one."""
        if isinstance(data, dict) and isinstance(data.get("input"), list):
            data = {**data, "input": [{**i, "type": "message"} if isinstance(i, dict) and "type" not in i and "role"
                                      in i else i for i in data["input"]]}
        return data


# -- the response ---------------------------------------------------------------------------------------------


class OutputText(_Out):
    _required = ("type", "text", "annotations")

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] = Field(default_factory=list)


class OutputMessage(_Out):
    _required = ("id", "type", "role", "status", "content")

    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(_Out):
    _required = ("type", "call_id", "name", "arguments")

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(_Out):
    _required = ("input_tokens", "output_tokens", "total_tokens", "input_tokens_details", "output_tokens_details")

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class ResponseObject(_Out):
    _required = ("id", "object", "created_at", "status", "model", "output", "error", "incomplete_details",
                 "instructions", "metadata", "parallel_tool_calls", "temperature", "tool_choice", "tools", "top_p")

    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    store: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    service_tier: str | None = None
    guardrails: str | None = Field(default=None, description="Keel: the guardrail policy@version applied.")
    guardrail_events: list[dict[str, Any]] | None = Field(default=None, description=(
        "Keel: redactions, retractions or a blocked input."))
    release: dict[str, str] | None = Field(default=None, description="Keel: the release and variant that answered.")


class DeletedResponse(_Wire):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemList(_Wire):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
