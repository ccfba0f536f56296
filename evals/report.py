"""From stored case results to a verdict and reports: the gate, console table, JSON, JUnit XML, HTML."""

from __future__ import annotations

import functools
import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from evals.store import CaseRow, RunRow
    from evals.suite import Suite


# --- case status under the suite's uncertain policy -----------------------------------------------
def case_status(row: CaseRow, uncertain_policy: str) -> str:
    """pass | fail | error | uncertain (uncertain only when the policy is 'exclude')."""
    if row.error:
        return "error"
    status = "pass"
    for s in row.scores.values():
        if s.get("uncertain"):
            if uncertain_policy == "fail":
                return "fail"
            if uncertain_policy == "exclude" and status == "pass":
                status = "uncertain"
        elif not s.get("passed"):
            return "fail"
    return status


def metric_status(score: dict[str, Any], uncertain_policy: str) -> str:
    if score.get("uncertain"):
        return {"fail": "fail", "pass": "pass"}.get(uncertain_policy, "uncertain")
    return "pass" if score.get("passed") else "fail"


def summarize(suite: Suite, rows: list[CaseRow]) -> dict[str, Any]:
    policy = suite.gate.uncertain
    statuses = [case_status(r, policy) for r in rows]
    metrics: dict[str, Any] = {}
    for spec in suite.metrics:
        vals = [r.scores[spec.key] for r in rows if spec.key in r.scores]
        nums = [v["value"] for v in vals if v.get("value") is not None]
        metrics[spec.key] = {
            "metric": spec.name, "threshold": suite.threshold(spec), "n": len(vals),
            "mean": round(statistics.fmean(nums), 6) if nums else None,
            "min": min(nums) if nums else None, "max": max(nums) if nums else None,
            "passed": sum(1 for v in vals if not v.get("uncertain") and v.get("passed")),
            "failed": sum(1 for v in vals if not v.get("uncertain") and not v.get("passed")),
            "uncertain": sum(1 for v in vals if v.get("uncertain")),
            # cases whose judge gave no usable sample, and failed judge samples in all
            "judge_errors": sum(1 for v in vals if v.get("judge_error")),
            "judge_failed_samples": sum(v.get("judge_errors") or 0 for v in vals),
            "higher_is_better": vals[0].get("higher_is_better", True) if vals else True,
            "values": nums,
        }
    counted = [s for s in statuses if s != "uncertain"]
    return {
        "cases": len(rows), "expected_cases": len(suite.cases),
        "passed": statuses.count("pass"), "failed": statuses.count("fail"), "errors": statuses.count("error"),
        "uncertain_excluded": statuses.count("uncertain"),
        "cached": sum(1 for r in rows if r.cached),
        "judge_errors": sum(m["judge_errors"] for m in metrics.values()),
        "pass_rate": round(counted.count("pass") / len(counted), 6) if counted else 0.0,
        "metrics": metrics,
    }


def regressions(suite: Suite, rows: list[CaseRow], baseline: list[CaseRow]) -> list[dict[str, Any]]:
    """Cases that passed in the baseline and fail (or error) now, with the metrics that flipped."""
    policy = suite.gate.uncertain
    before = {r.case_id: r for r in baseline}
    out = []
    for r in rows:
        b = before.get(r.case_id)
        if b is None or case_status(b, policy) != "pass" or case_status(r, policy) not in ("fail", "error"):
            continue
        flipped = [k for k, s in r.scores.items()
                   if metric_status(s, policy) == "fail" and k in b.scores
                   and metric_status(b.scores[k], policy) == "pass"]
        out.append({"case": r.case_id, "metrics": flipped, "error": r.error})
    return out


