"""Keel's guardrails: input and output guards built on guardrails-ai.

Layout
  settings.py     GuardrailSettings (the ``guardrails:`` section of Keel's settings)
  offline.py      configure_offline(): the one explicit, process-wide offline set-up (call at start-up)
  validators/     pure check functions + their guardrails-ai ``@register_validator`` wrappers (``keel/...``);
                  injection_model.py: the injection classifier, trained from infra/guardrails/data, cached
  embeddings.py   the shared MiniLM embedder (LRU cache, bf16 where native, a pinned forward thread)
  injection_eval.py  detection / false-positive rates on the labelled sets (tests, benchmark)
  policy.py       versioned YAML policies (pydantic), selection per route/workflow/model alias
  engine.py       GuardrailEngine: check_input(), check_output(), output_guard() (streaming)
  streaming.py    OutputGuard: sentence-window validation of a token stream
  audit.py        SQLite audit trail of every decision
  metrics.py      Prometheus collectors (per-validator latency, trigger counts)

Importing this package has no side effects and does not import guardrails-ai, torch or spaCy;
those load in :meth:`GuardrailEngine.warm_up`.
"""

from app.guardrails.settings import GuardrailSettings, StreamingSettings

__all__ = ["GuardrailSettings", "StreamingSettings"]
