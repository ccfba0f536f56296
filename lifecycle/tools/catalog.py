"""The ML lifecycle as tools: releases, drift, traces, the model registry, experiments, evals, fine-tuning and
prompts, for Keel's agents and MCP clients alike (one :class:`~agents.tools.ToolRegistry`).

Each tool is a thin call into the service the API route uses, so a tool and its route cannot disagree:
the same checks, the same errors, the same audit rows (the service's own trail — ``releases``, ``adapters``,
``prompts`` — names the tool's caller as ``tool [<key id>]``), plus one row per call in the ``tools`` trail.
A tool names the API-key scope it needs (the route's); ``risky`` ones (they change what serves traffic or
spend a GPU) pause for a person's approval in an agent run and carry ``destructiveHint`` over MCP. What a
route lets only admins do (overriding a gate, forcing a promotion) no tool does.

A tool whose service is off on this server (releases disabled, no trace store) is not registered.
Results are JSON-ready dicts; a refused or impossible call raises the service's error, which the executor
turns into an observation the agent reads (``ok=False`` with the error's code and message).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agents.errors import ToolInputError
from agents.tools import FunctionTool, Tool, ToolContext, ToolOutput
from app.core.errors import KeelError, NotFound

STR = {"type": "string", "minLength": 1, "maxLength": 200}
REASON = {"type": "string", "maxLength": 2000, "description": "Why: recorded with the change."}
LIMIT = {"type": "integer", "minimum": 1, "maximum": 200, "default": 20}


@dataclass
class LifecycleTool(FunctionTool):
    """A tool with the API-key ``scope`` it needs and whether it only reads (MCP's ``readOnlyHint``)."""

    scope: str | None = None
    read_only: bool = True
    title: str = ""
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "lifecycle" not in self.tags:
            self.tags = ("lifecycle", *self.tags)


@dataclass
class LifecycleServices:
    """What the tools call: the services the API routes use (``None``: off on this server, no tools)."""

    releases: Any = None  # lifecycle.releases.service.ReleaseService
    serving: Any = None  # lifecycle.releases.serving.ReleaseGateway (blue/green switch on promote)
    monitor: Any = None  # lifecycle.monitor.drift.DriftMonitor
    traces: Any = None  # app.core.tracing.SpanStore
    finetune: Any = None  # finetune.service.FinetuneService
    eval_store: Any = None  # evals.store.EvalStore
    submit_eval: Callable[..., Any] | None = None  # async (suite, baseline, owner) -> the started job
    eval_suites: Callable[[], list[dict[str, Any]]] | None = None
    prompts: Any = None  # prompts.registry.PromptRegistry
    snapshots: Any = None  # ingest's snapshot store (RagServices.snapshots)
    pipelines: Any = None  # lifecycle.pipeline.service.PipelineService
    features: Any = None  # lifecycle.features.service.FeatureService
    extra: list[Tool] = field(default_factory=list)


def actor(ctx: ToolContext) -> str:
    return f"tool [{ctx.principal or 'operator'}]"


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or [], "additionalProperties": False}


def _out(data: Any, summary: str | None = None) -> ToolOutput:
    text = json.dumps(data, ensure_ascii=False, default=str, separators=(",", ":"))
    return ToolOutput(f"{summary}\n{text}" if summary else text, data)


def _validated(model: Any, value: Any, what: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or what}: {err['msg']}" for err in e.errors()[:5])
        raise ToolInputError(f"invalid {what}: {problems}") from None


def lifecycle_tools(s: LifecycleServices) -> list[Tool]:
    tools: list[Tool] = []
    if s.releases is not None:
        tools += _release_tools(s)
    if s.monitor is not None:
        tools += _drift_tools(s.monitor)
    if s.traces is not None:
        tools += _trace_tools(s.traces)
    if s.finetune is not None:
        tools += _registry_tools(s.finetune) + _experiment_tools(s.finetune) + _finetune_tools(s.finetune)
    if s.eval_store is not None:
        tools += _eval_tools(s)
    if s.prompts is not None:
        tools += _prompt_tools(s.prompts)
    tools += _data_tools(s.snapshots, s.finetune)
    if s.pipelines is not None:
        tools += _pipeline_tools(s.pipelines)
    if s.features is not None:
        tools += _feature_tools(s.features)
    return tools + list(s.extra)


