"""``keel finetune``: submit and watch LoRA jobs, run the worker, promote and roll back adapters."""

from __future__ import annotations

import getpass
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from app.cli.common import fail, settings_or_exit
from app.core.errors import KeelError
from evals.store import open_eval_store
from finetune.data import InvalidTrainingData
from finetune.gate import adapter_gate
from finetune.jobs import TERMINAL, Job
from finetune.service import FinetuneService, build_finetune
from finetune.spec import load_spec
from finetune.worker import Worker

app = typer.Typer(help="Fine-tuning: LoRA jobs, the worker, the adapter registry.", no_args_is_help=True)
console = Console()
err = Console(stderr=True)
log = logging.getLogger("keel.finetune.worker")

_COLORS = {"queued": "yellow", "running": "cyan", "succeeded": "green", "failed": "red", "cancelled": "magenta"}
_EVAL_COLORS = {"pending": "yellow", "running": "cyan", "passed": "green", "failed": "red", "error": "red"}


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


@contextmanager
def _service() -> Iterator[FinetuneService]:
    settings = settings_or_exit()
    eval_store = None
    try:
        svc = build_finetune(settings)
        if settings.evals.gate_enabled:
            # The same gate as the API's: `promote` here is refused exactly when it is refused there.
            eval_store = open_eval_store(settings)
            svc.set_gate(adapter_gate(eval_store, max_age_days=settings.evals.gate_max_age_days))
    except KeelError as exc:
        raise fail(exc) from exc
    try:
        yield svc
    except InvalidTrainingData as exc:
        err.print(f"[red]error ({exc.code}):[/red] the dataset breaks the data contract")
        if exc.report is not None:
            for issue in exc.report.issues[:50]:
                err.print(f"  {escape(str(issue))}")
            if len(exc.report.issues) > 50:
                err.print(f"  ... and {len(exc.report.issues) - 50} more")
        raise typer.Exit(1) from exc
    except KeelError as exc:
        raise fail(exc) from exc
    finally:
        svc.close()
        if eval_store is not None:
            eval_store.close()



def _evals(job: Job) -> str:
    if not job.evals_state:
        return "-"
    color = _EVAL_COLORS.get(job.evals_state, "white")
    return f"[{color}]{job.evals_state}[/{color}]"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _loss(job: Job) -> str:
    m = job.metrics
    train = m.get("train_loss_last", m.get("last_loss"))
    val = m.get("eval_loss_final", m.get("last_eval_loss"))
    parts = []
    if train is not None:
        parts.append(f"train {train:.3f}")
    if val is not None:
        parts.append(f"val {val:.3f}")
    return ", ".join(parts) or "-"


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Job spec YAML (see finetune/jobs/).", exists=True, dir_okay=False)],
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the data check at submit.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Follow progress until the job ends.")] = False,
) -> None:
    """Validate a job spec and its data, then queue it for the worker."""
    with _service() as svc:
        job = svc.submit_file(spec, submitted_by=_actor(), validate_data=not no_validate)
        report = job.data_report or {}
        console.print(f"queued [bold]{job.id}[/bold] ({job.name}, spec {job.spec_hash[:12]}"
                      + (f", {report.get('train_examples')} train / {report.get('validation_examples')} validation "
                         "examples" if report else "") + ")")
        console.print("  a worker runs it: `keel finetune worker`")
        if wait:
            _follow(svc, job.id)


@app.command()
def validate(spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False)]) -> None:
    """Check a spec and its dataset against the data contract without queueing anything."""
    with _service() as svc:
        report = svc.validate(load_spec(spec))
        stats = report["token_stats"]
        console.print(f"[green]data OK[/green]: {report['train_examples']} train / {report['validation_examples']} "
                      f"validation examples, tokens min/mean/max {stats.get('min')}/{stats.get('mean', 0):.0f}/"
                      f"{stats.get('max')}, data hash {report['data_hash'][:12]}")


