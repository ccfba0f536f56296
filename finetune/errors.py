"""Fine-tuning errors: KeelError subclasses with their own stable codes."""

from __future__ import annotations

from typing import Any

from app.core.errors import Conflict, InvalidRequest, KeelError, NotFound


class InvalidJobSpec(InvalidRequest):
    """The job spec YAML does not parse or does not validate."""

    code = "invalid_job_spec"

    def __init__(self, message: str, *, errors: list[dict[str, Any]] | None = None, param: str | None = "spec"):
        super().__init__(message, param=param)
        self.errors = errors or []


class JobNotFound(NotFound):
    code = "finetune_job_not_found"


class JobStateConflict(Conflict):
    """The job is not in a state that allows this (e.g. cancelling a finished job)."""

    code = "finetune_job_state"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class PromotionRefused(Conflict):
    """The eval gate refused the adapter version, and no forced override was given."""

    code = "promotion_gate_failed"

    def __init__(self, message: str, *, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, param="version")
        self.reason = reason
        self.details = details or {}


class TrainingFailed(KeelError):
    code = "training_failed"


class TrainingCancelled(KeelError):
    code = "training_cancelled"
    status = 409
    type = "invalid_request_error"


class AdapterServingError(KeelError):
    """vLLM refused to load or unload an adapter (LoRA disabled, bad path, rank too large...)."""

    code = "adapter_serving_failed"
    status = 502
    type = "server_error"
