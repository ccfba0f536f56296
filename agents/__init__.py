"""Keel agents: LangGraph workflows (``rag-qa``, ``research``) with shared Qdrant memory, durable
threads, human approval of risky tools and a typed event stream.

Importing this package is cheap; LangGraph loads when a service is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agents.service import AgentService


def build_agents(settings: Any, llm_router: Any, rag: Any = None, prompts: Any = None, **kwargs: Any) -> AgentService:
    """See :func:`agents.service.build_agents`."""
    from agents.service import build_agents as _build  # lazy: the package stays cheap; the service loads LangGraph

    return _build(settings, llm_router, rag, prompts, **kwargs)


__all__ = ["build_agents"]
