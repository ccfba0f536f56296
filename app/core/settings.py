"""The kernel's settings: what every layer may read (state folder, server, auth, limits, backends, model aliases).

Each feature declares its own section next to its code (``ingest.settings.RagSettings``, ...); the composition
root (:mod:`app.settings`) mounts them into one tree on top of :class:`CoreSettings`. A feature that needs a
shared field and its own section says so with a small protocol in its settings module, so nothing below the
root knows the whole tree.

Sources, highest priority first: constructor arguments, ``KEEL_*`` environment
variables (``__`` separates nesting levels, e.g. ``KEEL_SERVER__PORT=9000``), a
YAML file (``KEEL_CONFIG`` or ``./keel.yaml``), then the built-in defaults.
Sources are deep-merged, so ``KEEL_BACKENDS__LOCAL__ENFORCE_EAGER=true``
changes one field of the default backend instead of replacing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from app.core.db import postgres_url

BackendKind = Literal["vllm", "openai", "transformers"]


class ManagedVLLM(BaseModel):
    """How Keel runs a vLLM server as a supervised child process."""

    python: Path = Path(".venv-vllm/bin/python")
    host: str = "127.0.0.1"
    port: int = 8001
    model_path: Path | None = Field(
        default=None, description="Model folder to serve; defaults to <home>/models/smollm2."
    )
    served_model_name: str = "smollm2"
    max_model_len: int = 2048
    kv_cache_gb: int = 2
    enforce_eager: bool = Field(
        default=False, description="Skip torch.compile: ~35 s start instead of ~2 min, ~20% slower decode."
    )
    enable_lora: bool = False
    max_loras: int = 2
    max_lora_rank: int = 8
    lora_modules: dict[str, Path] = Field(default_factory=dict)
    tool_call_parser: str | None = Field(default="hermes", description=(
        "vLLM's parser of the model's function calls, for tool_choice 'auto' (--tool-call-parser); it must match "
        "the chat template: 'hermes' for Keel's SmolLM2 template (and Hermes, Qwen2.5), 'llama3_json', 'mistral', "
        "'qwen3_xml', ... for those families. Unset: 'auto' is refused; 'required' and a named function still "
        "work, by guided decoding."))
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(default="parameter", description=(
        "How far vLLM's grammar holds a function call (--tool-strict-level): 'parameter' pins every call's "
        "arguments to its function's schema, as if each tool were strict (a small model otherwise adds properties "
        "until max_tokens); 'auto' only those of tools marked strict; 'function' only the call's shape and name."))
    chat_template: Path | None = Field(default=None, description=(
        "A Jinja chat template instead of the model's own (--chat-template). Unset: the model's own, except for "
        "the SmolLM2 folder Keel prepares, served with app/llm/chat_templates/smollm2-tools.jinja (its own "
        "template has no function calling)."))
    extra_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description=(
        "Environment variables for the server on top of the allow list it inherits from Keel's (PATH, HOME, "
        "LANG/LC_*, HF_*, VLLM_*, OMP_*, ... never KEEL_*, keys, tokens or database URLs)."))
    startup_timeout_s: float = 600.0
    restart_on_exit: bool = True
    max_restarts: int = Field(default=5, ge=0, description=(
        "Restarts allowed within restart_window_s: a server that crashes now and then is restarted every time, "
        "one that crash-loops is given up (state 'failed', readiness false)."))
    restart_window_s: float = Field(default=600.0, gt=0, description="The window max_restarts counts over.")
    restart_backoff_s: float = 2.0


def server_root(url: str) -> str:
    """'http://h:8000/v1/' and 'http://h:8000' -> 'http://h:8000': one server, however its URL is written."""
    parts = urlsplit(url.strip())
    path = parts.path.rstrip("/")
    path = path[:-3] if path.endswith("/v1") else path
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


class BackendSettings(BaseModel):
    """One inference backend. ``kind`` selects the implementation."""

    kind: BackendKind = "vllm"
    base_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL ending in /v1; for vllm, set it to use an "
        "existing server instead of starting one."
    )
    api_key: SecretStr | None = Field(default=None, description=(
        "Key the server requires. For a vLLM server Keel starts, unset means a new random key each start; set "
        "it when other processes (a fine-tune worker's eval judge) must call that server too."))
    managed: ManagedVLLM | None = None
    replicas: list[str] = Field(default_factory=list, description=(
        "More servers of the same model (base URLs ending in /v1), beside base_url or the server Keel runs: each "
        "request goes to the one with the fewest in flight, a server that cannot be reached is drained and the "
        "request sent to another before any token, and deployed LoRA adapters are loaded on every one."))
    replica_check_s: float = Field(default=5.0, ge=0, description=(
        "With replicas: how often every server's model list is read (a drained one that answers takes requests "
        "again; one that restarted gets its adapters back). 0: only requests mark servers down, nothing up."))
    model_path: Path | None = Field(default=None, description="transformers: model folder to load.")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    connect_timeout_s: float = 3.0
    read_timeout_s: float = 120.0
    retries: int = Field(default=2, ge=0, description="Retries on connection errors only.")
    retry_backoff_s: float = 0.2
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = 15.0

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an 'openai' backend needs base_url")
        if self.replicas and self.kind == "transformers":
            raise ValueError("replicas are servers (vllm or openai backends); a transformers backend runs in process")
        self.check_distinct()
        return self

    def check_distinct(self) -> None:
        """Every server once: a URL listed twice (with or without /v1) would be sent double its share."""
        roots = [server_root(u) for u in self.server_urls()]
        if len(set(roots)) != len(roots):
            raise ValueError("replicas must be distinct servers (a URL is listed twice, or is base_url or the "
                             "server Keel runs)")

    def server_urls(self) -> list[str]:
        """Every server of this backend: base_url (or the one Keel runs), then the replicas."""
        first = self.base_url or (f"http://{self.managed.host}:{self.managed.port}/v1" if self.managed else None)
        return [u.rstrip("/") for u in ([first] if first else []) + self.replicas]


class GenerationDefaults(BaseModel):
    """Applied when a request leaves the parameter unset."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = Field(default=512, ge=1)


