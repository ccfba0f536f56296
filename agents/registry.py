"""Workflow registry: name -> builder, initial state and description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agents.errors import WorkflowNotFound


@dataclass(frozen=True)
class Workflow:
    name: str
    description: str
    build: Callable[[Any], Any]  # Deps -> StateGraph (uncompiled)
    initial_state: Callable[..., dict[str, Any]]  # (question, **options) -> per-run state

    def info(self) -> dict[str, str]:
        return {"name": self.name, "description": self.description}


class WorkflowRegistry:
    def __init__(self) -> None:
        self._flows: dict[str, Workflow] = {}

    def register(self, workflow: Workflow, *, replace: bool = False) -> None:
        if workflow.name in self._flows and not replace:
            raise ValueError(f"workflow {workflow.name!r} is already registered")
        self._flows[workflow.name] = workflow

    def get(self, name: str) -> Workflow:
        wf = self._flows.get(name)
        if wf is None:
            raise WorkflowNotFound(f"no workflow named {name!r}; available: {', '.join(sorted(self._flows))}",
                                   param="workflow")
        return wf

    def names(self) -> list[str]:
        return sorted(self._flows)

    def list(self) -> list[Workflow]:
        return [self._flows[n] for n in self.names()]


def default_registry() -> WorkflowRegistry:
    from agents.workflows import ops, rag_qa, research  # lazy: the workflows import langgraph.graph (~0.6 s)

    reg = WorkflowRegistry()
    reg.register(Workflow(rag_qa.NAME, rag_qa.DESCRIPTION, rag_qa.build,
                          lambda question, **_: rag_qa.initial_state(question)))
    reg.register(Workflow(research.NAME, research.DESCRIPTION, research.build,
                          lambda question, max_steps=None, **_: research.initial_state(question, max_steps)))
    reg.register(Workflow(ops.NAME, ops.DESCRIPTION, ops.build, lambda question, **_: ops.initial_state(question)))
    return reg
