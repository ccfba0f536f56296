"""The monitoring assets (infra/prometheus, infra/grafana, infra/monitoring.md) against the metrics Keel and vLLM
really export.

Every PromQL expression (alert rules, dashboard panels, dashboard variables) is parsed with a real PromQL parser
(``promql-parser``, Rust bindings of GreptimeDB's parser, compatible with Prometheus 2.45), then its syntax tree is
walked: every series must be a metric registered in Keel's code (found by reading the source of every package, and
cross-checked with the collectors ``Metrics`` and ``GuardrailMetrics`` register) or a vLLM metric, with the series
suffix its type exposes (``_total`` for counters, ``_bucket``/``_sum``/``_count`` for histograms); and every label a
matcher, ``by``/``without``, ``on``/``ignoring``/``group_left``, ``histogram_quantile``'s ``le`` or an alert
annotation's ``$labels.x`` uses must exist where it is used (labels are propagated through aggregations, functions
and binary operations, so ``sum by (route) (...)`` of a metric without ``route`` fails). ``promtool check`` runs too
where ``promtool`` is on the PATH.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

pql = pytest.importorskip("promql_parser", reason="promql-parser is a dev dependency (PromQL syntax checks)")

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "infra/prometheus/alerts.yaml"
PROM_CONFIG = ROOT / "infra/prometheus/prometheus.yml"
DASHBOARD = ROOT / "infra/grafana/keel-dashboard.json"
DOC = ROOT / "infra/monitoring.md"
PACKAGES = ("app", "agents", "ingest", "finetune", "lifecycle", "evals", "prompts")

TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus to every scraped series
SEVERITIES = {"critical", "warning", "info"}
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRAFANA_BUILTINS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}
RATE_FUNCS = {"rate", "irate", "increase", "resets"}

# vLLM's metrics the assets may use (vllm/v1/metrics/loggers.py); checked against the installed vLLM below.
_VLLM_BASE = frozenset({"model_name", "engine"})
VLLM_METRICS = {
    "vllm:num_requests_running": ("gauge", _VLLM_BASE),
    "vllm:num_requests_waiting": ("gauge", _VLLM_BASE),
    "vllm:kv_cache_usage_perc": ("gauge", _VLLM_BASE),
    "vllm:prompt_tokens": ("counter", _VLLM_BASE),
    "vllm:generation_tokens": ("counter", _VLLM_BASE),
    "vllm:num_preemptions": ("counter", _VLLM_BASE),
    "vllm:request_success": ("counter", _VLLM_BASE | {"finished_reason"}),
    "vllm:time_to_first_token_seconds": ("histogram", _VLLM_BASE),
    "vllm:e2e_request_latency_seconds": ("histogram", _VLLM_BASE),
    "vllm:request_queue_time_seconds": ("histogram", _VLLM_BASE),
    "vllm:inter_token_latency_seconds": ("histogram", _VLLM_BASE),
}


# ------------------------------------------------------------------------------------------------ metric catalogue


@dataclass(frozen=True)
class Metric:
    name: str  # the family name: a counter's without _total
    type: str  # counter, gauge, histogram, summary
    labels: frozenset[str]


def _family(name: str, type_: str) -> str:
    return name.removesuffix("_total") if type_ == "counter" else name


def _literal_strings(node: ast.expr | None) -> list[str] | None:
    if isinstance(node, ast.List | ast.Tuple) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts):
        return [e.value for e in node.elts]  # type: ignore[attr-defined]
    return None


def scan_source_metrics() -> dict[str, Metric]:
    """Every ``Counter/Gauge/Histogram/Summary("keel_...", doc, [labels])`` in Keel's packages."""
    kinds = {"Counter": "counter", "Gauge": "gauge", "Histogram": "histogram", "Summary": "summary"}
    found: dict[str, Metric] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if not re.search(r"\b(Counter|Gauge|Histogram|Summary)\(", text) or "keel_" not in text:
                continue
            for node in ast.walk(ast.parse(text, filename=str(path))):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func not in kinds or not node.args or not isinstance(node.args[0], ast.Constant):
                    continue
                name = node.args[0].value
                if not isinstance(name, str) or not name.startswith("keel_"):
                    continue
                kw = {k.arg: k.value for k in node.keywords}
                raw = node.args[2] if len(node.args) > 2 else kw.get("labelnames")
                labels = _literal_strings(raw) if raw is not None else []
                assert labels is not None, f"{path}:{node.lineno}: {name}: label names must be a literal list"
                m = Metric(_family(name, kinds[func]), kinds[func], frozenset(labels))
                assert found.get(m.name, m) == m, f"{name} registered twice with different labels"
                found[m.name] = m
    return found


