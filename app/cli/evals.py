"""``keel eval``: run suites (exit 0 pass, 1 gate failure, 2 usage/config error), list and show runs.

Mount in app/cli.py with ``app.add_typer(evals_app, name="eval")``.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from app.cli.common import fail, settings_or_exit
from app.core.errors import KeelError
from evals.store import open_eval_store

if TYPE_CHECKING:
    from app.container import Container
    from app.settings import Settings

console = Console()
err = Console(stderr=True)
app = typer.Typer(help="Evaluations: run suites, gate on results, list and show runs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)

_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAGAS_DO_NOT_TRACK": "true",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TOKENIZERS_PARALLELISM": "false"}


def _settings() -> Settings:
    return settings_or_exit(_OFFLINE)


async def _default_container(settings: Settings) -> Container:
    from app.container import Container  # lazy: keeps `keel --help` fast: builds on every service (LangGraph, numpy)

    container = await Container.build(settings)
    # Cases sent before a freshly started vLLM answers would all fail (and open the circuit breaker).
    with err.status("waiting for the model server (a first start compiles the model: 1-3 min)..."):
        pending = await container.wait_for_managed_backends()
    if pending:
        err.print(f"[yellow]backend(s) {', '.join(pending)} not ready; cases sent to them will fail[/yellow]")
    return container


# Tests (and embedding applications) replace this to run against their own container.
container_factory: Callable[[Settings], Awaitable[Container]] = _default_container


def _store(settings: Settings):
    try:
        return open_eval_store(settings)
    except KeelError as exc:  # an unreachable eval database (evals.url): one line, exit 1
        raise fail(exc) from exc


@app.command("run")
def run_command(
    suite: Annotated[str, typer.Argument(help="Suite file, or a suite name under evals/suites.")],
    junit: Annotated[Path | None, typer.Option("--junit", help="Write a JUnit XML report here.")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the run and its cases as JSON here.")] = None,
    baseline: Annotated[str | None, typer.Option("--baseline", help="Run id to compare with (regressions).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue this interrupted run.")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start a new run even if an interrupted one exists.")] = False,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Ask the model again even for cached answers.")] = False,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, max=256)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Run SUITE and apply its gate: exit code 0 when it passes, 1 when it fails, 2 on a usage error."""
    # lazy: keeps `keel --help` fast: the suite models and metric registry (numpy), ~0.1 s
    from evals.suite import SuiteError, find_suite, load_suite

    settings = _settings()
    try:
        suite_obj = load_suite(find_suite(suite, settings.evals.suites_dir))
    except SuiteError as e:
        err.print(f"[red]suite error:[/red] {e}")
        raise typer.Exit(2) from e
    code = asyncio.run(_run(settings, suite_obj, junit=junit, html=html, json_out=json_out, baseline=baseline,
                            resume=resume, fresh=fresh, use_cache=not no_cache, concurrency=concurrency,
                            progress=not quiet and sys.stderr.isatty()))
    raise typer.Exit(code)


async def _run(settings: Settings, suite, *, junit: Path | None, html: Path | None, json_out: Path | None,
               baseline: str | None, resume: str | None, fresh: bool, use_cache: bool, concurrency: int | None,
               progress: bool) -> int:
    from evals import report  # lazy: keeps `keel --help` fast: xml.etree and statistics, ~7 ms
    from evals.runner import EvalConfigError, EvalRunner  # lazy: keeps `keel --help` fast: chat, router, httpx

    store = _store(settings)
    container = None
    try:
        container = await container_factory(settings)
        runner = EvalRunner(container.eval_deps(), store, concurrency=concurrency, use_cache=use_cache,
                            progress=progress)
        try:
            outcome = await runner.run(suite, resume=resume, baseline=baseline, fresh=fresh)
        except (EvalConfigError, KeelError) as e:
            err.print(f"[red]cannot run {suite.name}:[/red] {getattr(e, 'message', e)}")
            return 2
        run = outcome.run
        rows = store.results(run.id)
        console.print(report.console_table(run))
        console.print(f"answered {outcome.executed}, cached {outcome.cached}, resumed past {outcome.skipped}")
        for reason in (run.verdict or {}).get("reasons", []):
            console.print(f"  [red]✗[/red] {reason}")
        base = (store.get_run(run.baseline), store.results(run.baseline)) if run.baseline else None
        if junit:
            console.print(f"JUnit: {report.write_junit(junit, suite, run, rows)}")
        if html:
            console.print(f"HTML: {report.write_html(html, suite, run, rows, base)}")
        if json_out:
            report.write_json(json_out, run, rows)
            console.print(f"JSON: {json_out}")
        console.print(f"run {run.id}: " + ("[green]PASS[/green]" if run.passed else "[red]FAIL[/red]"))
        return 0 if run.passed else 1
    finally:
        if container is not None:
            await container.aclose()
        store.close()


