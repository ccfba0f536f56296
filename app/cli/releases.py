"""``keel release``: create release endpoints from YAML, read their numbers, watch them, steer them.

Every command talks to the running Keel API (``--url``, default ``server.url``; key from ``--api-key``,
``KEEL_API_KEY`` or the dev key ``keel up`` wrote; it needs the ``releases`` scope), because the release
controller runs in the API process: what the CLI shows is what the controller decides on. A spec file is
validated here first (:class:`~lifecycle.releases.spec.ReleaseSpec`), so a bad file costs one line and no round
trip; the server checks it again, with what only it knows (model aliases, prompts, policies, the eval gate).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from app.cli.common import ApiClient, Url, api_key_option, when_ago

app = typer.Typer(help="Release endpoints: A/B tests, canaries, shadows, blue/green switches.", no_args_is_help=True)
console = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per error, also in logs

Key = api_key_option("API key with the 'releases' scope (or KEEL_API_KEY; default: <home>/dev-api-key).")
Reason = Annotated[str, typer.Option(help="Why: recorded with the decision in the release's audit trail.")]

FINISHED = ("promoted", "rolled_back", "stopped")
_STATUS_COLORS = {"running": "cyan", "paused": "yellow", "promoted": "green", "rolled_back": "red",
                  "stopped": "red"}
_STATE_COLORS = {"pass": "green", "fail": "red", "inconclusive": "yellow", "insufficient": "dim"}
_MS_METRICS = {"latency_ms", "ttft_ms"}
_SCORE_METRICS = {"judge_score"}
_EXIT_INVALID_SPEC = 2
_EXIT_TIMEOUT = 3
_EXIT_INTERRUPTED = 130


# -- the API ---------------------------------------------------------------------------------------------


class _Api(ApiClient):
    def report(self, name: str, *, retry: bool = False) -> dict[str, Any]:
        return self.call("GET", f"/v1/releases/{name}", retry=retry)


# -- formatting ------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _status(status: str) -> str:
    color = _STATUS_COLORS.get(status, "white")
    return f"[{color}]{status}[/{color}]"


def _weights(r: dict[str, Any]) -> str:
    return " / ".join(f"{escape(k)} {v:g}%" for k, v in r["weights"].items())


def _bundle(v: dict[str, Any]) -> str:
    parts = [f"{k} {v[k]}" for k in ("model", "prompt", "rag", "policy", "workflow") if v.get(k)]
    return escape(", ".join(parts) or "default model")


def _step(r: dict[str, Any]) -> str | None:
    """Where a canary is: its step, the share, how long it has run against the window it needs."""
    if r["strategy"] != "canary":
        return None
    steps = r.get("steps") or r["spec"]["canary"]["steps"]
    window = r["spec"]["canary"]
    share = steps[min(r["step"], len(steps) - 1)]
    ran = max(0.0, time.time() - r["step_started_at"])
    line = f"step {r['step'] + 1}/{len(steps)} at {share:g}% ({' -> '.join(f'{s:g}%' for s in steps)})"
    if r["status"] in FINISHED:
        return line
    return (f"{line}; this step has run {ran:.0f} s (judged after {window['min_requests']} canary requests and "
            f"{window['min_duration_s']:g} s; rolled back if undecided after {window['max_duration_s']:g} s)")


def _decision(d: dict[str, Any] | None) -> str:
    if not d:
        return "[dim]none yet[/dim]"
    who = f" by {escape(d['actor'])}" if d.get("actor") else ""
    return f"[bold]{escape(d['action'])}[/bold]{who}, {when_ago(d.get('at'))}: {escape(d.get('reason') or '')}"


def _signed(metric: str, x: float) -> str:
    """A difference in the metric's unit: milliseconds, a judge's score (0..1), or percentage points of a rate."""
    if metric in _MS_METRICS:
        return f"{x:+.1f}"
    return f"{x:+.3f}" if metric in _SCORE_METRICS else f"{x * 100:+.2f}"


def _unit(metric: str) -> str:
    return " ms" if metric in _MS_METRICS else "" if metric in _SCORE_METRICS else " pp"


def _diff(metric: str, x: float | None) -> str:
    return "-" if x is None else f"{_signed(metric, x)}{_unit(metric)}"


def _ci(metric: str, ci: list[float] | None) -> str:
    if not ci:
        return "-"
    lo, hi = ci
    return f"[{_signed(metric, lo)}, {_signed(metric, hi)}]{_unit(metric)}"


def variants_table(r: dict[str, Any]) -> Table:
    table = Table("variant", "serves", "weight", "requests", "error rate", "block rate", "neg. feedback",
                  "latency p50 (ms)", "latency p95 (ms)", "TTFT p50 (ms)", title="variants", title_justify="left")
    for name, v in r["variants"].items():
        role = " (baseline)" if name == r["baseline"] else " (candidate)" if name == r["candidate"] else ""
        fb = v.get("feedback") or {}
        feedback = (f"{fb['negative']}/{fb['rated']} ({_pct(fb['negative_rate'])})" if fb.get("rated") else "-")
        lat, ttft = v.get("latency_ms") or {}, v.get("ttft_ms") or {}
        table.add_row(f"[bold]{escape(name)}[/bold]{role}", _bundle(v), f"{v['weight']:g}%", str(v["requests"]),
                      _pct(v["error_rate"]), _pct(v["block_rate"]), feedback, _ms(lat.get("p50")),
                      _ms(lat.get("p95")), _ms(ttft.get("p50")))
    return table


def comparisons_table(r: dict[str, Any]) -> Table | None:
    rows = [(other, metric, c) for other, metrics in r.get("comparisons", {}).items() for metric, c in metrics.items()]
    if not rows:
        return None
    table = Table("variant", "metric", "state", "diff", "confidence sequence", "why",
                  title=f"compared with {escape(r['baseline'])} (valid at every look, alpha "
                        f"{r['spec'].get('alpha', 0.05):g})", title_justify="left")
    for other, metric, c in rows:
        color = _STATE_COLORS.get(c["state"], "white")
        table.add_row(escape(other), metric, f"[{color}]{c['state']}[/{color}]", _diff(metric, c.get("diff")),
                      _ci(metric, c.get("diff_ci")), escape(c.get("reason") or ""))
    return table


def render(r: dict[str, Any], *, decisions: int = 5, note: str | None = None) -> Group:
    """A release report (GET /v1/releases/{name}) as one renderable: ``status`` prints it, ``watch`` refreshes it."""
    parts: list[Any] = [Text.from_markup(
        f"[bold]{escape(r['name'])}[/bold]  {r['strategy']}  {_status(r['status'])}  weights {_weights(r)}  "
        f"[dim](unit {r['unit']}, revision {r['revision']}, spec {r['spec_hash'][:12]})[/dim]")]
    step = _step(r)
    if step:
        parts.append(Text.from_markup(f"canary: {step}"))
    parts.append(Text.from_markup(f"decision: {_decision(r.get('decision'))}"))
    if r.get("note") and r["status"] not in FINISHED:
        parts.append(Text.from_markup(f"now: {escape(r['note'])}"))
    parts.append(variants_table(r))
    comparisons = comparisons_table(r)
    if comparisons is not None:
        parts.append(comparisons)
    srm = r.get("sample_ratio")
    if srm is not None:
        state = "[red]MISMATCH[/red]" if srm["mismatch"] else "[green]ok[/green]"
        parts.append(Text.from_markup(f"sample ratio: {state} (p = {srm['p_value']:.3g}): {escape(srm['reason'])}"))
    shadow = r.get("shadow")
    if shadow is not None:
        sim = shadow.get("similarity_mean")
        parts.append(Text.from_markup(
            f"shadow: {shadow['pairs']} pairs stored, similarity "
            f"{'-' if sim is None else f'{sim:.3f}'} (n {shadow['similarity_n']}), mean latency primary "
            f"{_ms(shadow['primary_latency_ms_mean'])} ms / shadow {_ms(shadow['shadow_latency_ms_mean'])} ms, "
            f"blocked {shadow['primary_blocked']} / {shadow['shadow_blocked']}, shadow errors "
            f"{shadow['shadow_errors']}"))
    if decisions and r.get("decisions"):
        table = Table("when", "action", "by", "reason", title="recent decisions", title_justify="left")
        for d in r["decisions"][:decisions]:
            table.add_row(datetime.fromtimestamp(d["at"]).strftime("%Y-%m-%d %H:%M:%S"), escape(d["action"]),
                          escape(d.get("actor") or ""), escape(d.get("reason") or ""))
        parts.append(table)
    if note:
        parts.append(Text.from_markup(note))
    return Group(*parts)


def _why(r: dict[str, Any]) -> str:
    """Why the release is where it is: the controller's latest reading while it holds, else the last decision."""
    if r.get("note") and r["status"] not in FINISHED:
        return r["note"]
    return (r.get("decision") or {}).get("reason") or ""