def registered_metrics() -> dict[str, Metric]:
    """What the application's registry holds (core and guardrail collectors)."""
    from app.core.metrics import Metrics
    from app.guardrails.metrics import GuardrailMetrics

    metrics = Metrics()
    guards = GuardrailMetrics(metrics.registry)
    out: dict[str, Metric] = {}
    for holder in (metrics, guards):
        for collector in vars(holder).values():
            if hasattr(collector, "_labelnames") and hasattr(collector, "_type"):
                out[collector._name] = Metric(collector._name, collector._type, frozenset(collector._labelnames))
    names = {family.name for family in metrics.registry.collect()}
    assert names == set(out), "the registry holds collectors the test does not see"
    return out


def installed_vllm_loggers() -> Path | None:
    found = sorted(ROOT.glob(".venv-vllm/lib/python*/site-packages/vllm/v1/metrics/loggers.py"))
    return found[0] if found else None


def scan_vllm_metrics(path: Path) -> dict[str, Metric]:
    """``self._gauge_cls(name="vllm:...", labelnames=labelnames + [...])`` calls of vLLM's Prometheus logger."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base: list[str] | None = None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id == "labelnames" and _literal_strings(node.value)):
            base = _literal_strings(node.value)
    assert base, "vLLM's base label names not found"
    out: dict[str, Metric] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        kind = {"_gauge_cls": "gauge", "_counter_cls": "counter", "_histogram_cls": "histogram"}.get(node.func.attr)
        kw = {k.arg: k.value for k in node.keywords}
        name = kw.get("name")
        if kind is None or not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            continue
        raw = kw.get("labelnames")
        if isinstance(raw, ast.Name) and raw.id == "labelnames":
            labels = list(base)
        elif isinstance(raw, ast.BinOp) and isinstance(raw.left, ast.Name) and raw.left.id == "labelnames":
            labels = base + (_literal_strings(raw.right) or [])
        else:
            labels = _literal_strings(raw) or []
        out[name.value] = Metric(_family(name.value, kind), kind, frozenset(labels))
    return out


@pytest.fixture(scope="module")
def catalogue() -> dict[str, Metric]:
    keel = scan_source_metrics()
    vllm = {name: Metric(name, kind, labels) for name, (kind, labels) in VLLM_METRICS.items()}
    return keel | vllm


# ------------------------------------------------------------------------------------------------ PromQL checks


SCALAR = "scalar"


@dataclass
class Check:
    """Walks a parsed expression: the labels each node's result carries, and every mistake found."""

    catalogue: dict[str, Metric]
    errors: list[str] = field(default_factory=list)
    metrics: set[str] = field(default_factory=set)
    selectors: list[tuple[str, list]] = field(default_factory=list)  # (series, matchers)

    def series(self, name: str) -> tuple[Metric, str] | None:
        for suffix in ("_bucket", "_sum", "_count", "_total", ""):
            if not name.endswith(suffix):
                continue
            m = self.catalogue.get(name.removesuffix(suffix) if suffix else name)
            if m is None:
                continue
            exposed = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                       "summary": ("_sum", "_count", ""), "gauge": ("",)}[m.type]
            if suffix in exposed:
                return m, suffix
        return None

    def selector(self, vs) -> frozenset[str]:
        name = vs.name
        if name is None:
            self.errors.append(f"selector without a metric name: {vs}")
            return frozenset()
        found = self.series(name)
        if found is None:
            self.errors.append(f"{name}: no such series (Keel registers no such metric, vLLM exports none, "
                               "or the _total/_bucket/_sum/_count suffix does not fit its type)")
            return frozenset()
        metric, suffix = found
        self.metrics.add(metric.name)
        labels = metric.labels | TARGET_LABELS | ({"le"} if suffix == "_bucket" else set())
        matchers = list(vs.matchers.matchers) + [m for group in vs.matchers.or_matchers for m in group]
        for m in matchers:
            if m.name != "__name__" and m.name not in labels:
                self.errors.append(f"{name}: matcher on label {m.name!r}, which it does not have ({sorted(labels)})")
        self.selectors.append((name, matchers))
        return frozenset(labels)

    def selectors_under(self, node) -> list[str]:
        names: list[str] = []

        def visit(n):
            if isinstance(n, pql.VectorSelector) and n.name:
                names.append(n.name)
        pql.walk(node, visit)
        return names

    def labels(self, node) -> frozenset[str] | str:
        """The label names of the node's result, or SCALAR for a number or string."""
        if isinstance(node, pql.NumberLiteral | pql.StringLiteral):
            return SCALAR
        if isinstance(node, pql.VectorSelector):
            return self.selector(node)
        if isinstance(node, pql.MatrixSelector):
            return self.selector(node.vector_selector)
        if isinstance(node, pql.ParenExpr | pql.UnaryExpr | pql.SubqueryExpr):
            return self.labels(node.expr)
        if isinstance(node, pql.Call):
            return self.call(node)
        if isinstance(node, pql.AggregateExpr):
            return self.aggregate(node)
        if isinstance(node, pql.BinaryExpr):
            return self.binary(node)
        self.errors.append(f"unexpected node {type(node).__name__}: {node}")
        return frozenset()

    def call(self, node):
        name = node.func.name
        args = [self.labels(a) for a in node.args]
        if name in RATE_FUNCS:
            for series in self.selectors_under(node.args[0]):
                found = self.series(series)
                if found and found[0].type == "gauge":
                    self.errors.append(f"{name}() of gauge {series}: use a counter or *_over_time()")
        if name == "histogram_quantile":
            inner = args[1]
            if not any(s.endswith("_bucket") for s in self.selectors_under(node.args[1])):
                self.errors.append("histogram_quantile() over no _bucket series")
            if inner == SCALAR or "le" not in inner:
                self.errors.append(f"histogram_quantile() over a vector without 'le' ({node})")
                return frozenset()
            return inner - {"le"}
        if name in {"label_replace", "label_join"}:
            dst = node.args[1].val
            sources = [a.val for a in node.args[3:]] if name == "label_join" else [node.args[3].val]
            for src in filter(None, sources):
                if src not in args[0]:
                    self.errors.append(f"{name}(): source label {src!r} is not on its vector")
            return args[0] | {dst}
        if str(node.func.return_type) in {"ValueType.Scalar", "Scalar"}:
            return SCALAR
        if name in {"vector", "time", "absent", "absent_over_time"}:
            return frozenset()
        vectors = [a for a in args if a != SCALAR]
        return vectors[0] if vectors else frozenset()

    def aggregate(self, node):
        op = str(node.op)
        inner = self.labels(node.expr)
        if node.param is not None:
            self.labels(node.param)
        if inner == SCALAR:
            self.errors.append(f"{op} over a scalar")
            return frozenset()
        named = list(node.modifier.labels) if node.modifier is not None else []
        for label in named:
            if label not in inner:
                self.errors.append(f"{op} by/without {label!r}: not a label of {node.expr} ({sorted(inner)})")
        if op in {"topk", "bottomk", "limitk", "limit_ratio"}:
            return inner
        if node.modifier is None:
            out = frozenset()
        elif str(node.modifier.type).endswith("Without"):
            out = inner - set(named)
        else:
            out = frozenset(named)
        if op == "count_values":
            out |= {node.param.val}
        return out

    def binary(self, node):
        lhs, rhs = self.labels(node.lhs), self.labels(node.rhs)
        if lhs == SCALAR and rhs == SCALAR:
            return SCALAR
        if lhs == SCALAR or rhs == SCALAR:
            return rhs if lhs == SCALAR else lhs
        op, mod = str(node.op), node.modifier
        matching = mod.matching if mod is not None else None
        card = str(mod.card).rpartition(".")[2] if mod is not None else "OneToOne"
        if matching is not None:
            for label in matching.labels:
                if str(matching.type).endswith("Include") and (label not in lhs or label not in rhs):
                    self.errors.append(f"on({label}): not on both sides of {op} ({sorted(lhs)} vs {sorted(rhs)})")
        one_side = {"ManyToOne": rhs, "OneToMany": lhs}.get(card)
        if one_side is not None:
            for label in mod.group_labels or []:
                if label not in one_side:
                    self.errors.append(f"group_left/right({label}): not on the 'one' side of {op}")
        elif op != "or":
            # One-to-one matching (and and/unless): without on(), series match on all their labels.
            if matching is None:
                keys_l, keys_r = lhs, rhs
            elif str(matching.type).endswith("Include"):
                keys_l = keys_r = frozenset()
            else:
                keys_l, keys_r = lhs - set(matching.labels), rhs - set(matching.labels)
            if keys_l != keys_r:
                self.errors.append(f"'{op}' matches nothing: its sides carry different labels "
                                   f"({sorted(lhs)} vs {sorted(rhs)}); aggregate both the same way or use on()")
        if op == "or":
            return lhs | rhs
        if op in {"and", "unless"}:
            return lhs
        if card == "OneToOne" and matching is not None:  # Prometheus keeps only the on() labels, drops ignoring()'s
            return frozenset(matching.labels) if str(matching.type).endswith("Include") else lhs - set(matching.labels)
        return rhs if card == "OneToMany" else lhs