# -- releases (scope releases) ----------------------------------------------------------------------


def _release_tools(s: LifecycleServices) -> list[Tool]:
    from lifecycle.releases.service import public
    from lifecycle.releases.spec import ReleaseSpec

    releases = s.releases

    def list_(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = [public(r) for r in releases.store.current().values()]
        return _out(rows, f"{len(rows)} release(s)")

    def status(args: dict, ctx: ToolContext) -> ToolOutput:
        return _out(releases.report(args["name"]))

    def start(args: dict, ctx: ToolContext) -> ToolOutput:
        spec = _validated(ReleaseSpec, args["spec"], "release spec")
        return _out(public(releases.create(spec, actor=actor(ctx), reason=args.get("reason", ""))))

    def pause(args: dict, ctx: ToolContext) -> ToolOutput:
        return _out(public(releases.pause(args["name"], actor=actor(ctx), reason=args.get("reason", ""))))

    def rollback(args: dict, ctx: ToolContext) -> ToolOutput:
        return _out(public(releases.rollback(args["name"], actor=actor(ctx), reason=args.get("reason", ""))))

    async def promote(args: dict, ctx: ToolContext) -> ToolOutput:
        release = releases.get(args["name"])
        if s.serving is not None and release.spec.strategy == "bluegreen":
            done = await s.serving.switch(args["name"], actor=actor(ctx), reason=args.get("reason", ""))
        else:
            done = releases.promote(args["name"], actor=actor(ctx), reason=args.get("reason", ""))
        return _out(public(done))

    name = {"name": {**STR, "description": "The release endpoint (the model name clients call)."}}
    act = _obj({**name, "reason": REASON}, ["name"])
    spec_schema = {"type": "object", "description": "A release spec as in infra/releases/*.yaml: name, strategy "
                   "(ab, canary, shadow, bluegreen), unit, variants [{name, model | prompt | policy}], canary "
                   "{steps, min_requests, ...}, metrics [{name, margin}]."}
    return [
        LifecycleTool("release_list", "List the release endpoints with their status, strategy and traffic weights.",
                      _obj({}), list_, scope="releases", title="List releases", tags=("releases",)),
        LifecycleTool("release_status", "A release's report: status, weights, per-variant traffic, error and "
                      "guardrail-block rates, judge scores, and the controller's last decision with its reason.",
                      _obj(name, ["name"]), status, scope="releases", title="Release status", tags=("releases",)),
        LifecycleTool("release_start", "Start a release (A/B, canary, shadow or blue/green) from a spec; a canary's "
                      "or green's variant starts only once its prompt, collection, workflow and policy passed their "
                      "eval gates.", _obj({"spec": spec_schema, "reason": REASON},
                                                                  ["spec"]),
                      start, risky=True, scope="releases", read_only=False, title="Start a release",
                      tags=("releases",)),
        LifecycleTool("release_pause", "Pause a running release: weights stay where they are, the controller "
                      "stops stepping.", act, pause, scope="releases", read_only=False, title="Pause a release",
                      tags=("releases",)),
        LifecycleTool("release_promote", "Send all traffic to the release's candidate (blue/green: after its "
                      "readiness probes pass).", act, promote, risky=True, scope="releases", read_only=False,
                      title="Promote a release", tags=("releases",)),
        LifecycleTool("release_rollback", "Roll a release back: all traffic to its baseline.", act, rollback,
                      risky=True, scope="releases", read_only=False, title="Roll back a release",
                      tags=("releases",)),
    ]


# -- drift and traces (scope monitor) ---------------------------------------------------------------


def _drift_tools(monitor: Any) -> list[Tool]:
    from lifecycle.monitor.drift import ReferenceSpec

    def run(args: dict, ctx: ToolContext) -> ToolOutput:
        ref = ReferenceSpec.parse(args.get("reference") or "window")
        result = monitor.check(args.get("window_s"), ref, actor=actor(ctx), min_rows=args.get("min_rows"))
        out = result.public()
        return _out(out, f"verdict: {out.get('verdict')}")

    def list_(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = monitor.list(limit=args.get("limit", 20), verdict=args.get("verdict"))
        return _out(rows, f"{len(rows)} drift check(s), newest first")

    def get(args: dict, ctx: ToolContext) -> ToolOutput:
        return _out(monitor.get(args["check_id"]))

    return [
        LifecycleTool("drift_check", "Run a drift check now: the current window of production traffic (questions' "
                      "embeddings and lengths, answers' lengths, latency, refusals, feedback) against a reference "
                      "(window, release:NAME or suite:NAME). Returns the verdict and each test's statistic.",
                      _obj({"window_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 90 * 86400,
                                         "description": "Seconds of recent traffic (default: the settings')."},
                            "reference": {"type": "string", "maxLength": 200, "pattern": "^(window|release:.+|"
                                          "suite:.+)$", "description": "window (default), release:NAME, suite:NAME"},
                            "min_rows": {"type": "integer", "minimum": 1}}),
                      run, scope="monitor", read_only=False, title="Run a drift check", tags=("drift",)),
        LifecycleTool("drift_reports", "The latest drift checks, newest first (filter by verdict).",
                      _obj({"limit": LIMIT, "verdict": {"enum": ["drift", "no_drift", "not_enough_data"]}}),
                      list_, scope="monitor", title="Drift reports", tags=("drift",)),
        LifecycleTool("drift_report", "One drift check in full: every test, its method, statistic and threshold.",
                      _obj({"check_id": STR}, ["check_id"]), get, scope="monitor", title="Drift report",
                      tags=("drift",)),
    ]


def _trace_tools(store: Any) -> list[Tool]:
    from app.core.tracing import check_trace_id

    def search(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = store.traces(limit=args.get("limit", 20), name=args.get("name"), response_id=args.get("response_id"))
        return _out(rows, f"{len(rows)} trace(s), newest first")

    def get(args: dict, ctx: ToolContext) -> ToolOutput:
        spans = store.trace(check_trace_id(args["trace_id"]))
        if not spans:
            raise NotFound(f"no trace {args['trace_id']}", code="trace_not_found")
        return _out({"trace_id": args["trace_id"], "spans": spans}, f"{len(spans)} span(s)")

    return [
        LifecycleTool("traces_search", "Recent traces (requests, agent runs, jobs): root span, duration, span count, "
                      "errors. Filter by a span name or a chat completion id.",
                      _obj({"limit": LIMIT, "name": {"type": "string", "maxLength": 200},
                            "response_id": {"type": "string", "maxLength": 200}}),
                      search, scope="monitor", title="Search traces", tags=("traces",)),
        LifecycleTool("trace_get", "Every span of one trace with its timing, status and attributes.",
                      _obj({"trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}, ["trace_id"]), get,
                      scope="monitor", title="Get a trace", tags=("traces",)),
    ]


# -- model registry, experiments, fine-tuning (scope finetune) ----------------------------------------


def _version(v: Any) -> dict[str, Any]:
    return {"model": v.model, "version": v.version, "aliases": list(v.aliases), "run_id": v.run_id,
            "evals_state": v.tags.get("keel.evals.state"),
            "evals": {k.removeprefix("keel.eval."): _maybe_json(t) for k, t in v.tags.items()
                      if k.startswith("keel.eval.") and k != "keel.evals.state"}}


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _registry_tools(ft: Any) -> list[Tool]:
    def versions(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = [_version(v) for v in ft.versions(args["model"])]
        return _out(rows, f"{len(rows)} version(s) of {args['model']}")

    def models(args: dict, ctx: ToolContext) -> ToolOutput:
        return _out(ft.registry.models())

    def compare(args: dict, ctx: ToolContext) -> ToolOutput:
        client = ft.tracker.client
        out = []
        for ver in (args["a"], args["b"]):
            v = ft.registry.get_version(args["model"], ver)
            metrics = client.get_run(v.run_id).data.metrics if v.run_id else {}
            out.append({**_version(v), "metrics": {k: round(x, 6) for k, x in sorted(metrics.items())}})
        a, b = out
        delta = {k: round(b["metrics"][k] - a["metrics"][k], 6) for k in a["metrics"] if k in b["metrics"]}
        return _out({"a": a, "b": b, "delta_b_minus_a": delta})

    def gate(args: dict, ctx: ToolContext) -> ToolOutput:
        verdict = ft.registry.run_gate(ft.registry.get_version(args["model"], args["version"]))
        return _out(verdict.model_dump(), f"gate {'passes' if verdict.passed else 'refuses'}: {verdict.reason}")

    def promote(args: dict, ctx: ToolContext) -> ToolOutput:
        p = ft.promote(args["model"], args["version"], reason=args.get("reason"), actor=actor(ctx))
        return _out({"model": p.model, "alias": p.alias, "from_version": p.from_version, "to_version": p.to_version,
                     "changed": p.changed, "verdict": p.verdict.model_dump() if p.verdict else None})

    def rollback(args: dict, ctx: ToolContext) -> ToolOutput:
        p = ft.rollback(args["model"], actor=actor(ctx), reason=args.get("reason", ""))
        return _out({"model": p.model, "alias": p.alias, "from_version": p.from_version, "to_version": p.to_version,
                     "changed": p.changed})

    model = {"model": {**STR, "description": "A registered adapter model's name."}}
    version = {"type": ["string", "integer"], "description": "A version number."}
    return [
        LifecycleTool("model_list", "The registered adapter models.", _obj({}), models, scope="finetune",
                      title="Registered models", tags=("registry",)),
        LifecycleTool("model_versions", "A registered model's versions with their aliases (production, ...) and eval "
                      "verdicts.", _obj(model, ["model"]), versions, scope="finetune", title="Model versions",
                      tags=("registry",)),
        LifecycleTool("model_compare", "Compare two versions of a model: their training and eval metrics side by "
                      "side and the difference.", _obj({**model, "a": version, "b": version}, ["model", "a", "b"]),
                      compare, scope="finetune", title="Compare versions", tags=("registry",)),
        LifecycleTool("model_gate", "Explain the promotion gate's verdict on a version: which eval suites passed, "
                      "which are missing or failing.", _obj({**model, "version": version}, ["model", "version"]),
                      gate, scope="finetune", title="Explain a gate verdict", tags=("registry", "evals")),
        LifecycleTool("model_promote", "Move a model's production alias to a version (the eval gate must pass).",
                      _obj({**model, "version": version, "reason": REASON}, ["model", "version"]), promote,
                      risky=True, scope="finetune", read_only=False, title="Promote a version", tags=("registry",)),
        LifecycleTool("model_rollback", "Move a model's production alias back to the version before.",
                      _obj({**model, "reason": REASON}, ["model"]), rollback, risky=True, scope="finetune",
                      read_only=False, title="Roll back a model", tags=("registry",)),
    ]


def _experiment_tools(ft: Any) -> list[Tool]:
    def search(args: dict, ctx: ToolContext) -> ToolOutput:
        tracker = ft.tracker
        try:
            runs = tracker.client.search_runs([tracker.experiment_id], filter_string=args.get("filter", ""),
                                              max_results=args.get("limit", 20),
                                              order_by=[args["order_by"]] if args.get("order_by") else None)
        except Exception as e:  # MLflow's own words say what is wrong with the filter
            if type(e).__name__ == "MlflowException":
                raise ToolInputError(f"MLflow refused the search: {e}") from None
            raise
        rows = [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                 "start_time": r.info.start_time, "metrics": dict(r.data.metrics),
                 "params": {k: v for k, v in r.data.params.items() if len(v) <= 200}} for r in runs]
        return _out(rows, f"{len(rows)} run(s)")

    return [LifecycleTool(
        "experiments_search", "Search the fine-tuning experiment's MLflow runs by metric and parameter, e.g. filter "
        "\"metrics.eval_loss < 2\" order_by \"metrics.eval_loss ASC\".",
        _obj({"filter": {"type": "string", "maxLength": 500}, "order_by": {"type": "string", "maxLength": 200},
              "limit": LIMIT}), search, scope="finetune", title="Search experiments", tags=("experiments",))]


def _finetune_tools(ft: Any) -> list[Tool]:
    def submit(args: dict, ctx: ToolContext) -> ToolOutput:
        spec = ft.parse(spec=args["spec"])
        job = ft.submit(spec, submitted_by=actor(ctx))
        return _out(job.to_dict(), f"job {job.id} {job.state}")

    def status(args: dict, ctx: ToolContext) -> ToolOutput:
        job = ft.get(args["job_id"])
        data = job.to_dict()
        data.pop("data_report", None)
        return _out(data, f"job {job.id} {job.state} (step {job.step}/{job.max_steps})")

    def list_(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = [{"id": j.id, "name": j.name, "state": j.state, "model_name": j.model_name,
                 "model_version": j.model_version, "evals_state": j.evals_state, "created_at": j.created_at}
                for j in ft.list(state=args.get("state"), limit=args.get("limit", 20))]
        return _out(rows, f"{len(rows)} job(s)")

    def cancel(args: dict, ctx: ToolContext) -> ToolOutput:
        job = ft.cancel(args["job_id"], actor=actor(ctx))
        return _out({"id": job.id, "state": job.state, "cancel_requested": job.cancel_requested})

    job_id = {"job_id": STR}
    return [
        LifecycleTool("finetune_submit", "Submit a LoRA fine-tuning job from a spec (as in finetune/jobs/*.yaml: "
                      "name, base_model, data, lora, training, register, evals).",
                      _obj({"spec": {"type": "object"}}, ["spec"]), submit, risky=True, scope="finetune",
                      read_only=False, title="Submit a fine-tuning job", tags=("finetune",)),
        LifecycleTool("finetune_status", "A fine-tuning job's state, progress, metrics and registered version.",
                      _obj(job_id, ["job_id"]), status, scope="finetune", title="Fine-tuning job status",
                      tags=("finetune",)),
        LifecycleTool("finetune_jobs", "Recent fine-tuning jobs, newest first.",
                      _obj({"state": {"enum": ["queued", "running", "succeeded", "failed", "cancelled"]},
                            "limit": LIMIT}), list_, scope="finetune", title="Fine-tuning jobs", tags=("finetune",)),
        LifecycleTool("finetune_cancel", "Cancel a queued or running fine-tuning job.", _obj(job_id, ["job_id"]),
                      cancel, risky=True, scope="finetune", read_only=False, title="Cancel a fine-tuning job",
                      tags=("finetune",)),
    ]


# -- the feature store (scope finetune) ----------------------------------------------------------------


def _feature_tools(features: Any) -> list[Tool]:
    def views(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = features.views()
        return _out(rows, f"{len(rows)} feature view(s)")

    def online(args: dict, ctx: ToolContext) -> ToolOutput:
        keys = {k: args[k] for k in ("user", "document") if args.get(k)}
        return _out(features.online(args["features"], keys))

    def historical(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = features.historical(args["features"], args["rows"])
        return _out(rows, f"{len(rows)} row(s), values as of each row's event_timestamp")

    def materialize(args: dict, ctx: ToolContext) -> ToolOutput:
        out = features.materialize()
        return _out(out, "online store loaded: " + ", ".join(f"{k} {v} rows" for k, v in out["exported"].items()))

    refs = {"type": "array", "minItems": 1, "maxItems": 50, "items": {
        "type": "string", "pattern": "^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$",
        "description": "view:feature, e.g. user_stats:feedback_rate"}}
    row = {"type": "object", "properties": {"user_id": STR, "doc_id": STR, "event_timestamp": {
        "type": ["string", "number"], "description": "ISO 8601 or unix seconds"}}, "required": ["event_timestamp"]}
    return [
        LifecycleTool("features_views", "The feature store's views: entities, features and versions.", _obj({}),
                      views, scope="finetune", title="Feature views", tags=("features",)),
        LifecycleTool("features_online", "Newest feature values for a user (an API key id) and/or a document id.",
                      _obj({"features": refs, "user": STR, "document": STR}, ["features"]), online,
                      scope="finetune", title="Online features", tags=("features",)),
        LifecycleTool("features_historical", "Feature values as they were at each row's event_timestamp "
                      "(point-in-time join; for training and eval sets).",
                      _obj({"features": refs, "rows": {"type": "array", "minItems": 1, "maxItems": 1000,
                                                       "items": row}}, ["features", "rows"]),
                      historical, scope="finetune", title="Historical features", tags=("features",)),
        LifecycleTool("features_materialize", "Export Keel's data as feature rows and load the newest values into "
                      "the online store.", _obj({}), materialize, risky=True, scope="finetune", read_only=False,
                      title="Materialize features", tags=("features",)),
    ]


# -- continuous training (scope finetune) ------------------------------------------------------------


def _pipeline_tools(pipelines: Any) -> list[Tool]:
    def list_(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = pipelines.summaries()
        return _out(rows, f"{len(rows)} pipeline(s)")

    def runs(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = [r.public(logs=False) for r in pipelines.list(pipeline=args.get("pipeline"), state=args.get("state"),
                                                              limit=args.get("limit", 20))]
        return _out(rows, f"{len(rows)} run(s), newest first")

    def run(args: dict, ctx: ToolContext) -> ToolOutput:
        r = pipelines.get(args["run_id"])
        return _out(r.public(), f"run {r.id} of {r.pipeline}: {r.state}" + (f" ({r.outcome})" if r.outcome else "")
                    + (f", at {r.current_step}" if not r.finished else ""))

    async def start(args: dict, ctx: ToolContext) -> ToolOutput:
        r = await pipelines.start(args["pipeline"], actor=actor(ctx), reason=args.get("reason", ""),
                                  can_release=ctx.allows("releases"))
        return _out(r.public(logs=False), f"run {r.id} of {r.pipeline} started")

    name = {"type": "string", "minLength": 1, "maxLength": 63, "description": "A pipeline's name."}
    return [
        LifecycleTool("pipeline_list", "Continuous-training pipelines: what each retrains, its triggers, canary and "
                      "approval, and its last run.", _obj({}), list_, scope="finetune", title="Pipelines",
                      tags=("pipeline", "finetune")),
        LifecycleTool("pipeline_runs", "Recent pipeline runs, newest first: state, outcome, the step each is at.",
                      _obj({"pipeline": name, "state": {"enum": ["queued", "running", "waiting", "succeeded",
                                                                 "failed", "cancelled"]}, "limit": LIMIT}),
                      runs, scope="finetune", title="Pipeline runs", tags=("pipeline", "finetune")),
        LifecycleTool("pipeline_run", "One pipeline run: every step's state, log and artifacts (dataset snapshot, "
                      "fine-tuning job, eval gate, canary, promotion).",
                      _obj({"run_id": STR}, ["run_id"]), run, scope="finetune", title="A pipeline run",
                      tags=("pipeline", "finetune")),
        LifecycleTool("pipeline_start", "Start a run of a continuous-training pipeline now (retrain, gate, canary; "
                      "a pipeline with approval: required waits for a person before it promotes).",
                      _obj({"pipeline": name, "reason": STR}, ["pipeline"]), start, risky=True, scope="finetune",
                      read_only=False, title="Start a pipeline run", tags=("pipeline", "finetune")),
    ]


# -- evals (scope evals) --------------------------------------------------------------------------


def _eval_tools(s: LifecycleServices) -> list[Tool]:
    store = s.eval_store

    def results(args: dict, ctx: ToolContext) -> ToolOutput:
        if args.get("run_id"):
            run = store.get_run(args["run_id"]).public()
            return _out(run, f"run {run['id']}: {run['status']}, passed={run.get('passed')}")
        rows = [{k: v for k, v in r.public().items() if k != "summary"}
                for r in store.list_runs(suite=args.get("suite"), limit=args.get("limit", 20))]
        return _out(rows, f"{len(rows)} run(s), newest first")

    def explain(args: dict, ctx: ToolContext) -> ToolOutput:
        run = store.get_run(args["run_id"]).public()
        verdict = run.get("verdict") or {}
        metrics = (run.get("summary") or {}).get("metrics") or {}
        failing = {k: metrics.get(k) for k in verdict.get("failing_metrics") or []}
        why = "; ".join(verdict.get("reasons") or []) or ("every threshold met" if run.get("passed") else run["status"])
        return _out({"run_id": run["id"], "suite": run["suite"], "status": run["status"], "passed": run.get("passed"),
                     "reasons": verdict.get("reasons") or [], "failing_metrics": failing,
                     "regressions": verdict.get("regressions") or [], "pass_rate": verdict.get("pass_rate")},
                    f"run {run['id']} {'passed' if run.get('passed') else 'did not pass'}: {why}")

    tools: list[Tool] = [
        LifecycleTool("eval_results", "Eval runs, newest first (filter by suite), or one run's summary and verdict "
                      "with run_id.", _obj({"run_id": STR, "suite": STR, "limit": LIMIT}), results, scope="evals",
                      title="Eval results", tags=("evals",)),
        LifecycleTool("eval_explain", "Explain an eval run's gate verdict: which metric thresholds or baseline "
                      "comparisons failed, by how much.", _obj({"run_id": STR}, ["run_id"]), explain, scope="evals",
                      title="Explain an eval verdict", tags=("evals",)),
    ]
    if s.eval_suites is not None:
        suites = s.eval_suites

        def list_suites(args: dict, ctx: ToolContext) -> ToolOutput:
            return _out(suites())

        tools.append(LifecycleTool("eval_suites", "The eval suites this server can run, with their targets.",
                                   _obj({}), list_suites, scope="evals", title="Eval suites", tags=("evals",)))
    if s.submit_eval is not None:
        submit_eval = s.submit_eval

        async def run(args: dict, ctx: ToolContext) -> ToolOutput:
            started = await submit_eval(args["suite"], baseline=args.get("baseline"), owner=ctx.principal)
            return _out(started, f"eval job {started['job_id']} started; read results with eval_results")

        tools.append(LifecycleTool("eval_run", "Run an eval suite in the background (a durable job); its run "
                                   "appears in eval_results.", _obj({"suite": STR, "baseline": STR}, ["suite"]), run,
                                   scope="evals", read_only=False, title="Run an eval suite", tags=("evals",)))
    return tools


# -- data: ingest snapshots (scope ingest), a fine-tuning dataset's contract (scope finetune) ----------------


def _data_tools(snapshots: Any, ft: Any) -> list[Tool]:
    tools: list[Tool] = []
    if snapshots is not None:
        def list_(args: dict, ctx: ToolContext) -> ToolOutput:
            rows = [x.model_dump() for x in snapshots.list(args.get("collection"), args.get("limit", 20))]
            return _out(rows, f"{len(rows)} snapshot(s), newest first")

        def diff(args: dict, ctx: ToolContext) -> ToolOutput:
            if args["base"] == args["target"]:
                raise ToolInputError("base and target are the same snapshot")
            d = snapshots.diff(args["base"], args["target"]).model_dump()
            return _out(d)

        sid = {"type": "string", "minLength": 1, "maxLength": 200, "description": "A snapshot id."}
        tools += [
            LifecycleTool("data_snapshots", "Ingest snapshots of the document collections (what was indexed when, "
                          "with counts and hashes), newest first.",
                          _obj({"collection": STR, "limit": LIMIT}), list_, scope="ingest", title="Data snapshots",
                          tags=("data",)),
            LifecycleTool("data_diff", "What changed between two ingest snapshots: documents added, removed and "
                          "changed.", _obj({"base": sid, "target": sid}, ["base", "target"]), diff, scope="ingest",
                          title="Diff data snapshots", tags=("data",)),
        ]
    if ft is not None:
        def contract(args: dict, ctx: ToolContext) -> ToolOutput:
            spec = ft.parse(spec=args["spec"])
            ft.check_data_location(spec)
            try:
                report = ft.validate(spec)
            except KeelError as e:  # the contract failed: the report is the answer, not an error
                report = getattr(e, "report", None)
                if report is None:
                    raise
                report = report.to_dict()
            return _out(report, f"dataset {'passes' if report.get('ok') else 'FAILS'} its contract")

        tools.append(LifecycleTool(
            "data_contract", "Check a fine-tuning dataset against its contract (every record's shape, roles, "
            "lengths in the base model's tokens, duplicates) without training: the job spec as for finetune_submit.",
            _obj({"spec": {"type": "object"}}, ["spec"]), contract, scope="finetune",
            title="Check a dataset's contract", tags=("data", "finetune")))
    return tools


# -- prompts (scopes prompts:read, prompts:write) ----------------------------------------------------


def _prompt_tools(prompts: Any) -> list[Tool]:
    def list_(args: dict, ctx: ToolContext) -> ToolOutput:
        rows = [{"name": t.name, "description": t.description, "latest_version": t.latest_version,
                 "labels": t.labels} for t in prompts.list_templates(args.get("query"))]
        return _out(rows, f"{len(rows)} template(s)")

    def versions(args: dict, ctx: ToolContext) -> ToolOutput:
        labels = prompts.labels(args["name"])
        by_version: dict[int, list[str]] = {}
        for label, v in labels.items():
            by_version.setdefault(v, []).append(label)
        rows = [{"ref": v.ref, "version": v.version, "hash": v.hash, "labels": sorted(by_version.get(v.version, [])),
                 "author": v.author, "message": v.message, "created_at": v.created_at}
                for v in prompts.versions(args["name"])]
        return _out(rows, f"{len(rows)} version(s) of {args['name']}")

    def diff(args: dict, ctx: ToolContext) -> ToolOutput:
        d = prompts.diff(args["name"], args["from_ref"], args["to_ref"])
        return _out({"from": d.from_ref, "to": d.to_ref, "changed": d.changed, "diff": d.diff})

    def gate(args: dict, ctx: ToolContext) -> ToolOutput:
        verdict = prompts.check_gate(args["name"], int(args["version"]))
        return _out(verdict.model_dump(), f"gate {'passes' if verdict.passed else 'refuses'}: {verdict.reason}")

    def promote(args: dict, ctx: ToolContext) -> ToolOutput:
        move = prompts.move_label(args["name"], args.get("label", "production"), int(args["version"]),
                                  actor=actor(ctx))
        return _out({"name": move.name, "label": move.label, "from_version": move.from_version,
                     "to_version": move.to_version, "changed": move.changed,
                     "verdict": move.verdict.model_dump() if move.verdict else None})

    name = {"name": {**STR, "description": "The template's name."}}
    version = {"type": "integer", "minimum": 1}
    ref = {"type": "string", "minLength": 1, "maxLength": 100, "description": "A version number or a label."}
    return [
        LifecycleTool("prompt_list", "The prompt templates (optionally matching a query) with their latest version "
                      "and labels.", _obj({"query": {"type": "string", "maxLength": 200}}), list_,
                      scope="prompts:read", title="Prompt templates", tags=("prompts",)),
        LifecycleTool("prompt_versions", "A prompt template's versions with their labels, authors and messages.",
                      _obj(name, ["name"]), versions, scope="prompts:read", title="Prompt versions",
                      tags=("prompts",)),
        LifecycleTool("prompt_diff", "A unified diff between two versions (or labels) of a prompt template.",
                      _obj({**name, "from_ref": ref, "to_ref": ref}, ["name", "from_ref", "to_ref"]), diff,
                      scope="prompts:read", title="Diff prompt versions", tags=("prompts",)),
        LifecycleTool("prompt_gate", "Explain the promotion gate's verdict on a prompt version (its eval runs).",
                      _obj({**name, "version": version}, ["name", "version"]), gate, scope="prompts:read",
                      title="Explain a prompt gate verdict", tags=("prompts", "evals")),
        LifecycleTool("prompt_promote", "Point a label (default production) at a prompt version; protected labels "
                      "need the eval gate to pass.",
                      _obj({**name, "version": version, "label": {"type": "string", "maxLength": 100},
                            "reason": REASON}, ["name", "version"]), promote, risky=True, scope="prompts:write",
                      read_only=False, title="Promote a prompt version", tags=("prompts",)),
    ]