def evaluate_gate(suite: Suite, rows: list[CaseRow], baseline: list[CaseRow] | None = None) -> dict[str, Any]:
    g = suite.gate
    s = summarize(suite, rows)
    reasons: list[str] = []
    failing: set[str] = set()
    if s["cases"] < s["expected_cases"]:
        reasons.append(f"only {s['cases']} of {s['expected_cases']} cases have results")
    if s["errors"] > g.max_errors:
        reasons.append(f"{s['errors']} case(s) errored (at most {g.max_errors} allowed)")
    if g.max_judge_errors is not None and s["judge_errors"] > g.max_judge_errors:
        reasons.append(f"the judge gave no usable score {s['judge_errors']} time(s) (at most {g.max_judge_errors} "
                       "allowed)")
        failing.update(k for k, m in s["metrics"].items() if m["judge_errors"])
    for key, minimum in g.min_mean.items():
        mean = s["metrics"][key]["mean"]
        if mean is None or mean < minimum:
            failing.add(key)
            reasons.append(f"{key} mean {_fmt(mean)} < {minimum}")
    for key, maximum in g.max_mean.items():
        mean = s["metrics"][key]["mean"]
        if mean is None or mean > maximum:
            failing.add(key)
            reasons.append(f"{key} mean {_fmt(mean)} > {maximum}")
    if s["pass_rate"] < g.min_pass_rate:
        reasons.append(f"pass rate {s['pass_rate']:.1%} < {g.min_pass_rate:.1%}")
        for key, m in s["metrics"].items():
            if m["failed"] or (m["uncertain"] and g.uncertain == "fail"):
                failing.add(key)
    regs: list[dict[str, Any]] | None = None
    if baseline is not None:
        regs = regressions(suite, rows, baseline)
        if g.max_regressions is not None and len(regs) > g.max_regressions:
            reasons.append(f"{len(regs)} regression(s) vs the baseline (at most {g.max_regressions} allowed)")
            failing.update(k for r in regs for k in r["metrics"])
    return {"passed": not reasons, "reasons": reasons, "failing_metrics": sorted(failing),
            "pass_rate": s["pass_rate"], "regressions": regs, "uncertain_policy": g.uncertain}


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# --- console / JSON ---------------------------------------------------------------------------------
def console_table(run: RunRow) -> Any:
    from rich.table import Table

    summary = run.summary or {}
    verdict = run.verdict or {}
    mark = "[green]PASS[/green]" if run.passed else "[red]FAIL[/red]" if run.passed is False else run.status
    table = Table(title=f"{run.suite} · {run.id} · {mark}")
    for col in ("metric", "mean", "threshold", "pass", "fail", "uncertain"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, m in summary.get("metrics", {}).items():
        red = key in verdict.get("failing_metrics", [])
        table.add_row(f"[red]{key}[/red]" if red else key, _fmt(m["mean"]), str(m["threshold"]), str(m["passed"]),
                      str(m["failed"]), str(m["uncertain"]))
    table.caption = (f"cases {summary.get('cases', 0)} · pass rate {summary.get('pass_rate', 0):.1%} · "
                     f"errors {summary.get('errors', 0)} · judge errors {summary.get('judge_errors', 0)} · "
                     f"cached {summary.get('cached', 0)}")
    return table


def run_json(run: RunRow, rows: list[CaseRow]) -> dict[str, Any]:
    return {"run": run.public(), "cases": [{"case_id": r.case_id, "error": r.error, "cached": r.cached,
                                            "scores": r.scores, "record": r.record} for r in rows]}


def write_json(path: Path, run: RunRow, rows: list[CaseRow]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_json(run, rows), indent=2, default=str), encoding="utf-8")
    return path


# --- JUnit ------------------------------------------------------------------------------------------
def junit_xml(suite: Suite, run: RunRow, rows: list[CaseRow]) -> str:
    """One <testcase> per case and metric; failures carry the value, threshold and reason."""
    policy = suite.gate.uncertain
    by_id = {c.id: c for c in suite.cases}
    root = ET.Element("testsuites", name=f"keel-eval {suite.name}")
    ts = ET.SubElement(root, "testsuite", name=suite.name, timestamp=run.started_at.replace("+00:00", ""),
                       hostname="keel")
    props = ET.SubElement(ts, "properties")
    for k, v in (("run_id", run.id), ("suite_hash", run.suite_hash), ("identity_key", run.identity_key),
                 ("verdict", "pass" if run.passed else "fail"),
                 ("reasons", "; ".join((run.verdict or {}).get("reasons", [])))):
        ET.SubElement(props, "property", name=k, value=str(v))
    tests = failures = errors = skipped = 0
    total_time = 0.0
    for r in rows:
        case = by_id.get(r.case_id)
        seconds = float(r.record.get("latency_ms") or 0) / 1000
        total_time += seconds
        keys = [m.key for m in suite.metrics if case is None or m.applies(case)] if r.error else list(r.scores)
        for key in keys:
            tests += 1
            tc = ET.SubElement(ts, "testcase", classname=f"{suite.name}.{r.case_id}", name=key,
                               time=f"{seconds:.3f}")
            if r.error:
                errors += 1
                e = ET.SubElement(tc, "error", message=r.error[:500], type="CaseError")
                e.text = r.error
                continue
            s = r.scores[key]
            st = metric_status(s, policy)
            detail = (f"value={_fmt(s.get('value'))} threshold={s.get('threshold')} "
                      f"{'(higher is better)' if s.get('higher_is_better', True) else '(lower is better)'}"
                      f"{' ci=' + str(s['ci']) if s.get('ci') else ''} "
                      f"{s.get('reason') or s.get('error') or ''}").strip()
            if st == "fail":
                failures += 1
                kind = "JudgeError" if s.get("judge_error") else "uncertain" if s.get("uncertain") else "BelowThreshold"
                f = ET.SubElement(tc, "failure", message=detail[:500], type=kind)
                f.text = (f"{detail}\n\ninput: {case.input if case else ''}\n\noutput: {r.record.get('output', '')}")
            elif st == "uncertain":
                skipped += 1
                ET.SubElement(tc, "skipped", message=f"uncertain (excluded): {detail}"[:500])
            else:
                so = ET.SubElement(tc, "system-out")
                so.text = detail
    for el in (ts,):
        el.set("tests", str(tests))
        el.set("failures", str(failures))
        el.set("errors", str(errors))
        el.set("skipped", str(skipped))
        el.set("time", f"{total_time:.3f}")
    root.set("tests", str(tests))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    root.set("time", f"{total_time:.3f}")
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: Path, suite: Suite, run: RunRow, rows: list[CaseRow]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(junit_xml(suite, run, rows), encoding="utf-8")
    return path