def check(expr: str, catalogue: dict[str, Metric]) -> tuple[Check, object]:
    """Parse (a syntax error fails the test) and check one expression; returns the checker and its labels."""
    try:
        tree = pql.parse(expr)
    except Exception as exc:  # the parser raises ValueError (or a Rust-side error) with the position
        pytest.fail(f"PromQL does not parse: {exc}\n{expr}")
    c = Check(catalogue)
    out = c.labels(tree)
    return c, out


# ------------------------------------------------------------------------------------------------ loaders


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert set(doc) == {"groups"}, "a rule file holds only 'groups'"
    names = [g["name"] for g in doc["groups"]]
    assert len(names) == len(set(names)), "rule group names must be unique"
    return [dict(rule, group=g["name"]) for g in doc["groups"] for rule in g["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(dash: dict) -> Iterator[dict]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside collapsed rows


def _variables(dash: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dash["templating"]["list"]}


_VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)(?::\w+)?\}|([A-Za-z_]\w*))")


def grafana_to_promql(expr: str) -> str:
    """Grafana's built-in interval variables become durations; dashboard variables stay in label values."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    return expr


# ------------------------------------------------------------------------------------------------ catalogue tests


def test_source_scan_finds_exactly_what_the_registry_holds() -> None:
    scanned, registered = scan_source_metrics(), registered_metrics()
    assert {k: v for k, v in scanned.items() if k in registered} == registered
    assert set(registered) <= set(scanned)


def test_catalogue_matches_what_metrics_really_exposes(catalogue: dict[str, Metric]) -> None:
    """Every series the app's /metrics renders (one sample per collector) resolves, with its labels, through the
    same suffix and label rules the checks below apply to queries."""
    from prometheus_client.parser import text_string_to_metric_families

    from app.core.metrics import Metrics
    from app.guardrails.metrics import GuardrailMetrics

    metrics = Metrics()
    guards = GuardrailMetrics(metrics.registry)
    for holder in (metrics, guards):
        for collector in vars(holder).values():
            if not hasattr(collector, "_labelnames"):
                continue
            child = collector.labels(*["x"] * len(collector._labelnames)) if collector._labelnames else collector
            {"counter": lambda c: c.inc(), "gauge": lambda c: c.set(1), "histogram": lambda c: c.observe(0.1)}[
                collector._type](child)
    seen = set()
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus_client's creation timestamps: never queried here
            c = Check(catalogue)
            labels = c.selector(pql.parse(sample.name))
            assert c.errors == [], c.errors
            assert set(sample.labels) | TARGET_LABELS == labels, (sample.name, sample.labels, labels)
            seen.add(c.series(sample.name)[0].name)
    assert seen == set(registered_metrics())


def test_vllm_metrics_exist_in_the_installed_vllm() -> None:
    path = installed_vllm_loggers()
    if path is None:
        pytest.skip("no .venv-vllm here (make setup installs it)")
    installed = scan_vllm_metrics(path)
    for name, (kind, labels) in VLLM_METRICS.items():
        assert name in installed, f"{name}: not a metric of the installed vLLM ({path})"
        m = installed[name]
        assert (m.type, m.labels) == (kind, labels), f"{name}: vLLM has {m.type} {sorted(m.labels)}"


@pytest.mark.parametrize(("expr", "error"), [
    ("keel_errors", "no such series"),  # a counter's series ends in _total
    ("keel_http_request_duration_seconds", "no such series"),  # a histogram's series are _bucket/_sum/_count
    ("keel_backend_up_total", "no such series"),
    ("keel_nope_total", "no such series"),
    ("vllm:gpu_cache_usage_perc", "no such series"),  # removed in vLLM's V1 engine
    ('keel_errors_total{model="x"}', "matcher on label 'model'"),
    ("sum by (route) (rate(keel_errors_total[5m]))", "by/without 'route'"),
    ("sum by (le) (rate(keel_http_request_duration_seconds_count[5m]))", "by/without 'le'"),
    ("histogram_quantile(0.9, sum by (route) (rate(keel_http_request_duration_seconds_bucket[5m])))", "'le'"),
    ("rate(keel_backend_up[5m])", "of gauge"),
    ("sum by (stage) (rate(keel_guardrail_decisions_total[5m])) / sum(rate(keel_guardrail_decisions_total[5m]))",
     "matches nothing"),
    ("keel_backend_up * on (model) keel_circuit_open", "on(model)"),
    ('sum by (model) (keel_chat_tokens_total) and on (model) sum by (backend) (keel_backend_up)', "on(model)"),
    ("sum by (route) (keel_backend_up * on (backend) keel_circuit_open)", "by/without 'route'"),
    ("keel_backend_up * on (backend) group_left (route) keel_circuit_open", "group_left/right(route)"),
])
def test_the_checker_catches_mistakes(expr: str, error: str, catalogue: dict[str, Metric]) -> None:
    c, _ = check(expr, catalogue)
    assert any(error in e for e in c.errors), c.errors


def test_a_syntax_error_fails(catalogue: dict[str, Metric]) -> None:
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check("histogram_quantile(0.9, sum by (le) (rate(keel_errors_total[5m]))) by (route)", catalogue)


def test_variables_must_match_the_label_they_list(catalogue: dict[str, Metric]) -> None:
    labels = {"model": "model", "vllm_model": "model_name"}
    for expr, error in [('vllm:num_requests_running{model_name=~"$model"}', "lists 'model' values"),
                        ('keel_chat_tokens_total{model="$model"}', "needs =~"),
                        ('keel_chat_tokens_total{model=~"$nope"}', "unknown variable"),
                        ('vllm:num_requests_running{model_name=~"$vllm_model"}', None)]:
        c, _ = check(expr, catalogue)
        problems = _variable_use("test", c, labels)
        assert any(error in p for p in problems) if error else problems == [], (expr, problems)


def test_the_checker_accepts_correct_queries(catalogue: dict[str, Metric]) -> None:
    for expr in [
        "histogram_quantile(0.95, sum by (le, route) (rate(keel_http_request_duration_seconds_bucket[5m])))",
        "sum by (stage) (rate(keel_guardrail_decisions_total{outcome=\"blocked\"}[5m])) "
        "/ sum by (stage) (rate(keel_guardrail_decisions_total[5m])) > 0.1",
        "keel_backend_up * on (backend, instance) group_left keel_circuit_open",
        "sum by (backend) (keel_backend_up * on (backend, instance, job) keel_circuit_open)",
        'label_replace(keel_backend_up, "b", "$1", "backend", "(.*)")',
        "max by (model_name) (vllm:kv_cache_usage_perc) > 0.9",
    ]:
        c, _ = check(expr, catalogue)
        assert c.errors == [], (expr, c.errors)


# ------------------------------------------------------------------------------------------------ alert rules


def test_alert_rules_are_complete(rules: list[dict]) -> None:
    assert rules
    names = [r.get("alert") for r in rules]
    assert all(names), "this file holds alerting rules only (recording rules elsewhere)"
    assert len(names) == len(set(names)), "alert names must be unique"
    for r in rules:
        where = f"{r['group']}/{r['alert']}"
        assert set(r) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations", "group"}, where
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", r["alert"]), f"{where}: alert names are CamelCase"
        assert isinstance(r.get("for"), str), f"{where}: needs 'for'"
        assert pql.parse_duration(r["for"]) > timedelta(0), f"{where}: 'for' must be positive"
        assert r.get("labels", {}).get("severity") in SEVERITIES, f"{where}: labels.severity in {SEVERITIES}"
        ann = r.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert isinstance(ann.get(key), str) and ann[key].strip(), f"{where}: needs annotations.{key}"


def test_alert_expressions_parse_and_use_real_metrics_and_labels(rules: list[dict], catalogue) -> None:
    problems = []
    for r in rules:
        c, out = check(r["expr"], catalogue)
        problems += [f"{r['alert']}: {e}" for e in c.errors]
        if out == SCALAR:
            problems.append(f"{r['alert']}: a scalar expression never fires")
            continue
        for key, text in r["annotations"].items():
            assert text.count("{{") == text.count("}}"), f"{r['alert']}.{key}: unbalanced template braces"
            for label in re.findall(r"\$labels\.(\w+)", text):
                if label not in out:
                    problems.append(f"{r['alert']}.{key}: $labels.{label} is not on the alert ({sorted(out)})")
    assert problems == [], "\n".join(problems)


def test_alert_runbooks_point_at_sections_of_the_doc(rules: list[dict]) -> None:
    anchors = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", DOC.read_text(encoding="utf-8"), flags=re.M)}
    for r in rules:
        runbook = r["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert (ROOT / path).resolve() == DOC.resolve(), f"{r['alert']}: runbook {runbook}"
        assert anchor in anchors, f"{r['alert']}: no section #{anchor} in {DOC.name}"


def test_drift_placeholder_is_left_for_later() -> None:
    text = ALERTS.read_text(encoding="utf-8")
    assert "keel_drift_" in text


def test_prometheus_config_scrapes_keel_and_vllm_and_loads_the_rules() -> None:
    cfg = yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) >= {"keel", "vllm"}
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert all(re.fullmatch(r"[\w.\-]+:\d+", t) for sc in job["static_configs"] for t in sc["targets"])
    for rule_file in cfg["rule_files"]:
        assert (PROM_CONFIG.parent / rule_file).resolve() == ALERTS.resolve()


# ------------------------------------------------------------------------------------------------ dashboard


def test_dashboard_structure(dashboard: dict) -> None:
    d = dashboard
    assert d["schemaVersion"] >= 39
    assert d["uid"] and d["title"] and d.get("id") is None
    inputs = {i["name"]: i for i in d["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ds_var = _variables(d)["DS_PROMETHEUS"]  # file provisioning has no inputs: the variable resolves it
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    required = {r["id"] for r in d["__requires"] if r["type"] == "panel"}
    ids, cells = set(), {}
    for p in _panels(d):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert isinstance(p["id"], int) and p["id"] not in ids, f"{where}: ids are unique integers"
        ids.add(p["id"])
        assert p["title"], where
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy"), where
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, f"{where}: off the grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{where} overlaps {cells[(x, y)]}"
                cells[(x, y)] = where
        if p["type"] == "row":
            assert g["w"] == 24 and g["h"] == 1, where
            continue
        assert p["type"] in required, f"{where}: panel type {p['type']} missing from __requires"
        assert p["datasource"] == DS, f"{where}: data source must be the ${{DS_PROMETHEUS}} input"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), f"{where}: targets need unique refIds"
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip(), where
        assert p["fieldConfig"]["defaults"].get("unit"), f"{where}: set a unit"


def test_dashboard_queries_parse_and_use_real_metrics_and_labels(dashboard: dict, catalogue) -> None:
    variables = _variables(dashboard)
    var_labels = {}
    for name, v in variables.items():
        if v["type"] == "query":
            var_labels[name] = _label_values(v, catalogue, variables)
    problems, used = [], set()
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            where = f"{p['title']!r} {t['refId']}"
            expr = grafana_to_promql(t["expr"])
            bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
            assert "$" not in bare, f"{where}: dashboard variables belong in label values only"
            c, out = check(expr, catalogue)
            used |= c.metrics
            problems += [f"{where}: {e}" for e in c.errors]
            if out == SCALAR:
                problems.append(f"{where}: scalar result")
            problems += _variable_use(where, c, var_labels)
    assert problems == [], "\n".join(problems)
    keel = {m for m in catalogue if m.startswith("keel_")}
    missing = keel - used
    assert not missing, f"metrics Keel exports that no panel shows (add them to {DASHBOARD.name}): {sorted(missing)}"
    assert used & set(VLLM_METRICS) >= {"vllm:num_requests_waiting", "vllm:num_requests_running",
                                        "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"}


def _label_values(v: dict, catalogue, variables) -> str:
    """A query variable: ``label_values(<selector>, <label>)`` over an existing metric and label."""
    assert v["datasource"] == DS, f"variable {v['name']}: data source must be the input"
    query = v["query"] if isinstance(v["query"], str) else v["query"]["query"]
    assert v.get("definition", query) == query
    match = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", query)
    assert match, f"variable {v['name']}: expected label_values(<metric>, <label>), got {query}"
    selector, label = match.groups()
    c, out = check(selector, catalogue)
    assert c.errors == [], f"variable {v['name']}: {c.errors}"
    assert out != SCALAR and label in out, f"variable {v['name']}: {selector} has no label {label!r}"
    for braced, plain in _VAR.findall(selector):
        assert (braced or plain) in variables, f"variable {v['name']}: refers to unknown ${braced or plain}"
    if v.get("includeAll") or v.get("multi"):
        assert v.get("allValue") in (None, ".*")
    return label


def _variable_use(where: str, c: Check, var_labels: dict[str, str]) -> list[str]:
    """``label=~"$var"``: the variable exists, lists values of that same label, and is matched as a regex."""
    problems = []
    for series, matchers in c.selectors:
        for m in matchers:
            for ref in _VAR.findall(m.value):
                name = ref[0] or ref[1]
                if name not in var_labels:
                    problems.append(f"{where}: {series} uses unknown variable ${name}")
                elif var_labels[name] != m.name:
                    problems.append(f"{where}: ${name} lists '{var_labels[name]}' values, matched on '{m.name}'")
                elif not str(m.op).startswith(("MatchOp.Re", "Re")):
                    problems.append(f"{where}: multi-value ${name} needs =~ on {m.name}")
    return problems
