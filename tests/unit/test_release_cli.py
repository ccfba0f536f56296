"""`keel release` against a real Keel API: uvicorn on a localhost port in a thread, the container built on
scripted backends (the release controller running in it, as in `keel serve`), the CLI talking HTTP to it exactly
as it does in production. Also: every example spec in infra/releases/ is a valid ReleaseSpec."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from app.cli import releases as cli
from app.cli.common import DEV_KEY_FILE
from app.cli.main import app as keel_app
from ingest.embedding import HashingEmbedder
from lifecycle.releases.spec import ReleaseSpec
from tests.cli_server import ApiServer, cli_env
from tests.fakes.llm import ScriptedBackend

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "infra" / "releases").glob("*.yaml"))
runner = CliRunner()


# -- the examples ----------------------------------------------------------------------------------------


def test_there_is_an_example_of_every_strategy() -> None:
    strategies = {yaml.safe_load(p.read_text())["strategy"] for p in EXAMPLES}
    assert strategies == {"ab", "canary", "shadow", "bluegreen"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_are_valid(path: Path) -> None:
    text = path.read_text()
    assert text.lstrip().startswith("#"), "an example says what it does and how to run it"
    spec = ReleaseSpec.model_validate(yaml.safe_load(text))
    assert f"infra/releases/{path.name}" in text  # its own `keel release create -f` line
    assert sum(spec.initial_weights().values()) == pytest.approx(100)


# -- a real server -----------------------------------------------------------------------------------------


class Server(ApiServer):
    """The API with two scripted models (m, m2) and the release controller deciding every 0.2 s."""

    def __init__(self, home: Path) -> None:
        self.stable, self.candidate = ScriptedBackend(reply="Stable answer."), ScriptedBackend(reply="Candidate.")
        super().__init__(home, settings=dict(
            backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0},
                      "other": {"kind": "openai", "base_url": "http://unused2/v1", "retries": 0}},
            models={"m": {"backend": "local", "model": "fake-model"}, "m2": {"backend": "other", "model": "fake-2"}},
            default_model="m", auth={"default_rate_limit_per_minute": 100_000}, guardrails={"enabled": False},
            releases={"check_interval_s": 0, "decide_interval_s": 0.2},
        ), backends={"local": self.stable, "other": self.candidate},
            keys={"admin": ["admin"], "rel": ["releases"], "chat": ["chat"]}, embedder=HashingEmbedder(64))

    def ask(self, model: str, n: int, **extra) -> list[dict]:
        out = []
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.keys['chat']}"},
                          timeout=30) as c:
            for i in range(n):
                body = {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}], **extra}
                if "user" not in extra:
                    body["user"] = f"u{i}"
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                out.append(r.json())
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keel-release-cli")).start()
    yield s
    s.stop()


@pytest.fixture
def keel(server, tmp_path, monkeypatch):
    """Runs `keel release ...` (through the real `keel` app) with the releases key, on a wide console."""
    cli_env(monkeypatch, tmp_path, server.keys["rel"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "console", Console(width=250, highlight=False))

    def run(*args: str, code: int = 0, url: bool = True) -> str:
        extra = ["--url", server.url] if url and args[0] not in ("--help",) else []
        result = runner.invoke(keel_app, ["release", *args, *extra])
        out = " ".join(result.output.split())  # rich wraps stderr at 80 columns
        assert result.exit_code == code, result.output
        assert "Traceback" not in result.output
        run.raw = result.output
        return out

    return run


def row(output: str, first: str, *, exact: bool = False) -> list[str]:
    """The cells of the first table row whose first cell starts with (or is) ``first``."""
    for line in output.splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] == first if exact else cells[0].startswith(first):
            return cells
    raise AssertionError(f"no row {first!r} in\n{output}")


def write(tmp_path: Path, name: str, spec: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


TWO = [{"name": "stable", "model": "m"}, {"name": "canary", "model": "m2"}]


# -- create from files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, says", [
    ("name: broken\nstrategy: ab: c\n", "not valid YAML: line 2, column 13: mapping values are not allowed here"),
    ("- just\n- a list\n", "a release spec is a mapping"),
    ("name: x\nstrategy: ab\nvariants: [{name: a}, {name: b}]\nweights: {a: 60, b: 50}\n", "adding up to 100"),
    ("name: Bad Name\nstrategy: ab\nvariants: [{name: a}, {name: b}]\n", "name: release name 'Bad Name' must"),
    ("name: x\nstrategy: canary\nvariants: [{name: a}, {name: b}]\ncanary: {steps: [5, 50]}\n",
     "canary.steps: canary steps must end at 100"),
    ("name: x\nstrategy: ab\nvariants: [{name: a}, {name: b}]\ncolour: blue\n", "colour: Extra inputs"),
])
def test_a_bad_spec_file_is_one_line_and_exit_2_before_any_request(tmp_path, monkeypatch, content, says) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    monkeypatch.setenv("KEEL_API_KEY", "unused")
    # nothing listens on port 9: a request would end in "cannot reach", not in the spec's error
    result = runner.invoke(keel_app, ["release", "create", "-f", str(path), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert out.startswith("error (invalid_release_spec):") and says in out, out
    assert "Traceback" not in result.output and "cannot reach" not in out


def test_a_missing_file_is_one_line_too(tmp_path) -> None:
    result = runner.invoke(keel_app, ["release", "create", "-f", str(tmp_path / "nope.yaml"), "--url",
                                      "http://127.0.0.1:9", "--api-key", "x"])
    assert result.exit_code == 2 and "cannot read it" in result.output and "Traceback" not in result.output


def test_create_status_list_promote_rollback(server, keel, tmp_path) -> None:
    spec = write(tmp_path, "ab.yaml", {"name": "cli-ab", "strategy": "ab", "variants": TWO, "unit": "user",
                                       "metrics": [{"name": "errors", "margin": 0.2}]})
    out = keel("create", "-f", spec, "--reason", "try m2")
    assert "created release cli-ab (ab," in out and "stable 50% / canary 50%" in out
    answers = server.ask("cli-ab", 40)
    assert {a["release"]["variant"] for a in answers} == {"stable", "canary"}

    out = keel("status", "cli-ab")
    assert "cli-ab ab running weights stable 50% / canary 50%" in out
    for column in ("requests", "error rate", "block rate", "neg. feedback", "latency p50", "latency p95",
                   "TTFT p50"):
        assert column in out
    for variant, role, model in (("stable", "baseline", "m"), ("canary", "candidate", "m2")):
        cells = row(keel.raw, variant)
        served = sum(a["release"]["variant"] == variant for a in answers)
        assert cells[:8] == [f"{variant} ({role})", f"model {model}", "50%", str(served), "0.0%", "0.0%", "-",
                             cells[7]]
        assert all(float(c) >= 0 for c in cells[7:10]), cells  # latency p50, p95, TTFT p50 (ms)
    assert "compared with stable" in out and "confidence sequence" in out
    cells = row(keel.raw, "canary", exact=True)  # the comparisons: variant, metric, state, diff, CI, why
    assert cells[1] == "errors" and cells[2] in ("pass", "inconclusive") and cells[3].endswith(" pp")
    assert cells[4].startswith("[-") and cells[4].endswith("] pp") and "errors" in cells[5]
    assert "sample ratio: ok" in out
    _when, action, actor, reason = row(keel.raw, "20")  # recent decisions: the creation, by whom and why
    assert (action, reason) == ("create", "try m2") and actor.startswith("rel [")
    assert "decision: create by rel" in out  # the last change; and the controller's reading, once it has looked:
    deadline = time.monotonic() + 10
    while server.container.releases.get("cli-ab").note is None:
        assert time.monotonic() < deadline, "the controller never looked at cli-ab"
        time.sleep(0.05)
    assert "now: running; promote a variant when its numbers convince you" in keel("status", "cli-ab")

    out = keel("list")
    assert "cli-ab" in out and "running" in out

    out = keel("promote", "cli-ab", "--variant", "canary", "--reason", "fewer complaints")
    assert "release cli-ab promoted by rel" in out and "fewer complaints" in out and "canary 100%" in out
    assert {a["release"]["variant"] for a in server.ask("cli-ab", 5)} == {"canary"}
    out = keel("rollback", "cli-ab", "--reason", "latency regression")
    assert "release cli-ab rolled_back" in out and "latency regression" in out and "stable 100%" in out
    assert {a["release"]["variant"] for a in server.ask("cli-ab", 5)} == {"stable"}
    out = keel("status", "cli-ab")
    assert "rolled_back" in out and "recent decisions" in out
    assert out.index("latency regression") < out.index("fewer complaints") < out.index("try m2")  # newest first


def test_promote_and_rollback_need_a_reason(keel) -> None:
    for action in ("promote", "rollback", "pause"):
        out = keel(action, "cli-anything", code=2)
        assert "--reason" in out


def test_pause_and_resume_a_canary(server, keel, tmp_path) -> None:
    spec = write(tmp_path, "c.yaml", {"name": "cli-pause", "strategy": "canary", "variants": TWO,
                                      "canary": {"steps": [10, 100], "min_requests": 1000}})
    keel("create", "-f", spec)
    out = keel("pause", "cli-pause", "--reason", "holiday freeze")
    assert "release cli-pause paused" in out and "holiday freeze" in out
    out = keel("status", "cli-pause")
    assert "paused" in out and "canary: step 1/2 at 10% (10% -> 100%)" in out
    out = keel("resume", "cli-pause")
    assert "release cli-pause running" in out
    keel("rollback", "cli-pause", "--reason", "done")


# -- watch -------------------------------------------------------------------------------------------------


def test_watch_follows_a_canary_until_the_controller_promotes_it(server, keel, tmp_path) -> None:
    spec = write(tmp_path, "canary.yaml", {
        "name": "cli-canary", "strategy": "canary", "variants": TWO, "unit": "request",
        "canary": {"steps": [50, 100], "min_requests": 20, "min_duration_s": 0},
        "metrics": [{"name": "errors", "margin": 0.3}]})
    keel("create", "-f", spec)
    # the traffic comes while `watch` runs: it sees the canary running, then the controller's promotion
    traffic = threading.Timer(0.8, server.ask, ("cli-canary", 80))
    traffic.start()
    t0 = time.monotonic()
    try:
        out = keel("watch", "cli-canary", "--interval", "0.2", "--timeout", "30")
    finally:
        traffic.join(30)
    assert time.monotonic() - t0 < 30
    # piped: one line per change, then the final table and the decision
    assert "cli-canary running step 1/2 stable 50% / canary 50%" in out
    assert "release cli-canary promoted by controller: step 1/2 at 50% passed (errors within 0.3); promoted to " \
           "100%" in out
    assert "cli-canary canary promoted weights stable 0% / canary 100%" in out


def test_watch_exits_at_once_on_a_finished_release_and_gives_up_at_its_timeout(server, keel, tmp_path) -> None:
    keel("create", "-f", write(tmp_path, "w.yaml", {"name": "cli-watch", "strategy": "ab", "variants": TWO}))
    out = keel("watch", "cli-watch", "--interval", "0.1", "--timeout", "0.5", code=3)
    assert "cli-watch is still running after 0.5 s" in out
    keel("rollback", "cli-watch", "--reason", "enough")
    out = keel("watch", "cli-watch")
    assert "release cli-watch rolled_back by rel" in out and "enough" in out


# -- errors ------------------------------------------------------------------------------------------------


def test_api_errors_print_one_line_with_their_code(server, keel, tmp_path, monkeypatch) -> None:
    assert "error (release_not_found): no release 'nope'" in keel("status", "nope", code=1)
    assert "error (release_not_found)" in keel("watch", "nope", code=1)
    out = keel("create", "-f", write(tmp_path, "m.yaml", {"name": "cli-err", "strategy": "ab", "variants": [
        {"name": "a", "model": "m"}, {"name": "b", "model": "gpt-9"}]}), code=1)
    assert "error (unknown_model): variant 'b': model 'gpt-9' is not a model alias (available: m, m2" in out
    out = keel("create", "-f", write(tmp_path, "t.yaml", {"name": "m", "strategy": "ab", "variants": TWO}), code=1)
    assert "error (release_name_taken)" in out
    keel("create", "-f", write(tmp_path, "e.yaml", {"name": "cli-err", "strategy": "ab", "variants": TWO}))
    assert "error (release_exists)" in keel("create", "-f", str(tmp_path / "e.yaml"), code=1)
    assert "error (invalid_request)" in keel("promote", "cli-err", "--variant", "nope", "--reason", "x", code=1)
    keel("rollback", "cli-err", "--reason", "x")
    assert "error (release_finished)" in keel("pause", "cli-err", "--reason", "x", code=1)
    monkeypatch.setenv("KEEL_API_KEY", server.keys["chat"])  # a chat key cannot steer releases
    out = keel("list", code=1)
    assert out.startswith("error (") and "releases" in out
    monkeypatch.setenv("KEEL_API_KEY", "keel-not-a-key")
    assert keel("list", code=1).startswith("error (")


def test_an_api_that_is_not_running_is_one_line(keel) -> None:
    out = keel("list", "--url", "http://127.0.0.1:9", url=False, code=1)
    assert out.startswith("cannot reach http://127.0.0.1:9:") and "keel serve" in out


def test_url_and_key_default_to_the_settings_and_the_dev_key(server, keel, tmp_path, monkeypatch) -> None:
    """No --url, no KEEL_API_KEY: server.url from the settings and the key `keel up` wrote, as every
    sub-command does."""
    home = tmp_path / "dev-home"
    home.mkdir()
    (home / DEV_KEY_FILE).write_text(server.keys["admin"] + "\n")
    monkeypatch.setenv("KEEL_HOME", str(home))
    monkeypatch.setenv("KEEL_SERVER__HOST", "127.0.0.1")
    monkeypatch.setenv("KEEL_SERVER__PORT", str(server.port))
    monkeypatch.delenv("KEEL_API_KEY")
    keel("create", "-f", write(tmp_path, "d.yaml", {"name": "cli-dev", "strategy": "ab", "variants": TWO}),
         url=False)
    out = keel("list", url=False)
    assert "cli-dev" in out
    keel("rollback", "cli-dev", "--reason", "x", url=False)


def test_watch_rides_out_an_api_restart(tmp_path, monkeypatch) -> None:
    """The API going away mid-watch is a note on the screen and another try, not the end of the watch."""
    own = Server(tmp_path / "home").start()
    try:
        monkeypatch.setenv("KEEL_API_KEY", own.keys["rel"])
        monkeypatch.setattr(cli, "console", Console(width=250, highlight=False))
        path = write(tmp_path, "r.yaml", {"name": "cli-restart", "strategy": "ab", "variants": TWO})
        assert runner.invoke(keel_app, ["release", "create", "-f", path, "--url", own.url]).exit_code == 0
        threading.Timer(0.6, own.stop).start()
        result = runner.invoke(keel_app, ["release", "watch", "cli-restart", "--url", own.url, "--interval", "0.2",
                                          "--timeout", "2"])
    finally:
        own.stop()
    out = " ".join(result.output.split())
    assert result.exit_code == 3, result.output
    assert f"cannot reach {own.url}" in out and "retrying" in out and "Traceback" not in result.output
    assert "cli-restart is still running after 2 s" in out
