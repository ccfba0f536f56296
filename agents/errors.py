"""Agent errors, with stable codes (see app.core.errors)."""

from __future__ import annotations

from app.core.errors import BackendError, Conflict, InvalidRequest, KeelError, NotFound, PermissionDenied


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class RunNotResumable(Conflict):
    code = "run_not_resumable"


class MalformedOutput(BackendError):
    """The model's answer to a structured request was not the JSON asked for."""

    code = "malformed_model_output"


class NodeTimeout(KeelError):
    code = "node_timeout"
    status = 504
    type = "server_error"


class ToolInputError(InvalidRequest):
    """Arguments a tool cannot accept: returned to the agent, never retried."""

    code = "tool_input_invalid"


class ToolNotFound(NotFound):
    code = "tool_not_found"


class ToolDenied(PermissionDenied):
    """The caller's API key lacks the scope the tool needs: returned to the agent, never retried."""

    code = "tool_scope_denied"


class ShadowSkipped(ToolDenied):
    """A release's shadow run called a tool that can change something: not executed, returned to the agent."""

    code = "not_executed_in_shadow"