class ModelAlias(BaseModel):
    """A logical model name clients use, mapped to where it really runs."""

    backend: str
    model: str = Field(description="Model name on the backend (vLLM's served name or LoRA module name).")
    adapter: Path | None = Field(default=None, description="LoRA adapter folder (transformers backend).")
    fallback: str | None = Field(default=None, description="Another alias used while this one is down.")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults)
    description: str = ""


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    gc_freeze: bool = Field(default=True, description=(
        "Once started, take the start-up heap (libraries, models, the service graph: 600k-1M objects) out of the "
        "garbage collector's scans (gc.freeze): a full collection then pauses the server for milliseconds instead "
        "of ~0.5 s (bench/heap.py)."))

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


class AuthSettings(BaseModel):
    enabled: bool = Field(default=True, description="false = dev mode: every request is admin. Loudly logged.")
    default_rate_limit_per_minute: int = Field(default=600, ge=1)
    default_tokens_per_minute: int | None = Field(default=None, ge=1, description=(
        "Model tokens (prompt + completion) a key may use per minute unless it has its own limit; unset: no token "
        "limit. Counted where the requests are (in Postgres with the keys, for every API process together)."))
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the API key store: a key created through one API process works on every other; "
        "unset: database_url, else <home>/keel.db (one machine)."))
    shared_rate_limits: bool = Field(default=True, description=(
        "With the keys in Postgres, count every key's requests there, so the limit holds for all API processes "
        "together (one upsert per request); false, or keys in SQLite: each process counts its own."))
    rate_limit_fail_open: bool = Field(default=True, description=(
        "Shared limits while their database is unreachable: true lets requests through (counted in "
        "keel_rate_limit_store_errors_total); false refuses them with a 503."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="auth.url", otherwise="<home>/keel.db")


class LimitSettings(BaseModel):
    max_body_bytes: int = Field(default=1_000_000, ge=1, description="Request bodies (chat, prompts, ...); "
                                "document uploads have max_upload_bytes instead.")
    max_upload_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="POST /v1/ingest: all files of one upload request together. "
        "They stream to disk as they arrive (never held in memory); a larger request is refused with a 413.")
    max_messages: int = 256
    max_input_chars: int = 100_000
    max_tokens: int = 4096