def _summary(r: dict[str, Any]) -> str:
    """One line per state change, for logs (``watch`` when stdout is not a terminal)."""
    step = f" step {r['step'] + 1}/{len(r['steps'])}" if r.get("steps") else ""
    return (f"{datetime.now().strftime('%H:%M:%S')} {escape(r['name'])} {_status(r['status'])}{step} "
            f"{_weights(r)}: {escape(_why(r))}")


def _state(r: dict[str, Any]) -> tuple:
    """What a log line is printed on: a move, or a reason that says something new; not its counters ticking
    ("collecting data (12/50 canary requests, 30/60 s)" is the same state as at 11/50)."""
    d = r.get("decision") or {}
    return (r["status"], r["step"], tuple(r["weights"].items()), d.get("action"), d.get("at"),
            re.sub(r"\d+(\.\d+)?", "#", _why(r)))


def _final(r: dict[str, Any]) -> None:
    d = r.get("decision") or {}
    who = f" by {escape(d['actor'])}" if d.get("actor") else ""
    console.print(f"release [bold]{escape(r['name'])}[/bold] {_status(r['status'])}{who}: "
                  f"{escape(d.get('reason') or '')}  (weights {_weights(r)})")


# -- commands --------------------------------------------------------------------------------------------


def _load_spec(path: Path) -> dict[str, Any]:
    """The spec file as the API takes it, validated here first; a bad file is one line and exit 2."""
    import yaml
    from pydantic import ValidationError

    from lifecycle.releases.spec import ReleaseSpec  # lazy: keeps `keel --help` fast

    def bad(message: str) -> typer.Exit:
        err.print(f"[red]error (invalid_release_spec):[/red] {escape(str(path))}: {escape(message)}")
        return typer.Exit(_EXIT_INVALID_SPEC)

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise bad(f"cannot read it: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise bad("not UTF-8 text") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise bad(f"not valid YAML: {where}{getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise bad(f"a release spec is a mapping (name, strategy, variants, ...); got {type(data).__name__}")
    try:
        ReleaseSpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for issue in e.errors():
            loc = ".".join(str(p) for p in issue["loc"])
            problems.append(f"{loc + ': ' if loc else ''}{issue['msg'].removeprefix('Value error, ')}")
        raise bad("; ".join(problems)) from e
    return data


@app.command()
def create(
    file: Annotated[Path, typer.Option("--file", "-f", help="Release spec YAML (see infra/releases/).",
                                       dir_okay=False)],
    reason: Annotated[str, typer.Option(help="Why this release: recorded with its creation.")] = "",
    override_reason: Annotated[str | None, typer.Option(
        help="Start although the candidate failed its eval gate (needs an admin key); recorded.")] = None,
    url: Url = None, api_key: Key = None,
) -> None:
    """Validate a release spec and start it: clients can call its name as `model` at once."""
    body = _load_spec(file)
    body["reason"] = reason
    if override_reason:
        body["override_reason"] = override_reason
    r = _Api(url, api_key).call("POST", "/v1/releases", body)
    console.print(f"created release [bold]{escape(r['name'])}[/bold] ({r['strategy']}, id {r['id']}, spec "
                  f"{r['spec_hash'][:12]}): {_weights(r)}")
    step = _step(r)
    if step:
        console.print(f"  canary: {step}")
    if r.get("decision") and r["decision"].get("reason"):
        console.print(f"  note: {escape(r['decision']['reason'])}")
    console.print(f"  clients call it as model={escape(r['name'])}; follow it with `keel release watch "
                  f"{escape(r['name'])}`")


@app.command("list")
def list_(url: Url = None, api_key: Key = None) -> None:
    """Every endpoint's current release."""
    data = _Api(url, api_key).call("GET", "/v1/releases")["data"]
    if not data:
        console.print("no releases yet: `keel release create -f spec.yaml`")
        return
    table = Table("name", "strategy", "status", "weights", "step", "decision (and why it holds now)", "updated")
    for r in data:
        d = r.get("decision") or {}
        step = f"{r['step'] + 1}/{len(r['steps'])}" if r.get("steps") else "-"
        why = escape(f"{d.get('action', '')}: {d.get('reason', '')}" if d else "-")
        if r.get("note") and r["status"] not in FINISHED:
            why += f"\n[dim]now: {escape(r['note'])}[/dim]"
        table.add_row(f"[bold]{escape(r['name'])}[/bold]", r["strategy"], _status(r["status"]), _weights(r), step,
                      why, datetime.fromtimestamp(r["updated_at"]).strftime("%Y-%m-%d %H:%M:%S"))
    console.print(table)


@app.command()
def status(name: str, url: Url = None, api_key: Key = None) -> None:
    """A release's state, numbers per variant, comparisons with the baseline and its decisions."""
    console.print(render(_Api(url, api_key).report(name)))


@app.command()
def watch(
    name: str,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between refreshes.")] = 2.0,
    timeout: Annotated[float | None, typer.Option(help="Give up after this many seconds (exit 3).")] = None,
    url: Url = None, api_key: Key = None,
) -> None:
    """Follow a release live until it is promoted, rolled back or stopped (exit 0), or Ctrl-C."""
    import httpx  # lazy: keeps `keel --help` fast

    api = _Api(url, api_key)
    r = api.report(name)
    if r["status"] in FINISHED:
        console.print(render(r))
        _final(r)
        return
    deadline = None if timeout is None else time.monotonic() + timeout
    logs = not console.is_terminal  # piped: one line per change as well (a pipe sees the table only at the end)
    last = None
    outcome = "finished"
    try:
        with Live(render(r, decisions=3), console=console, auto_refresh=False, transient=False) as live:
            while True:
                state = _state(r)
                if logs and state != last:
                    console.print(_summary(r))
                last = state
                if r["status"] in FINISHED:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    outcome = "timeout"
                    break
                time.sleep(interval if deadline is None else max(0.0, min(interval, deadline - time.monotonic())))
                note = None
                try:
                    r = api.report(name, retry=True)
                except httpx.HTTPError as e:  # a server restarting: keep the last numbers on screen, try again
                    note = f"[yellow]cannot reach {escape(api.url)}: {escape(str(e))}; retrying[/yellow]"
                live.update(render(r, decisions=3, note=note), refresh=True)
    except KeyboardInterrupt:
        outcome = "interrupted"
    if not console.is_terminal:
        console.line()  # Live ends a non-terminal's last table without one
    if outcome == "timeout":
        err.print(f"[yellow]{escape(name)} is still {r['status']} after {timeout:g} s[/yellow] (`keel release "
                  f"status {escape(name)}`)")
        raise typer.Exit(_EXIT_TIMEOUT)
    if outcome == "interrupted":
        err.print(f"stopped watching; {escape(name)} goes on ({r['status']}): `keel release status {escape(name)}`")
        raise typer.Exit(_EXIT_INTERRUPTED)
    _final(r)


def _act(name: str, action: str, body: dict[str, Any], url: str | None, api_key: str | None,
         timeout: float = 30) -> dict[str, Any]:
    r = _Api(url, api_key).call("POST", f"/v1/releases/{name}/{action}", body, timeout=timeout)
    _final(r)
    return r


@app.command()
def promote(
    name: str,
    reason: Reason,
    variant: Annotated[str | None, typer.Option(help="The variant to send all traffic to (default: the "
                                                "candidate).")] = None,
    url: Url = None, api_key: Key = None,
) -> None:
    """All traffic to the candidate (or --variant), now. Blue/green switches only after green answers its
    readiness probes."""
    body: dict[str, Any] = {"reason": reason}
    if variant:
        body["variant"] = variant
    _act(name, "promote", body, url, api_key, timeout=600)  # blue/green runs its probes first


@app.command()
def rollback(name: str, reason: Reason, url: Url = None, api_key: Key = None) -> None:
    """All traffic back to the baseline, now (also after a promotion: blue/green's instant way back)."""
    _act(name, "rollback", {"reason": reason}, url, api_key)


@app.command()
def pause(name: str, reason: Reason, url: Url = None, api_key: Key = None) -> None:
    """Hold a canary at its current step (a worse canary is still rolled back)."""
    _act(name, "pause", {"reason": reason}, url, api_key)


@app.command()
def resume(name: str, reason: Annotated[str, typer.Option(help="Recorded with the decision.")] = "",
           url: Url = None, api_key: Key = None) -> None:
    """Let a paused release move again."""
    _act(name, "resume", {"reason": reason}, url, api_key)
