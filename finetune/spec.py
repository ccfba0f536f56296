"""Fine-tuning job specs: YAML files validated by pydantic.

A spec says everything a run depends on except the bytes of the data (hashed
separately): base model, dataset and split, LoRA config, training arguments and
the eval suites to run afterwards. ``spec_hash`` is the sha256 of the spec's
canonical JSON, stored with the job, the MLflow run and the adapter.

Relative dataset paths are relative to the spec file (``load_spec``) or to the
working directory (``parse_spec`` without a base folder).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import InvalidJobSpec

M = TypeVar("M", bound=BaseModel)
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Eval suites are named, never given as paths: a worker loads them from the suites folders only.
SUITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


def check_suite_names(names: list[str]) -> list[str]:
    bad = [n for n in names if len(n) > 128 or not SUITE_NAME_RE.match(n)]
    if bad:
        raise ValueError(f"eval suites are named, not paths (a suite in evals.suites_dir or evals/suites): "
                         f"{', '.join(map(repr, bad))}")
    return names


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSpec(_Strict):
    path: Path = Field(description="JSONL file, one {'messages': [...]} record per line.")
    validation_path: Path | None = Field(default=None, description="Separate validation JSONL; else split `path`.")
    validation_split: float = Field(default=0.1, ge=0.0, lt=1.0, description="Share of `path` held out.")
    split_seed: int = 0
    max_examples: int | None = Field(default=None, ge=1, description="Use only the first N records (smoke runs).")


class LoraSpec(_Strict):
    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    bias: Literal["none", "all", "lora_only"] = "none"


class TrainingSpec(_Strict):
    epochs: float | None = Field(default=3.0, gt=0)
    max_steps: int | None = Field(default=None, ge=1, description="Overrides epochs when set.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=16, description="Tokens per example; longer examples are refused.")
    seed: int = 42
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    save_steps: int = Field(default=50, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(default=2, ge=1)
    eval_steps: int | None = Field(default=None, ge=1, description="Validation loss every N steps; None = save_steps.")
    logging_steps: int = Field(default=1, ge=1)
    device: str | None = Field(default=None, description="auto | cpu | cuda; None = the worker's setting.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bf16 mixed precision on GPUs that support it, float32 on CPU."
    )
    gradient_checkpointing: bool = False

    @model_validator(mode="after")
    def _length(self) -> TrainingSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("set training.epochs or training.max_steps")
        return self


class JobSpec(_Strict):
    name: str = Field(description="Lowercase letters, digits, '-' and '_'; also the registered model name.")
    description: str = ""
    base_model: str = Field(
        default="smollm2", description="A model folder path, or a name under <home>/models (e.g. 'smollm2')."
    )
    dataset: DatasetSpec
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evals: list[str] = Field(default_factory=list, description="Eval suites to run on the adapter afterwards.")
    register_as: str | None = Field(default=None, description="Registered model name; default: `name`.")
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", "register_as")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.match(v):
            raise ValueError("must match [a-z0-9][a-z0-9_-]{0,62}")
        return v

    @field_validator("evals")
    @classmethod
    def _suites(cls, v: list[str]) -> list[str]:
        return check_suite_names(v)

    @property
    def model_name(self) -> str:
        return self.register_as or self.name

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    def spec_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    def resolve_paths(self, base: Path) -> JobSpec:
        """A copy whose relative dataset paths are made absolute against ``base``."""
        ds = self.dataset
        upd: dict[str, Any] = {"path": _abs(ds.path, base)}
        if ds.validation_path is not None:
            upd["validation_path"] = _abs(ds.validation_path, base)
        return self.model_copy(update={"dataset": ds.model_copy(update=upd)})


def _abs(p: Path, base: Path) -> Path:
    return p if p.is_absolute() else (base / p).resolve()


def parse_yaml_model(text: str, model: type[M], *, source: str, error: type[InvalidJobSpec] = InvalidJobSpec) -> M:
    """YAML text validated as ``model``; ``error`` (an :class:`InvalidJobSpec` kind) lists every problem, each
    with its location (``errors``), when it does not parse, is not a mapping, or does not validate."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{source} must be a YAML mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"loc": ".".join(str(p) for p in e["loc"]) or "(root)", "msg": e["msg"]} for e in exc.errors()
        ]
        lines = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors)
        raise error(f"{source} is invalid: {lines}", errors=errors) from None


def parse_spec(text: str, *, base_dir: Path | None = None, source: str = "spec") -> JobSpec:
    """Parse and validate spec YAML; raise :class:`InvalidJobSpec` listing every problem."""
    spec = parse_yaml_model(text, JobSpec, source=source)
    return spec.resolve_paths(base_dir) if base_dir is not None else spec


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidJobSpec(f"cannot read job spec {path}: {exc}") from exc
    return parse_spec(text, base_dir=path.resolve().parent, source=str(path))


def base_model_path(spec: JobSpec, models_dir: Path) -> Path:
    """Where the base model is looked for (not checked): a name under ``models_dir`` or a path as given."""
    raw = spec.base_model
    candidate = Path(raw).expanduser()
    if not (candidate.is_absolute() or "/" in raw or candidate.exists()):
        candidate = models_dir / raw
    return candidate


def resolve_base_model(spec: JobSpec, models_dir: Path) -> Path:
    """'smollm2' -> <home>/models/smollm2; a path is used as is. Must hold a config.json."""
    raw = spec.base_model
    candidate = base_model_path(spec, models_dir)
    if not (candidate / "config.json").is_file():
        raise InvalidJobSpec(
            f"base model {raw!r} resolves to {candidate}, which is not a model folder (no config.json); "
            "run `keel model prepare` or give a folder path",
            param="base_model",
        )
    return candidate.resolve()
