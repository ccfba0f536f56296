"""``keel monitor``: drift checks of production traffic, run by the API (where the traffic's features are).

``keel monitor drift`` asks the running API (``--url``, default ``server.url``; key from ``--api-key``,
``KEEL_API_KEY`` or the dev key ``keel up`` wrote; it needs the ``monitor`` scope) to compare the last ``--window``
of traffic with a reference, prints every check and the report's URL and path, and exits with

* **0**: no drift;
* **3**: drift detected (so a cron job or CI step can act on it);
* **4**: not enough data in a window to tell (``monitor.min_rows``; ``--min-rows`` lowers it for one check);
* **1**: an error (the API refused the request, or cannot be reached); **2**: a bad option.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from app.cli.common import ApiClient, Url, api_key_option

monitor_app = typer.Typer(help="Production monitoring: drift of the traffic Keel answers.", no_args_is_help=True)
console = Console(highlight=False)

EXIT_DRIFT = 3
EXIT_NOT_ENOUGH_DATA = 4

Key = api_key_option("API key with the 'monitor' scope (or KEEL_API_KEY; default: <home>/dev-api-key).", "--api-key",
                     "--key")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_STATE_COLORS = {"drift": "red", "ok": "green", "skipped": "dim"}
_VERDICT_COLORS = {"drift": "red", "no_drift": "green", "not_enough_data": "yellow"}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``2d``, ``1w`` -> seconds."""
    m = _DURATION.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a duration: use e.g. 30m, 1h, 2d or seconds")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def parse_reference(text: str, variant: str | None, compare: str) -> dict[str, Any]:
    kind, _, name = (text or "").strip().partition(":")
    if kind == "window" and not name:
        return {"kind": "window"}
    if kind == "release" and name:
        ref: dict[str, Any] = {"kind": "release", "release": name, "compare": compare}
        if variant:
            ref["variant"] = variant
        return ref
    if kind == "suite" and name:
        return {"kind": "suite", "suite": name}
    raise typer.BadParameter(f"{text!r}: use window, release:NAME or suite:NAME", param_hint="--reference")


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def checks_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"drift check {result['id']}", title_justify="left")
    for col, kw in (("check", {}), ("state", {}), ("method", {"overflow": "fold", "max_width": 40}),
                    ("statistic", {"justify": "right"}), ("threshold", {"justify": "right"}),
                    ("reference", {"justify": "right"}), ("current", {"justify": "right"}),
                    ("rows (ref / cur)", {"justify": "right"}), ("note", {"overflow": "fold", "max_width": 40})):
        table.add_column(col, **kw)
    for c in result["checks"]:
        color = _STATE_COLORS.get(c["state"], "white")
        stat = _num(c.get("statistic"))
        if c.get("statistic_kind"):
            stat += f" [dim]{c['statistic_kind'].replace('_', '-')}[/dim]"
        table.add_row(escape(c["name"]), f"[{color}]{c['state']}[/{color}]", escape(c.get("method") or "-"), stat,
                      _num(c.get("threshold")), _num(c.get("reference_value")), _num(c.get("current_value")),
                      f"{c.get('reference_rows', 0)} / {c.get('current_rows', 0)}", escape(c.get("note") or ""))
    return table


def _reference_text(ref: dict[str, Any]) -> str:
    if ref["kind"] == "suite":
        return f"eval suite {ref.get('suite')}"
    if ref["kind"] == "release":
        arm = f"release {ref.get('release')}, baseline arm {ref.get('variant')}"
        return arm + (" vs the candidate" if ref.get("compare") == "candidate" else " (its earlier window)") + \
            f", {_when(ref.get('since'))} .. {_when(ref.get('until'))}"
    return f"window {_when(ref.get('since'))} .. {_when(ref.get('until'))}"


