"""Prompt-registry errors: KeelError subclasses with their own stable codes."""

from __future__ import annotations

from app.core.errors import Conflict, InvalidRequest, PayloadTooLarge


class TemplateInvalid(InvalidRequest):
    """The template text or its variable schema cannot be saved as written."""

    code = "template_invalid"


class UnsafeTemplate(InvalidRequest):
    """The template tries to reach Python internals; the sandbox refuses it."""

    code = "template_unsafe"


class TemplateTooLarge(PayloadTooLarge):
    code = "template_too_large"


class TemplateRenderError(InvalidRequest):
    code = "template_render_error"


class VariableError(InvalidRequest):
    """A render variable is missing, unknown or of the wrong type."""

    code = "invalid_variable"


class VersionConflict(Conflict):
    """Optimistic concurrency: the caller edited a version that is no longer the latest."""

    code = "version_conflict"

    def __init__(self, message: str, *, latest: int | None, param: str | None = "base_version") -> None:
        super().__init__(message, param=param)
        self.latest = latest


class PromotionGateFailed(Conflict):
    code = "promotion_gate_failed"

    def __init__(self, message: str, *, reason: str, details: dict | None = None) -> None:
        super().__init__(message, param="version")
        self.reason = reason
        self.details = details or {}


class ImportConflict(Conflict):
    """An import would rewrite history that already exists with different content."""

    code = "import_conflict"


class LabelProtected(Conflict):
    """Removing a protected label needs an admin override with a reason."""

    code = "label_protected"
