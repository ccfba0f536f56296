"""Guardrail errors, in Keel's hierarchy (stable ``code`` values clients can branch on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.core.errors import InvalidRequest, KeelError

if TYPE_CHECKING:
    from app.guardrails.types import InputDecision


class GuardrailPolicyError(KeelError):
    """The policy file is missing or invalid (raised at start-up or on reload; never per request)."""

    code = "guardrail_policy_invalid"
    status = 500
    type = "server_error"


class GuardrailBlocked(InvalidRequest):
    """A request refused by an input guard, for callers that prefer an error over a refusal message.

    ``message`` is the refusal text; ``decision`` carries the per-validator results.
    """

    code = "guardrail_blocked"

    def __init__(self, message: str, *, decision: InputDecision | None = None) -> None:
        super().__init__(message, param="messages")
        self.decision = decision