def print_result(result: dict[str, Any], api_url: str) -> None:
    if result["checks"]:
        console.print(checks_table(result))
    cur, ref = result["current"], result["reference"]
    arm = f" (release {cur['release']} arm {cur['variant']})" if cur.get("release") else ""
    console.print(f"current:   {cur['rows']} rows, {_when(cur['since'])} .. {_when(cur['until'])}{escape(arm)}")
    console.print(f"reference: {ref['rows']} rows, {escape(_reference_text(ref))}")
    for note in result.get("notes") or []:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    verdict = result["verdict"]
    color = _VERDICT_COLORS.get(verdict, "white")
    ran = sum(c["state"] != "skipped" for c in result["checks"])
    share = result.get("drift_share")
    detail = "" if share is None else (f": {len(result['drifted_checks'])} of {ran} checks drifted ({share:.0%}; "
                                       f"threshold {result['settings']['drift_share']:.0%}"
                                       + (f"; {', '.join(result['drifted_checks'])}" if result["drifted_checks"]
                                          else "") + ")")
    console.print(f"verdict:   [bold {color}]{verdict.replace('_', ' ')}[/bold {color}]{escape(detail)}")
    if result.get("report"):
        console.print(f"report:    {api_url}{result['report_url']}  (on the server: {escape(result['report'])})")


def exit_code(result: dict[str, Any]) -> int:
    return {"drift": EXIT_DRIFT, "no_drift": 0}.get(result["verdict"], EXIT_NOT_ENOUGH_DATA)


@monitor_app.command()
def drift(
    window: Annotated[str, typer.Option(help="The current window: the last 30m, 1h, 2d... (default: "
                                             "monitor.window_s).", show_default=False)] = "",
    reference: Annotated[str, typer.Option(help="window (the window before), release:NAME (its baseline arm vs "
                                                "its candidate) or suite:NAME (an eval suite's inputs).")] = "window",
    variant: Annotated[str | None, typer.Option(help="release: the baseline arm (default: the release's "
                                                     "baseline).")] = None,
    compare: Annotated[str, typer.Option(help="release: candidate (the baseline vs the candidate) or earlier (the "
                                              "baseline vs its own earlier window).")] = "candidate",
    min_rows: Annotated[int | None, typer.Option(min=2, help="Rows each window needs (default "
                                                             "monitor.min_rows).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    url: Url = None,
    api_key: Key = None,
) -> None:
    """Compare the last window of traffic with a reference. Exit 0: no drift, 3: drift, 4: not enough data,
    1: error."""
    if compare not in ("candidate", "earlier"):
        raise typer.BadParameter("use candidate or earlier", param_hint="--compare")
    body: dict[str, Any] = {"reference": parse_reference(reference, variant, compare)}
    if window:
        body["window_s"] = parse_duration(window)
    if min_rows is not None:
        body["min_rows"] = min_rows
    api = ApiClient(url, api_key)
    result = api.call("POST", "/v1/monitor/drift", body, timeout=900)
    if as_json:
        console.print_json(json.dumps(result))
    else:
        print_result(result, api.url)
    raise typer.Exit(exit_code(result))


@monitor_app.command("history")
def history(limit: Annotated[int, typer.Option(min=1, max=1000)] = 20, url: Url = None, api_key: Key = None) -> None:
    """The latest drift checks, newest first."""
    api = ApiClient(url, api_key)
    rows = api.call("GET", "/v1/monitor/drift", params={"limit": limit})["data"]
    table = Table(title="drift checks", title_justify="left")
    for col in ("id", "when", "by", "reference", "rows (ref / cur)", "verdict", "drifted checks"):
        table.add_column(col)
    for r in rows:
        color = _VERDICT_COLORS.get(r["verdict"], "white")
        table.add_row(r["id"], _when(r["created"]), escape(r.get("actor") or ""), escape(_reference_text(
            r["reference"])), f"{r['reference']['rows']} / {r['current']['rows']}",
            f"[{color}]{r['verdict']}[/{color}]", escape(", ".join(r.get("drifted_checks") or []) or "-"))
    console.print(table)


@monitor_app.command("show")
def show(check_id: str, url: Url = None, api_key: Key = None) -> None:
    """One stored drift check (exit codes as for drift)."""
    api = ApiClient(url, api_key)
    result = api.call("GET", f"/v1/monitor/drift/{check_id}")
    print_result(result, api.url)
    raise typer.Exit(exit_code(result))