@app.command()
def status(
    job_id: Annotated[str | None, typer.Argument(help="One job (progress bar); all jobs when left out.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Follow the job until it ends.")] = False,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: int = 30,
) -> None:
    """Show jobs: a table, or one job's progress and metrics."""
    with _service() as svc:
        if job_id is None:
            table = Table("job", "name", "state", "progress", "loss", "model version", "evals", "created", "error")
            for job in svc.list(state=state, limit=limit):
                color = _COLORS.get(job.state, "white")
                table.add_row(job.id, job.name, f"[{color}]{job.state}[/{color}]",
                              f"{job.step}/{job.max_steps or '?'} ({100 * job.progress:.0f}%)", _loss(job),
                              f"{job.model_name}/{job.model_version}" if job.model_version else "-",
                              _evals(job), _when(job.created_at), escape((job.error or "")[:60]))
            console.print(table)
            return
        if watch:
            _follow(svc, job_id)
            return
        job = svc.get(job_id)
        _print_job(job)


def _print_job(job: Job) -> None:
    color = _COLORS.get(job.state, "white")
    console.print(f"[bold]{job.id}[/bold] {job.name}: [{color}]{job.state}[/{color}] "
                  f"step {job.step}/{job.max_steps or '?'} ({100 * job.progress:.0f}%), attempt {job.attempts}")
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), console=console,
                  transient=False) as bar:
        bar.add_task(job.name, total=job.max_steps or 1, completed=job.step if job.max_steps else 0)
    console.print(f"  loss: {_loss(job)}   spec {job.spec_hash[:12]}   data {(job.data_hash or '-')[:12]}")
    if job.model_version:
        console.print(f"  registered: {job.model_name} version {job.model_version} -> {job.adapter_path}")
    if job.mlflow_run_id:
        console.print(f"  MLflow run: {job.mlflow_run_id}")
    if job.error:
        console.print(f"  [red]error ({job.error_code}):[/red] {escape(job.error)}")
    _print_evals(job)


def _print_evals(job: Job) -> None:
    if not job.evals_state:
        return
    ev = job.evals or {}
    console.print(f"  evals: {_evals(job)}" + (f" on {ev['alias']}" if ev.get("alias") else ""))
    for name, s in (ev.get("suites") or {}).items():
        verdict = ("[red]error[/red]" if s.get("error") else "[green]pass[/green]" if s.get("passed")
                   else "[red]FAIL[/red]")
        means = ", ".join(f"{k} {v:.2f}" for k, v in (s.get("metrics") or {}).items() if v is not None)
        console.print(f"    {escape(name)}: {verdict} {s.get('run_id') or ''}  {escape(means)}")
        for reason in (s.get("reasons") or [])[:5]:
            console.print(f"      [red]✗[/red] {escape(reason)}")
        if s.get("error"):
            console.print(f"      [red]✗[/red] {escape(s['error'])}")
    if ev.get("error"):
        console.print(f"    [red]✗[/red] {escape(ev['error'])}")


def _follow(svc: FinetuneService, job_id: str) -> None:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        job = svc.get(job_id)
        task = bar.add_task(f"{job.id} {job.name}", total=job.max_steps or None, info=job.state)
        while True:
            job = svc.get(job_id)
            info = f"{job.state}  {_loss(job)}" + (f"  evals {job.evals_state}" if job.evals_state else "")
            bar.update(task, total=job.max_steps or None, completed=job.step, info=info)
            if job.state in TERMINAL and not _evals_coming(job, svc.fs.poll_interval_s):
                break
            time.sleep(1.0)
    _print_job(job)
    if job.state != "succeeded":
        raise typer.Exit(1)


def _evals_coming(job: Job, poll_s: float) -> bool:
    """Evals run, or are pending right after training (a worker claims them within a poll or two)."""
    if job.evals_state == "running":
        return True
    return job.evals_state == "pending" and time.time() - (job.finished_at or 0) < 2 * poll_s + 5


@app.command()
def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
) -> None:
    """Print a job's log (training steps, losses, worker events)."""
    with _service() as svc:
        offset = 0
        while True:
            text, offset = svc.logs(job_id, offset)
            if text:
                console.out(text, end="", highlight=False)
            if not follow:
                return
            if svc.get(job_id).state in TERMINAL:
                text, offset = svc.logs(job_id, offset)
                if text:
                    console.out(text, end="", highlight=False)
                return
            time.sleep(1.0)


