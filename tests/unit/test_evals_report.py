"""The HTML eval report: a Jinja2 template shipped with the package, every value escaped."""

from __future__ import annotations

from pathlib import Path

from evals import report
from evals.report import evaluate_gate, html_report, summarize
from evals.store import CaseRow, RunRow
from evals.suite import parse_suite

EVIL = '<script>alert("x")</script>'


def suite(name: str = "unit"):
    s = parse_suite({"name": "unit", "target": {"model": "m"},
                     "dataset": {"cases": [{"id": "c1", "input": "q1", "reference": "r1"},
                                           {"id": "c2", "input": "q2"}]},
                     "metrics": [{"name": "fuzzy_match", "threshold": 0.5}], "gate": {"min_pass_rate": 1.0}})
    return s.model_copy(update={"name": name})  # stored runs can name what a suite file could not


def rows(case_id: str = "c1", output: str = "out") -> list[CaseRow]:
    return [CaseRow(case_id, {"output": output, "latency_ms": 5, "contexts": [f"ctx {output}"]},
                    {"fuzzy_match": {"value": 0.1, "threshold": 0.5, "passed": False, "reason": f"far {output}"}},
                    None, False),
            CaseRow("c2", {"output": "fine", "latency_ms": 7},
                    {"fuzzy_match": {"value": 0.9, "threshold": 0.5, "passed": True}}, None, True)]


def run_row(s, rs: list[CaseRow], run_id: str = "run-1") -> RunRow:
    verdict = evaluate_gate(s, rs, rs)
    return RunRow(run_id, s.name, "h", "ik", {"kind": "model", "model": "m"}, "model", None, None, None, "completed",
                  verdict["passed"], len(rs), None, summarize(s, rs), verdict, "2024-01-01T00:00:00+00:00", None)


def test_names_and_outputs_with_markup_are_escaped() -> None:
    s = suite(EVIL)
    rs = rows(case_id=f"c1{EVIL}", output=EVIL)
    page = html_report(s, run_row(s, rs, run_id=f"run{EVIL}"), rs, (run_row(s, rs, "base"), rs))
    assert "<script" not in page
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;"
    assert f"<title>Keel eval {escaped} run{escaped}</title>" in page
    assert f"<h1>{escaped} " in page
    assert f"<td>c1{escaped}<div class=muted>" in page  # failing cases
    assert f"<td>c1{escaped}</td><td>fail</td>" in page  # all cases
    assert f"<pre>{escaped}</pre>" in page and f"far {escaped}" in page and f"[1] ctx {escaped}" in page


def test_report_keeps_its_content() -> None:
    s = suite()
    rs = rows()
    page = html_report(s, run_row(s, rs), rs, (run_row(s, rs, "base"), rs))
    assert page.startswith("<!doctype html>") and page.endswith("</html>\n")
    for part in ('<span class="badge fail">FAIL</span>', "pass rate 50.0%", "Why the gate failed",
                 "<th>identity key</th><td>ik</td>", "aria-label=\"mean 0.500 threshold 0.5\"",
                 "Compared with baseline base", "No case regressed.", "Failing and uncertain cases (1)",
                 "<div class=muted>reference: r1</div>", "1 context passage(s)", "<td>c2</td><td>pass</td>",
                 "<td>yes</td>", "<th>baseline mean</th><th>Δ</th>"):
        assert part in page, part


def test_the_template_ships_and_the_environment_is_built_once() -> None:
    assert (Path(report.__file__).parent / "templates" / "report.html").is_file()
    env = report._html_env()
    assert env is report._html_env() and env.autoescape is True
    assert env.get_template("report.html") is env.get_template("report.html")  # compiled once, cached