# --- HTML -------------------------------------------------------------------------------------------
# The page is templates/report.html (package data), rendered by Jinja2 with autoescaping on: the values
# below are plain data, and every one of them is escaped where the template prints it.
_TEMPLATE = "report.html"


@functools.cache
def _html_env() -> jinja2.Environment:
    """Built on first use, then reused: the loader and the compiled template are cached with it."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("evals", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        finalize=lambda v: "" if v is None else v,  # None prints as nothing, as in the other reports
    )
    env.filters["fmt"] = _fmt
    env.filters["pct"] = lambda v: f"{v:.1%}"
    return env


def _chart(mean: float | None, threshold: float, higher: bool, values: list[float]) -> dict[str, Any]:
    """Geometry of the mean-vs-threshold bar plus a 10-bin histogram of the case scores (values in [0, 1]
    or scaled to the largest of 1, the threshold and the values)."""
    w, h = 260, 46
    top = max([1.0, threshold, *(values or [0.0])])
    x = lambda v: 4 + (w - 8) * (v / top if top else 0)  # noqa: E731
    bins: list[dict[str, Any]] = []
    if values:
        counts = [0] * 10
        for v in values:
            counts[min(9, int(10 * v / top))] += 1
        peak = max(counts)
        bw = (w - 8) / 10
        for i, n in enumerate(counts):
            bh = 22 * n / peak if peak else 0
            bins.append({"x": 4 + i * bw + 1, "y": h - bh, "w": bw - 2, "h": bh, "n": n})
    return {"width": w, "height": h, "track": w - 8, "mean": mean, "threshold": threshold,
            "ok": mean is not None and (mean >= threshold if higher else mean <= threshold),
            "bar": None if mean is None else max(0.0, x(mean) - 4), "line": x(threshold), "bins": bins}


def html_report(suite: Suite, run: RunRow, rows: list[CaseRow], baseline: tuple[RunRow, list[CaseRow]] | None = None
                ) -> str:
    s = run.summary or summarize(suite, rows)
    v = run.verdict or {}
    policy = suite.gate.uncertain
    by_id = {c.id: c for c in suite.cases}
    ident = run.identity
    base_sum = baseline[0].summary if baseline else None
    metrics = []
    for key, m in s["metrics"].items():
        row = {"key": key, "metric": m["metric"], "mean": m["mean"], "threshold": m["threshold"],
               "passed": m["passed"], "failed": m["failed"], "uncertain": m["uncertain"],
               "judge_errors": m.get("judge_errors", 0), "bad": key in v.get("failing_metrics", []),
               "chart": _chart(m["mean"], m["threshold"], m["higher_is_better"], m.get("values", []))}
        if base_sum:
            bm = base_sum.get("metrics", {}).get(key, {}).get("mean")
            delta = None if bm is None or m["mean"] is None else m["mean"] - bm
            row.update(baseline_mean=bm, delta=delta,
                       worse=delta is not None and (delta < 0 if m["higher_is_better"] else delta > 0))
        metrics.append(row)
    failing = []
    for r in rows:
        if case_status(r, policy) == "pass":
            continue
        case = by_id.get(r.case_id)
        failing.append({
            "case_id": r.case_id, "category": case.category if case else None, "input": case.input if case else None,
            "reference": case.reference if case else None, "output": r.error or r.record.get("output", ""),
            "contexts": r.record.get("contexts") or [],
            "scores": [{"key": k, "value": sc.get("value"), "threshold": sc.get("threshold"), "ci": sc.get("ci"),
                        "uncertain": sc.get("uncertain"), "reason": sc.get("reason") or sc.get("error"),
                        "bad": metric_status(sc, policy) == "fail"}
                       for k, sc in r.scores.items() if metric_status(sc, policy) != "pass"]})
    return _html_env().get_template(_TEMPLATE).render(
        suite=suite, run=run, summary=s, policy=policy, reasons=v.get("reasons") or [],
        identity=[(k, json.dumps(ident[k], sort_keys=True))
                  for k in ("kind", "prompt", "model", "rag", "agent", "judge", "guardrails", "policy", "params",
                            "suite_hash")
                  if ident.get(k) is not None],
        metrics=metrics, has_base_summary=bool(base_sum),
        baseline=baseline[0] if baseline else None, regressions=v.get("regressions") or [],
        failing=failing,
        cases=[{"case_id": r.case_id, "status": case_status(r, policy),
                "latency_ms": round(float(r.record.get("latency_ms") or 0)), "cached": r.cached} for r in rows])


def write_html(path: Path, suite: Suite, run: RunRow, rows: list[CaseRow],
               baseline: tuple[RunRow, list[CaseRow]] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(suite, run, rows, baseline), encoding="utf-8")
    return path
