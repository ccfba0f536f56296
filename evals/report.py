"""From stored case results to a verdict and reports: the gate, console table, JSON, JUnit XML, HTML."""

from __future__ import annotations

import html
import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e3e6ec;padding-bottom:4px}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;font-weight:600;color:#fff}
.pass{background:#1f8b4c}.fail{background:#c62f2f}.unc{background:#b7791f}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border:1px solid #e3e6ec;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f5f7fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecec}tr.reg td{background:#fff4d6}
.muted{color:#6b7385}pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12px/1.4 ui-monospace,monospace}
details{margin:2px 0}summary{cursor:pointer}.ident{font:12px ui-monospace,monospace}
svg text{font:11px system-ui,sans-serif}
"""


def _e(v: Any) -> str:
    return html.escape(str(v if v is not None else ""))


def _bar_svg(mean: float | None, threshold: float, higher: bool, values: list[float]) -> str:
    """Mean vs threshold bar plus a 10-bin histogram of the case scores (values in [0, 1] or scaled)."""
    w, h = 260, 46
    top = max([1.0, threshold, *(values or [0.0])])
    x = lambda v: 4 + (w - 8) * (v / top if top else 0)  # noqa: E731
    ok = mean is not None and (mean >= threshold if higher else mean <= threshold)
    parts = [f'<svg width="{w}" height="{h}" role="img" aria-label="mean {_fmt(mean)} threshold {threshold}">',
             f'<rect x="4" y="4" width="{w - 8}" height="12" fill="#eef1f5"/>']
    if mean is not None:
        parts.append(f'<rect x="4" y="4" width="{max(0.0, x(mean) - 4):.1f}" height="12" '
                     f'fill="{"#1f8b4c" if ok else "#c62f2f"}"/>')
    parts.append(f'<line x1="{x(threshold):.1f}" x2="{x(threshold):.1f}" y1="1" y2="19" stroke="#1d2330" '
                 'stroke-width="2"/>')
    if values:
        bins = [0] * 10
        for v in values:
            bins[min(9, int(10 * v / top))] += 1
        peak = max(bins)
        bw = (w - 8) / 10
        for i, n in enumerate(bins):
            bh = 22 * n / peak if peak else 0
            parts.append(f'<rect x="{4 + i * bw + 1:.1f}" y="{h - bh:.1f}" width="{bw - 2:.1f}" height="{bh:.1f}" '
                         f'fill="#8aa2c8"><title>{n} case(s)</title></rect>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(suite: Suite, run: RunRow, rows: list[CaseRow], baseline: tuple[RunRow, list[CaseRow]] | None = None
                ) -> str:
    s = run.summary or summarize(suite, rows)
    v = run.verdict or {}
    policy = suite.gate.uncertain
    by_id = {c.id: c for c in suite.cases}
    badge = '<span class="badge pass">PASS</span>' if run.passed else '<span class="badge fail">FAIL</span>'
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Keel eval {_e(suite.name)} "
           f"{_e(run.id)}</title><style>{_CSS}</style></head><body>",
           f"<h1>{_e(suite.name)} {badge}</h1>",
           f"<div class=muted>run {_e(run.id)} · started {_e(run.started_at)} · finished {_e(run.finished_at)} · "
           f"{s['cases']} cases · pass rate {s['pass_rate']:.1%} · errors {s['errors']} · "
           f"judge errors {s.get('judge_errors', 0)} (count as <b>{_e(suite.gate.judge_errors)}</b>) · "
           f"cached {s['cached']} · uncertain cases count as <b>{_e(policy)}</b></div>"]
    if v.get("reasons"):
        out.append("<h2>Why the gate failed</h2><ul>" + "".join(f"<li>{_e(r)}</li>" for r in v["reasons"]) + "</ul>")
    ident = run.identity
    out.append("<h2>What was evaluated</h2><table class=ident>")
    for k in ("kind", "prompt", "model", "rag", "agent", "judge", "guardrails", "params", "suite_hash"):
        if ident.get(k) is not None:
            out.append(f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(ident[k], sort_keys=True))}</td></tr>")
    out.append(f"<tr><th>identity key</th><td>{_e(run.identity_key)}</td></tr></table>")
    base_sum = baseline[0].summary if baseline else None
    out.append("<h2>Metrics</h2><table><tr><th>metric</th><th>mean</th><th>threshold</th><th>pass</th>"
               "<th>fail</th><th>uncertain</th><th>judge errors</th>"
               "<th>chart (bar: mean, line: threshold; histogram of cases)</th>"
               + ("<th>baseline mean</th><th>Δ</th>" if base_sum else "") + "</tr>")
    for key, m in s["metrics"].items():
        bad = key in v.get("failing_metrics", [])
        row = (f"<tr class={'bad' if bad else ''}><td>{_e(key)}<div class=muted>{_e(m['metric'])}</div></td>"
               f"<td class=num>{_fmt(m['mean'])}</td><td class=num>{_e(m['threshold'])}</td>"
               f"<td class=num>{m['passed']}</td><td class=num>{m['failed']}</td><td class=num>{m['uncertain']}</td>"
               f"<td class=num>{m.get('judge_errors', 0)}</td>"
               f"<td>{_bar_svg(m['mean'], m['threshold'], m['higher_is_better'], m.get('values', []))}</td>")
        if base_sum:
            bm = base_sum.get("metrics", {}).get(key, {}).get("mean")
            delta = None if bm is None or m["mean"] is None else m["mean"] - bm
            worse = delta is not None and (delta < 0 if m["higher_is_better"] else delta > 0)
            row += (f"<td class=num>{_fmt(bm)}</td><td class=num style='color:{'#c62f2f' if worse else '#1f8b4c'}'>"
                    f"{'' if delta is None else f'{delta:+.3f}'}</td>")
        out.append(row + "</tr>")
    out.append("</table>")
    if baseline:
        regs = v.get("regressions") or []
        out.append(f"<h2>Compared with baseline {_e(baseline[0].id)}</h2>")
        if regs:
            out.append("<table><tr><th>case</th><th>metrics that regressed</th></tr>" + "".join(
                f"<tr class=reg><td>{_e(r['case'])}</td><td>{_e(', '.join(r['metrics']) or r.get('error') or '')}"
                "</td></tr>" for r in regs) + "</table>")
        else:
            out.append("<p>No case regressed.</p>")
    failing = [r for r in rows if case_status(r, policy) != "pass"]
    out.append(f"<h2>Failing and uncertain cases ({len(failing)})</h2>")
    if failing:
        out.append("<table><tr><th>case</th><th>input</th><th>output</th><th>scores</th></tr>")
        for r in failing:
            case = by_id.get(r.case_id)
            scores = "".join(
                f"<div class={'bad' if metric_status(sc, policy) == 'fail' else ''}><b>{_e(k)}</b> "
                f"{_fmt(sc.get('value'))} / {_e(sc.get('threshold'))}"
                f"{' ci ' + _e(sc['ci']) if sc.get('ci') else ''}"
                f"{' <b>uncertain</b>' if sc.get('uncertain') else ''} "
                f"<span class=muted>{_e(sc.get('reason') or sc.get('error') or '')}</span></div>"
                for k, sc in r.scores.items() if metric_status(sc, policy) != "pass")
            contexts = r.record.get("contexts") or []
            ctx = (f"<details><summary>{len(contexts)} context passage(s)</summary>" + "".join(
                f"<pre>[{i}] {_e(c)}</pre>" for i, c in enumerate(contexts, 1)) + "</details>") if contexts else ""
            ref = f"<div class=muted>reference: {_e(case.reference)}</div>" if case and case.reference else ""
            out.append(f"<tr class=bad><td>{_e(r.case_id)}<div class=muted>{_e(case.category if case else '')}</div>"
                       f"</td><td><pre>{_e(case.input if case else '')}</pre>{ref}</td>"
                       f"<td><pre>{_e(r.error or r.record.get('output', ''))}</pre>{ctx}</td><td>{scores}</td></tr>")
        out.append("</table>")
    out.append("<h2>All cases</h2><table><tr><th>case</th><th>status</th><th>latency ms</th><th>cached</th></tr>")
    for r in rows:
        st = case_status(r, policy)
        out.append(f"<tr class={'' if st == 'pass' else 'bad'}><td>{_e(r.case_id)}</td><td>{st}</td>"
                   f"<td class=num>{_e(round(float(r.record.get('latency_ms') or 0)))}</td>"
                   f"<td>{'yes' if r.cached else ''}"
                   "</td></tr>")
    out.append("</table></body></html>\n")
    return "".join(out)


def write_html(path: Path, suite: Suite, run: RunRow, rows: list[CaseRow],
               baseline: tuple[RunRow, list[CaseRow]] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(suite, run, rows, baseline), encoding="utf-8")
    return path
