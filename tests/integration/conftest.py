"""A real Keel API process supervising a real vLLM CPU server with the real SmolLM2 model.

Started once per test session (vLLM takes ~40 s to start with --enforce-eager). `make test`
prepares both virtual environments and the model; without them these tests fail with the
command to run, unless KEEL_SKIP_VLLM_TESTS=1 says to skip them on purpose.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.security.keys import KeyStore

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = ROOT / ".keel" / "models" / "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class KeelServer:
    url: str
    vllm_url: str
    home: Path
    proc: subprocess.Popen
    keys: dict[str, str]
    log: Path
    vllm_api_key: str = ""  # the managed vLLM requires it: tests that call that server directly send it

    def headers(self, key: str = "chat") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def vllm_metric(self, name: str) -> float:
        """Sum of a vLLM Prometheus metric across its label sets."""
        text = httpx.get(f"{self.vllm_url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within a minute (no-op once it has exited); to its whole
        process group where it leads one (``start_api``'s processes: a managed child goes too)."""
        if self.proc.poll() is not None:
            return
        group = os.getpgid(self.proc.pid) == self.proc.pid

        def send(sig: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)

        send(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            send(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keel exited ({self.proc.returncode}); log:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"keel not ready after {timeout} s; log:\n{self.log.read_text()[-4000:]}")


def _require_real_parts() -> None:
    missing = [str(p) for p in (VLLM_PYTHON, MODEL / "config.json") if not p.exists()]
    if missing:
        if os.environ.get("KEEL_SKIP_VLLM_TESTS") == "1":
            pytest.skip("KEEL_SKIP_VLLM_TESTS=1: real vLLM tests skipped on purpose")
        pytest.fail(f"missing {', '.join(missing)}: run `make model` (or `make test`) first", pytrace=False)


@pytest.fixture(scope="session")
def keel_server(tmp_path_factory: pytest.TempPathFactory) -> KeelServer:
    _require_real_parts()
    home = tmp_path_factory.mktemp("keel-home")
    api_port, vllm_port, dead_port = free_port(), free_port(), free_port()
    vllm_key = secrets.token_urlsafe(24)
    config = {
        "home": str(home),
        "server": {"port": api_port},
        "auth": {"default_rate_limit_per_minute": 10_000},
        "backends": {
            # a configured key (not a random one per start): tests also call this vLLM server directly
            "local": {"kind": "vllm", "read_timeout_s": 60, "api_key": vllm_key, "managed": {
                "python": str(VLLM_PYTHON), "port": vllm_port, "model_path": str(MODEL),
                "enforce_eager": True, "restart_backoff_s": 1.0}},
            # Nothing listens here: the primary of the fallback alias below.
            "dead": {"kind": "openai", "base_url": f"http://127.0.0.1:{dead_port}/v1", "retries": 1,
                     "retry_backoff_s": 0.05},
        },
        "models": {"flaky": {"backend": "dead", "model": "smollm2", "fallback": "smollm2"}},
        # The real promotion gate: `production` moves only to a version with a passing eval run. Tests
        # put the suites they run by name into <home>/suites (the shipped ones are found too).
        "evals": {"gate_enabled": True, "suites_dir": str(home / "suites")},
        # canaries are judged every second (not every 5): the release tests wait for decisions
        "releases": {"decide_interval_s": 1},
    }
    (home / "suites").mkdir()
    cfg = home / "keel.yaml"
    cfg.write_text(yaml.safe_dump(config))
    store = KeyStore(home / "keel.db")
    keys = {
        "admin": store.create("admin", ["admin"])[1],
        "chat": store.create("chat", ["chat"])[1],
        "prompts": store.create("prompts-only", ["prompts:write"])[1],
        "limited": store.create("limited", ["chat"], rate_limit_per_minute=3)[1],
        # what an on-call engineer's key holds: the ops agent and the lifecycle tools, no key management
        "ops": store.create("ops", ["chat", "releases", "monitor", "evals", "finetune", "prompts:write"])[1],
    }
    store.close()
    log = home / "keel.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_CONFIG=str(cfg), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    server = KeelServer(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{vllm_port}", home, proc, keys, log,
                        vllm_key)
    try:
        server.wait_ready()
    except BaseException:
        proc.kill()
        raise
    yield server
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    # Keel must take its vLLM server down with it.
    deadline = time.monotonic() + 30
    while port_open(vllm_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not port_open(vllm_port), "vLLM still listening after Keel shut down"


def start_api(home: Path, *, database_url: str, vllm_url: str, vllm_key: str, poll_s: float | None = None
              ) -> KeelServer:
    """Another Keel API process (``keel serve``) with a home of its own, as on another machine, on the shared
    database ``database_url`` and the vLLM server at ``vllm_url``; not waited for (``wait_ready``). ``poll_s``:
    share the job queue too, in the same database, polled that often."""
    port = free_port()
    config = {
        "home": str(home),
        "database_url": database_url,
        "server": {"port": port},
        "auth": {"default_rate_limit_per_minute": 10_000},
        # one vLLM for every process: a URL means connect to it, not start one
        "backends": {"local": {"kind": "vllm", "base_url": f"{vllm_url}/v1", "api_key": vllm_key,
                               "read_timeout_s": 60}},
        "routing": {"check_interval_s": 0.2},
        "models": {"smollm2-b": {"backend": "local", "model": "smollm2"}},  # a release's second variant
    }
    if poll_s is not None:
        # one job queue for both (the jobs here need no file of either home): a process that dies leaves its jobs
        # to the other once their lease lapses
        config["jobs"] = {"url": database_url, "lease_s": 6, "heartbeat_s": 2, "poll_s": poll_s}
    home.mkdir(parents=True, exist_ok=True)
    (home / "keel.yaml").write_text(yaml.safe_dump(config))
    log = home / "keel.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_CONFIG=str(home / "keel.yaml"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return KeelServer(f"http://127.0.0.1:{port}", vllm_url, home, proc, {}, log)


def eventually(check, timeout: float = 5.0):
    """``check()`` once it is truthy; a change made through one process must reach the other within seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)
