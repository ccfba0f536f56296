"""One eval case: the question, what the answer is checked against, and the behaviour expected. Metrics read
cases; suites (``evals.suite``) hold them."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EXPECTATIONS = ("answer", "refuse", "no_pii", "no_system_prompt", "on_topic")
Expectation = Literal["answer", "refuse", "no_pii", "no_system_prompt", "on_topic"]
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Case(Strict):
    id: str
    input: str = Field(default="", description="The user message (the question).")
    variables: dict[str, Any] = Field(default_factory=dict, description="Template variables for this case.")
    reference: str | None = Field(default=None, description="Reference answer.")
    expected_sources: list[str] = Field(default_factory=list, description="Documents the answer must cite.")
    must_include: list[str] = Field(default_factory=list)
    must_not_include: list[str] = Field(default_factory=list)
    expect: list[Expectation] = Field(default_factory=list, description="Expected behaviour.")
    category: str | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not ID_PATTERN.match(v):
            raise ValueError(f"case id {v!r}: use letters, digits and _.:- (at most 128)")
        return v

    @model_validator(mode="after")
    def _has_input(self) -> Case:
        if not self.input.strip() and not self.variables:
            raise ValueError(f"case {self.id!r} has neither input nor variables")
        return self