@app.command("runs")
def runs_command(
    suite: Annotated[str | None, typer.Option("--suite", help="Only runs of this suite.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List eval runs, newest first."""
    from rich.table import Table

    settings = _settings()
    store = _store(settings)
    try:
        runs = store.list_runs(suite=suite, limit=limit)
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps([{k: v for k, v in r.public().items() if k != "identity"} for r in runs],
                                      default=str))
        return
    table = Table(title="eval runs")
    for col in ("run", "suite", "target", "status", "verdict", "pass rate", "started"):
        table.add_column(col)
    for r in runs:
        target = (f"{r.prompt_name}@{r.prompt_version}" if r.prompt_name else
                  ((r.identity.get("rag") or {}).get("collection") and f"rag:{r.identity['rag']['collection']}")
                  or (r.identity.get("model") or {}).get("alias", ""))
        verdict = "[green]pass[/green]" if r.passed else "[red]fail[/red]" if r.passed is False else "-"
        rate = f"{(r.summary or {}).get('pass_rate', 0):.0%}" if r.summary else "-"
        table.add_row(r.id, r.suite, str(target), r.status, verdict, rate, r.started_at)
    console.print(table)


@app.command("show")
def show_command(
    run_id: Annotated[str, typer.Argument(help="Run id (see `keel eval runs`).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
    failures: Annotated[bool, typer.Option("--failures", help="List failing cases.")] = True,
) -> None:
    """Show one run: its identity, metric table, verdict and failing cases."""
    from evals import report  # lazy: keeps `keel --help` fast: xml.etree and statistics, ~7 ms

    settings = _settings()
    store = _store(settings)
    try:
        try:
            run = store.get_run(run_id)
        except KeelError as e:
            err.print(f"[red]{e.message}[/red]")
            raise typer.Exit(2) from e
        rows = store.results(run_id)
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(report.run_json(run, rows), default=str))
        return
    console.print(report.console_table(run))
    ident = run.identity
    for k in ("prompt", "model", "rag", "guardrails"):
        if ident.get(k) is not None:
            console.print(f"[bold]{k}[/bold]: {json.dumps(ident[k], sort_keys=True)}")
    for reason in (run.verdict or {}).get("reasons", []):
        console.print(f"  [red]✗[/red] {reason}")
    if failures:
        policy = (run.verdict or {}).get("uncertain_policy", "fail")
        for r in rows:
            st = report.case_status(r, policy)
            if st != "pass":
                bad = {k: "judge error" if s.get("judge_error") else s.get("value")
                       for k, s in r.scores.items() if report.metric_status(s, policy) != "pass"}
                console.print(f"  {r.case_id}: {st} {r.error or bad}")


@app.command("compare")
def compare_command(run_a: str, run_b: str) -> None:
    """Compare the metric means of two runs (B against A)."""
    from rich.table import Table

    settings = _settings()
    store = _store(settings)
    try:
        a, b = store.get_run(run_a), store.get_run(run_b)
    except KeelError as e:
        err.print(f"[red]{e.message}[/red]")
        raise typer.Exit(2) from e
    finally:
        store.close()
    table = Table(title=f"{run_b} vs {run_a}")
    for col in ("metric", "A", "B", "Δ"):
        table.add_column(col)
    ma, mb = (a.summary or {}).get("metrics", {}), (b.summary or {}).get("metrics", {})
    for key in dict.fromkeys([*ma, *mb]):
        va, vb = (ma.get(key) or {}).get("mean"), (mb.get(key) or {}).get("mean")
        delta = "" if va is None or vb is None else f"{vb - va:+.3f}"
        table.add_row(key, str(va), str(vb), delta)
    console.print(table)
