"""Keel fine-tuning: LoRA job specs, data validation, training, the job worker, MLflow
tracking and registry, and serving adapters through vLLM or transformers.

Import-light on purpose: ``app.core.settings`` imports ``finetune.settings``, and the API
should not pay for torch/transformers/mlflow until a fine-tuning feature is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.service import FinetuneService
    from finetune.settings import FinetuneConfig

__all__ = ["build_finetune"]


def build_finetune(settings: FinetuneConfig, **kwargs: Any) -> FinetuneService:
    """The service the lead puts on the container as ``container.finetune``."""
    # lazy: `import finetune.settings` (app.settings does) stays light: the service pulls the job store, yaml, ~45 ms
    from finetune.service import build_finetune as _build

    return _build(settings, **kwargs)