class RoutingSettings(BaseModel):
    """The routing table (``app.llm.routing``): the aliases that change at run time (adapter deploys, releases)."""

    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL: one table for every API process and worker on several machines; unset: "
        "<home>/routing.db (one machine)."))
    check_interval_s: float = Field(default=1.0, ge=0, le=60, description=(
        "How stale a process's copy may be: a change made by another process is served within this interval."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="routing.url", otherwise="<home>/routing.db")


class OtelSettings(BaseModel):
    """Traces (``app.core.tracing``): OpenTelemetry spans of every request, kept in the embedded store and/or
    exported over OTLP. The standard ``OTEL_EXPORTER_OTLP_*`` variables work too."""

    enabled: bool = Field(default=True, description="Record traces.")
    endpoint: str | None = Field(default=None, description=(
        "OTLP/HTTP endpoint of a collector (Phoenix, Langfuse, Jaeger, Tempo), e.g. http://localhost:4318; "
        "default: OTEL_EXPORTER_OTLP_ENDPOINT when set, else no export."))
    store: bool = Field(default=True, description="Keep spans in <home>/traces.db (keel traces, the Traces page).")
    retention_days: float = Field(default=7, gt=0, description="Spans older than this are deleted from the store.")
    sample_ratio: float = Field(default=1.0, ge=0, le=1, description="Share of requests traced.")
    capture_content: bool = Field(default=False, description=(
        "Record messages and answers on the spans (gen_ai.input.messages / gen_ai.output.messages), with "
        "personal data masked by the guardrails' PII detector. Off: only sizes, ids and verdicts."))
    queue_size: int = Field(default=4096, ge=64, le=1_000_000, description=(
        "Spans waiting for export; beyond it they are dropped (counted), never slowing a request."))


def _default_backends() -> dict[str, Any]:
    return {"local": {"kind": "vllm", "managed": {}}}


def _default_models() -> dict[str, Any]:
    return {"smollm2": {"backend": "local", "model": "smollm2", "description": "SmolLM2-135M-Instruct",
                        # A 135M model rambles at temperature 1; a low default keeps answers on topic.
                        "defaults": {"temperature": 0.2}}}


class _Defaults(PydanticBaseSettingsSource):
    """Lowest-priority source, so env/YAML deep-merge into the default backend and alias."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {"backends": _default_backends(), "models": _default_models()}


class CoreSettings(BaseSettings):
    # hide_input_in_errors: a refused value may be a database URL with its password in it.
    model_config = SettingsConfigDict(
        env_prefix="KEEL_", env_nested_delimiter="__", extra="forbid", validate_default=True,
        hide_input_in_errors=True,
    )

    home: Path = Field(default=Path(".keel"), description="State folder: models, databases, logs.")
    database_url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of one database for every store that can live in Postgres, so several API processes "
        "and workers on several machines share them: API keys, prompts, the routing table, releases, eval runs, "
        "lineage, the guardrail audit, agent runs. A store's own URL setting (auth.url, prompts.url, routing.url, "
        "releases.url, evals.url, monitor.url, guardrails.audit_url, agents.postgres_url) wins "
        "over it. Not the job queue (jobs.url): its jobs read files under home. Unset: SQLite files under home."))
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(default="text", description=(
        "json: one JSON object per log line with its request id and trace id (for log collectors)."))
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    backends: dict[str, BackendSettings] = Field(default_factory=dict)
    models: dict[str, ModelAlias] = Field(default_factory=dict)
    default_model: str = "smollm2"
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    otel: OtelSettings = Field(default_factory=OtelSettings)

    @field_validator("database_url", mode="before")
    @classmethod
    def _database_url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="database_url", otherwise="SQLite files under home")

    @model_validator(mode="after")
    def _resolve(self) -> CoreSettings:
        if self.database_url is not None:
            self.auth.url = self.auth.url or self.database_url
            self.routing.url = self.routing.url or self.database_url
        for name, alias in self.models.items():
            if alias.backend not in self.backends:
                raise ValueError(f"model alias {name!r} names unknown backend {alias.backend!r}")
            if alias.fallback and alias.fallback not in self.models:
                raise ValueError(f"model alias {name!r} has unknown fallback {alias.fallback!r}")
        for backend in self.backends.values():
            if backend.kind != "vllm" or backend.base_url is not None:
                # a URL means: connect to that server, do not start one; only vLLM backends have a managed server
                # (the built-in default merges one into any backend named 'local', whatever its kind)
                backend.managed = None
            elif backend.kind == "vllm" and backend.managed is None:
                backend.managed = ManagedVLLM()
            if backend.managed and backend.managed.model_path is None:
                backend.managed.model_path = self.models_dir / "smollm2"
            backend.check_distinct()  # now with the server Keel runs, if it runs one
            if backend.kind == "transformers" and backend.model_path is None:
                backend.model_path = self.models_dir / "smollm2"
        return self

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def db_path(self) -> Path:
        return self.home / "keel.db"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_file = os.environ.get("KEEL_CONFIG", "keel.yaml")
        return (
            init_settings,
            env_settings,
            YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),
            _Defaults(settings_cls),
        )


class CoreConfig(Protocol):
    """The kernel's part of the settings tree as features read it. A feature that also needs its own section
    declares a protocol extending this one (``evals.settings.EvalConfig``); the root ``app.settings.Settings``
    satisfies them all, and no feature imports it."""

    home: Path
    limits: LimitSettings
    backends: dict[str, BackendSettings]
    models: dict[str, ModelAlias]
    default_model: str
    routing: RoutingSettings

    @property
    def models_dir(self) -> Path: ...

    @property
    def db_path(self) -> Path: ...

    @property
    def logs_dir(self) -> Path: ...
