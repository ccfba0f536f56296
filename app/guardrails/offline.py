"""The one explicit, process-wide offline set-up for the guardrail layer.

Nothing in ``app.guardrails`` changes process state at import time. Entry points (the API lifespan, the
CLI, the benchmark, the test session) call :func:`configure_offline` once, *before* the engine warms up.
It only sets environment variables that are not set already, so an operator's explicit choice wins.

What it does, and why (see ../shared/ENVIRONMENT.md):

* ``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``: fail fast instead of retrying the hub.
* ``GUARDRAILS_RUN_SYNC=true``: guardrails-ai runs a Guard's validators sequentially in the calling
  thread. Keel already runs independent Guards concurrently in worker threads; without this each call
  from a worker thread warns "Could not obtain an event loop" and falls back to the same thing.
* ``LITELLM_LOCAL_MODEL_COST_MAP=True``: litellm (imported by guardrails) otherwise fetches a cost map.
* ``NLTK_DATA`` → ``<cache>/nltk_data`` with an empty ``tokenizers/punkt/``: ``import guardrails`` tries to
  download punkt when nltk is installed.
* ``TIKTOKEN_CACHE_DIR`` → ``<cache>/tiktoken`` holding the encodings litellm bundles: tiktoken always
  downloads otherwise.
* guardrails-ai telemetry: its Hub telemetry is ON unless ``~/.guardrailsrc`` says otherwise, and
  ``Guard()`` re-reads that file on every construction. When the file does not exist it is written with
  ``enable_metrics=false`` / ``use_remote_inferencing=false`` (``write_guardrailsrc=False`` skips this);
  the in-memory rc is switched off either way, and every Guard Keel builds is also configured with
  ``allow_metrics_collection=False``.
* guardrails-ai's OpenTelemetry tracing is switched off (``guardrails_tracing=True`` keeps it): Keel exports
  no traces, yet every ``Guard.validate`` serialised its inputs (the user's text and the request metadata)
  into span attributes - about half of a Guard's ~0.6-1.5 ms per-call overhead, paid by every validator,
  and user text in span attributes is a leak waiting for an exporter.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("keel.guardrails")

_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "GUARDRAILS_RUN_SYNC": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


@dataclass
class OfflineReport:
    env_set: dict[str, str] = field(default_factory=dict)
    guardrailsrc_written: Path | None = None
    telemetry_disabled: bool = False


def _litellm_tokenizers() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return folder if folder.is_dir() else None


def configure_offline(cache_dir: Path | str = Path(".keel/cache"), *, write_guardrailsrc: bool = True,
                      home: Path | None = None, guardrails_tracing: bool = False) -> OfflineReport:
    """Make guardrails-ai, litellm, tiktoken, nltk and Hugging Face work with no network. Idempotent."""
    report = OfflineReport()
    cache = Path(cache_dir)
    for key, value in _ENV_DEFAULTS.items():
        if key not in os.environ:
            os.environ[key] = value
            report.env_set[key] = value

    if "NLTK_DATA" not in os.environ:
        nltk_dir = cache / "nltk_data"
        (nltk_dir / "tokenizers" / "punkt").mkdir(parents=True, exist_ok=True)
        os.environ["NLTK_DATA"] = str(nltk_dir.resolve())
        report.env_set["NLTK_DATA"] = os.environ["NLTK_DATA"]

    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        src = _litellm_tokenizers()
        tk_dir = cache / "tiktoken"
        tk_dir.mkdir(parents=True, exist_ok=True)
        if src is not None:
            for f in src.iterdir():
                # tiktoken's cache files are named by the sha1 of their URL (no extension); litellm ships them so
                if f.is_file() and "." not in f.name and not (tk_dir / f.name).exists():
                    shutil.copyfile(f, tk_dir / f.name)
        os.environ["TIKTOKEN_CACHE_DIR"] = str(tk_dir.resolve())
        report.env_set["TIKTOKEN_CACHE_DIR"] = os.environ["TIKTOKEN_CACHE_DIR"]

    rc_path = (home or Path.home()) / ".guardrailsrc"
    if write_guardrailsrc and not rc_path.exists():
        rc_path.write_text("enable_metrics=false\nuse_remote_inferencing=false\n", encoding="utf-8")
        report.guardrailsrc_written = rc_path
        log.info("wrote %s (guardrails-ai telemetry off)", rc_path)
    disable_guardrails_telemetry()
    report.telemetry_disabled = True
    if not guardrails_tracing:
        from guardrails.settings import settings

        settings.disable_tracing = True
    return report


def disable_guardrails_telemetry() -> None:
    """Switch guardrails-ai's Hub telemetry off in this process (imports guardrails)."""
    from guardrails.classes.rc import RC
    from guardrails.settings import settings
    from guardrails.utils.hub_telemetry_utils import HubTelemetry

    rc = settings.rc
    settings.rc = RC(id=rc.id, token=rc.token, enable_metrics=False, use_remote_inferencing=False)
    HubTelemetry(enabled=False)._enabled = False


def guardrails_telemetry_enabled() -> bool:
    from guardrails.settings import settings

    return settings.rc.enable_metrics is True
