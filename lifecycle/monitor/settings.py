"""Settings of the ``monitor`` section."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator

from app.core.db import postgres_url

_REFERENCE = re.compile(r"^(window|release:[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}|suite:[A-Za-z0-9][A-Za-z0-9_.-]{0,127})$")


class MonitorSettings(BaseModel):
    """What the drift monitor records and compares (``lifecycle.monitor``)."""

    lineage: bool = Field(default=True, description=(
        "Record the lineage and the drift features of every answer (lifecycle.lineage). Off: no lineage API, "
        "no drift monitor."))
    url: SecretStr | None = Field(default=None, description=(
        "postgresql:// URL of the lineage store (every answer's lineage record and drift features) and the drift "
        "check results instead of <home>/lineage.db and monitor.db: every API process then answers GET "
        "/v1/lineage/{id} for any answer and lists every check, drift checks see the whole fleet's traffic and one "
        "process per round runs the scheduled check. database_url fills it when unset."))
    embed_sample: float = Field(default=1.0, ge=0, le=1, description=(
        "Share of questions whose embedding is kept for input-drift checks (computed off the request path by "
        "the lineage writer; the text itself is never stored). 0: no embeddings."))

    # -- the scheduled check ----------------------------------------------------------------------------------
    interval_s: float = Field(default=3600, ge=0, description=(
        "Seconds between scheduled drift checks run by the API process; 0: no scheduled checks (POST "
        "/v1/monitor/drift and `keel monitor drift` still work)."))
    window_s: float = Field(default=3600, gt=0, description=(
        "The traffic a scheduled check looks at (the last window_s seconds), and the default current window of "
        "an on-demand check."))
    reference: str = Field(default="window", description=(
        "What a scheduled check compares the last window with: 'window' (the window_s seconds before it), "
        "'release:NAME' (that release's baseline arm vs its candidate) or 'suite:NAME' (an eval suite's inputs)."))

    # -- what a check needs and decides -------------------------------------------------------------------------
    min_rows: int = Field(default=50, ge=2, description=(
        "Fewest rows a window (and a check's column) needs; below it the result is 'not_enough_data', which is "
        "neither a pass nor a drift."))
    max_rows: int = Field(default=100_000, ge=100, description="Most rows read per window (the newest).")
    drift_share: float = Field(default=0.5, gt=0, le=1, description=(
        "The verdict is 'drift' when at least this share of the checks that ran drifted (Evidently's dataset "
        "drift rule), or when one of verdict_checks drifted."))
    verdict_checks: list[str] = Field(default_factory=lambda: ["input_embedding"], description=(
        "Checks whose drift alone makes the verdict 'drift' (default: the question embeddings, the one "
        "multivariate test of what users ask)."))
    no_good_passage_score: float = Field(default=0.025, ge=0, description=(
        "A grounded question whose best retrieval score is below this (or which found no passage) counts as "
        "'no good passage'. Keel's retrieval scores are fused RRF scores: 2/61 ~ 0.033 when the best passage "
        "ranks first in both the dense and the keyword branch, 1/61 ~ 0.016 when first in one only."))
    methods: dict[str, str] = Field(default_factory=dict, description=(
        "Per-check Evidently stattest overriding its default choice (e.g. {topic_mix: psi, question_length: ks}); "
        "by default Evidently picks by size: K-S, chi-square or Z-test p-values up to 1000 rows, normed "
        "Wasserstein or Jensen-Shannon distance above."))
    thresholds: dict[str, float] = Field(default_factory=dict, description=(
        "Per-check thresholds overriding the method's default (p-value 0.05, distance 0.1)."))

    # -- input embeddings -------------------------------------------------------------------------------------
    embedding_components: int = Field(default=16, ge=2, le=128, description=(
        "PCA components (fit on both windows) the embeddings are reduced to for the embedding drift test."))
    clusters: int = Field(default=8, ge=2, le=64, description=(
        "k-means topics fit on the reference embeddings: the topic mix is the share of questions per cluster "
        "(fewer when the reference is small: at least ~10 questions per cluster)."))
    embedding_max_rows: int = Field(default=5000, ge=100, description=(
        "Embedded questions per window the embedding test and the topic model use (a seeded random sample)."))
    embedding_auc_threshold: float = Field(default=0.55, gt=0.5, lt=1, description=(
        "Embedding drift: ROC AUC of a classifier telling the two windows apart (Evidently's domain-classifier "
        "method) above which they differ, for references of 1000 rows or more; smaller references are tested "
        "against the 95th percentile of a random classifier's AUC instead (bootstrap)."))

    # -- reports -----------------------------------------------------------------------------------------------
    report_points: int = Field(default=1000, ge=50, le=2500, description=(
        "Points per window in the report's picture of the embeddings (a 2-D PCA projection; Evidently's t-SNE "
        "took up to 15 s for 500 points on 2 cores)."))
    keep_reports: int = Field(default=100, ge=1, description=(
        "Newest HTML reports kept under <home>/reports/drift (~4 MB each: Evidently inlines its JavaScript, so a "
        "report opens anywhere); older ones are deleted, their results stay in monitor.db."))

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> SecretStr | None:
        return postgres_url(value, setting="monitor.url", otherwise="<home>/lineage.db")

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str) -> str:
        if not _REFERENCE.match(v):
            raise ValueError(f"monitor.reference {v!r}: use 'window', 'release:NAME' or 'suite:NAME'")
        return v