@app.command()
def cancel(job_id: str) -> None:
    """Cancel a queued job, or stop a running one at its next step."""
    with _service() as svc:
        job = svc.cancel(job_id, actor=_actor())
        console.print(f"{job.id}: {job.state}" + (" (cancel requested; stops at the next step)"
                                                   if job.state == "running" else ""))


@app.command()
def evaluate(
    job_id: str,
    suite: Annotated[list[str] | None, typer.Option("--suite", help="Run these suites instead of the spec's.")] = None,
) -> None:
    """Queue the eval suites of a succeeded job's adapter again (a worker runs them)."""
    with _service() as svc:
        job = svc.evaluate(job_id, suites=suite or None, actor=_actor())
        console.print(f"{job.id}: evals {job.evals_state} for {job.model_name}/{job.model_version}; "
                      f"a worker runs them (`keel finetune status {job.id} --watch`)")


@app.command()
def worker(once: Annotated[bool, typer.Option("--once", help="Exit when the queue is empty.")] = False) -> None:
    """Run queued jobs in this process (one at a time); Ctrl-C or SIGTERM requeues the current job."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.core.metrics import Metrics  # lazy: keeps `keel --help` fast: prometheus_client, only the worker's
    from app.core.tracing import Tracing  # lazy: keeps `keel --help` fast: the OpenTelemetry SDK

    settings = settings_or_exit()
    tracing = Tracing(settings.otel, settings.home, dropped=Metrics().trace_dropped)
    worker = Worker(settings, tracer=tracing.tracer)

    def stop(signum: int, frame: Any) -> None:
        log.warning("signal %d: stopping after the current step (the job is requeued)", signum)
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    n = worker.run(once=once)
    log.info("worker %s exits after %d job(s)", worker.worker_id, n)
    worker.store.close()
    tracing.close()


@app.command()
def versions(model: str) -> None:
    """Registered adapter versions of a model, with their aliases."""
    with _service() as svc:
        table = Table("version", "aliases", "job", "spec", "data", "source")
        for v in svc.versions(model):
            table.add_row(v.version, ", ".join(v.aliases) or "-", v.tags.get("keel.job_id", "-"),
                          v.tags.get("keel.spec_hash", "")[:12], v.tags.get("keel.data_hash", "")[:12], v.source)
        console.print(table)


@app.command()
def promote(
    model: str,
    version: str,
    force: Annotated[bool, typer.Option("--force", help="Promote even if the eval gate refuses (audited).")] = False,
    reason: Annotated[str | None, typer.Option(help="Why (required with --force).")] = None,
) -> None:
    """Move the `production` alias to an adapter version, through the eval gate."""
    with _service() as svc:
        p = svc.promote(model, version, force=force, reason=reason, actor=_actor())
        if not p.changed:
            console.print(f"{model}: production already at version {version}")
            return
        note = f" [yellow](gate overridden: {p.verdict.reason})[/yellow]" if p.forced and p.verdict else ""
        console.print(f"{model}: production {p.from_version or '-'} -> {p.to_version}{note}")


@app.command()
def rollback(model: str, reason: Annotated[str, typer.Option(help="Recorded in the audit log.")] = "") -> None:
    """Move `production` back to the version it pointed at before the last promotion."""
    with _service() as svc:
        p = svc.rollback(model, actor=_actor(), reason=reason)
        console.print(f"{model}: production {p.from_version} -> {p.to_version}")


@app.command()
def export(
    model: str,
    version: str,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model.")],
) -> None:
    """Merge an adapter version into its base model and write a full model folder."""
    from finetune.export import merge_adapter  # lazy: keeps `keel --help` fast: only `export` needs it

    with _service() as svc:
        v = svc.registry.get_version(model, version)
        path = merge_adapter(v.local_path(), out)
        console.print(f"merged {v.ref} into {path}")
