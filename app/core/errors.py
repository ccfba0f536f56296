"""Keel's error hierarchy.

Every error that can reach a client carries a stable ``code`` (clients branch
on it), an HTTP ``status`` and an OpenAI-style ``type``. The API layer maps all
of them through one handler; nothing else in Keel knows about HTTP.
"""

from __future__ import annotations


class KeelError(Exception):
    code: str = "internal_error"
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidRequest(KeelError):
    code = "invalid_request"
    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthenticated(KeelError):
    code = "invalid_api_key"
    status = 401
    type = "authentication_error"


class PermissionDenied(KeelError):
    code = "insufficient_scope"
    status = 403
    type = "permission_error"


class NotFound(KeelError):
    code = "not_found"
    status = 404
    type = "invalid_request_error"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(KeelError):
    code = "conflict"
    status = 409
    type = "invalid_request_error"


class StoreUnavailable(KeelError):
    """A database Keel keeps its own state in (a Postgres server) cannot be reached."""

    code = "store_unavailable"
    status = 503
    type = "server_error"


class ClientGone(KeelError):
    """The client closed the connection before the answer was ready (nginx's 499). Nobody reads the
    response; the status is there for the access log and the metrics."""

    code = "client_closed_request"
    status = 499
    type = "invalid_request_error"


class ShuttingDown(KeelError):
    """The server is stopping: work it had accepted was stopped at a safe point (submit it again)."""

    code = "server_shutting_down"
    status = 503
    type = "server_error"


class PayloadTooLarge(KeelError):
    code = "payload_too_large"
    status = 413
    type = "invalid_request_error"


class RateLimited(KeelError):
    code = "rate_limit_exceeded"
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendError(KeelError):
    """The inference backend answered with an error we cannot blame on the request."""

    code = "backend_error"
    status = 502
    type = "server_error"


class BackendUnavailable(BackendError):
    """The backend cannot be reached (connection refused, circuit open, not started)."""

    code = "backend_unavailable"
    status = 503


class BackendTimeout(BackendError):
    code = "backend_timeout"
    status = 504
