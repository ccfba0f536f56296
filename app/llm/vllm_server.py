"""Run vLLM's OpenAI-compatible server as a supervised child process.

vLLM lives in its own virtual environment because its build pins its own
torch and transformers. The supervisor starts it, waits for readiness, watches
liveness, restarts it when it dies or hangs, and stops it (and its engine
processes) on shutdown. If Keel itself is killed, the kernel sends the server
SIGTERM (PR_SET_PDEATHSIG), so no orphan keeps the port and the memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx

from app.core.errors import KeelError
from app.core.settings import CoreConfig, ManagedVLLM, server_root
from app.llm.model_prep import chat_template_for

log = logging.getLogger("keel.vllm")

State = Literal["stopped", "starting", "ready", "restarting", "failed"]
_PR_SET_PDEATHSIG = 1
_MAX_LOG_BYTES = 50_000_000

# The server gets an allow list of Keel's environment, not all of it: it loads LoRA folders named over
# HTTP and runs third-party code, and Keel's environment holds its secrets (KEEL_*, provider keys,
# database URLs). Locale, temp and home, and the variables of the libraries it runs on, pass.
_ENV_ALLOWED = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
                          "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "TOKENIZERS_PARALLELISM"})
_ENV_ALLOWED_PREFIXES = ("LC_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "VLLM_", "OMP_", "OPENBLAS_", "MKL_", "KMP_",
                         "TORCH", "PYTORCH_", "CUDA", "NVIDIA_", "NCCL_", "TRITON_")
# ...except what looks like a credential even under an allowed prefix (HF_TOKEN, an inherited VLLM_API_KEY).
_ENV_SECRET = re.compile(r"(^|_)(KEYS?|TOKEN|SECRET|PASSWORD|PASSWD|PASS|CREDENTIALS?|DSN)(_|$)|DATABASE_URL",
                         re.IGNORECASE)
# Keys of the servers this process started, by their base URL: only this process knows them, and Keel code
# that calls a managed server directly (LoRA loading, the eval judge) looks them up here.
_API_KEYS: dict[str, str] = {}


def server_api_key(settings: CoreConfig, url: str) -> str | None:
    """The key the server at ``url`` requires: the per-start key of a vLLM server this process runs, else the
    ``api_key`` configured on the backend with that URL (a server another process runs, or a remote one)."""
    key = managed_api_key(url)
    if key is not None:
        return key
    root = server_root(url)
    for b in settings.backends.values():
        if b.api_key is not None and any(server_root(at) == root for at in b.server_urls()):
            return b.api_key.get_secret_value()
    return None


def managed_api_key(url: str) -> str | None:
    """The API key of the managed vLLM server at ``url`` ('http://h:p' or 'http://h:p/v1'), if this process
    started it; None for any other server."""
    return _API_KEYS.get(server_root(url))


def scrubbed_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of ``environ`` a vLLM child process may inherit."""
    return {k: v for k, v in environ.items()
            if (k in _ENV_ALLOWED or k.startswith(_ENV_ALLOWED_PREFIXES)) and not _ENV_SECRET.search(k)}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class VLLMSupervisor:
    def __init__(
        self, name: str, cfg: ManagedVLLM, log_path: Path, *,
        on_restart: Callable[[], None] | None = None,
        liveness_interval_s: float = 5.0, liveness_failures: int = 3, fixed_key: str | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.log_path = log_path
        self.on_restart = on_restart
        self.liveness_interval_s = liveness_interval_s
        self.liveness_failures = liveness_failures
        self.state: State = "stopped"
        self.restarts = 0  # since Keel started (status, metrics); the budget counts those of restart_window_s
        self._recent_restarts: deque[float] = deque()
        # Called (each as a task) every time a restarted server is ready: it has lost what was loaded into it at
        # run time (LoRA adapters), which its owner puts back.
        self.on_ready_again: list[Callable[[], Awaitable[None]]] = []
        self._notifying: set[asyncio.Task[None]] = set()
        self._was_ready = False
        self.pid: int | None = None
        self.last_exit_code: int | None = None
        self.last_error: str | None = None
        self.ready_at: float | None = None
        # A new random key each time Keel starts the server (vLLM then refuses /v1 requests without it;
        # /health and /metrics stay open), or the backend's configured api_key where other processes must reach
        # it too (a fine-tune worker's judge, tests). Kept across crash restarts so clients need not follow it.
        self.fixed_key = fixed_key
        self.api_key: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._ready = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.cfg.port}"

    def command(self) -> list[str]:
        cfg = self.cfg
        cmd = [
            str(cfg.python), "-m", "vllm.entrypoints.openai.api_server",
            "--host", cfg.host, "--port", str(cfg.port),
            "--model", str(cfg.model_path), "--served-model-name", cfg.served_model_name,
            "--max-model-len", str(cfg.max_model_len),
            "--disable-uvicorn-access-log",
        ]
        if cfg.enforce_eager:
            cmd.append("--enforce-eager")
        template = cfg.chat_template or (chat_template_for(cfg.model_path) if cfg.model_path else None)
        if template is not None:
            cmd += ["--chat-template", str(template)]
        if cfg.tool_call_parser:
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", cfg.tool_call_parser,
                    "--tool-strict-level", cfg.tool_strict_level]
        if cfg.enable_lora or cfg.lora_modules:
            cmd += ["--enable-lora", "--max-loras", str(cfg.max_loras), "--max-lora-rank", str(cfg.max_lora_rank)]
            if cfg.lora_modules:
                cmd += ["--lora-modules", *(f"{n}={p}" for n, p in cfg.lora_modules.items())]
        return cmd + list(cfg.extra_args)

    def environment(self) -> dict[str, str]:
        # Not VIRTUAL_ENV, PYTHONPATH or PYTHONHOME either: vLLM runs in its own virtual environment.
        env = scrubbed_environment(os.environ) | self.cfg.env
        env.update(
            VLLM_TARGET_DEVICE=env.get("VLLM_TARGET_DEVICE", "cpu"),
            VLLM_CPU_KVCACHE_SPACE=str(self.cfg.kv_cache_gb),
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
            # Adapters promoted later are loaded into the running server without a restart.
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        )
        if self.api_key:
            # vLLM reads the key from VLLM_API_KEY as from --api-key; the environment, unlike a command line,
            # is not readable by every local user (/proc/<pid>/cmdline), the log or the admin status.
            env["VLLM_API_KEY"] = self.api_key
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def status(self) -> dict[str, object]:
        return {
            "state": self.state, "pid": self.pid, "restarts": self.restarts, "url": self.base_url,
            "last_exit_code": self.last_exit_code, "last_error": self.last_error,
            "log_file": str(self.log_path), "command": self.command(),
        }

    def tail(self, lines: int = 200) -> list[str]:
        try:
            with self.log_path.open("r", errors="replace") as f:
                return [line.rstrip("\n") for line in deque(f, maxlen=lines)]
        except FileNotFoundError:
            return []

    async def start(self) -> None:
        """Start the server in the background; returns at once (see :meth:`wait_ready`)."""
        if self._task is not None and not self._task.done():
            return
        self.preflight()
        self._stopping = False
        self.api_key = self.fixed_key or secrets.token_urlsafe(32)
        _API_KEYS[self.base_url] = self.api_key
        self._task = asyncio.create_task(self._run(), name=f"vllm-supervisor-{self.name}")

    async def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float = 20.0) -> None:
        self._stopping = True
        for task in list(self._notifying):  # a reload into a server that is going away: pointless now
            task.cancel()
        if self._notifying:
            await asyncio.wait(list(self._notifying), timeout=5)
        if self._proc is not None and self._proc.returncode is None:
            await self._terminate(self._proc, timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.api_key is not None and _API_KEYS.get(self.base_url) == self.api_key:
            del _API_KEYS[self.base_url]
        self._set("stopped")

    def kill(self) -> None:
        """Simulate a crash: SIGKILL the server and its engine processes (tests, chaos drills)."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    # -- internals -------------------------------------------------------------

    def preflight(self) -> None:
        """Refuse to start with a message that says what to fix (not a traceback later)."""
        cfg = self.cfg
        if not Path(cfg.python).exists():
            raise KeelError(
                f"vLLM python {cfg.python} not found: run `make setup` (it creates the vLLM environment) "
                "or set base_url to use an existing vLLM server",
                code="vllm_not_installed",
            )
        if cfg.model_path is None or not (Path(cfg.model_path) / "config.json").is_file():
            raise KeelError(
                f"model folder {cfg.model_path} is missing: run `keel model prepare`", code="model_not_prepared"
            )
        if port_in_use(cfg.host, cfg.port):
            raise KeelError(
                f"port {cfg.host}:{cfg.port} is already in use; stop what listens there or set "
                f"KEEL_BACKENDS__{self.name.upper()}__MANAGED__PORT",
                code="port_in_use",
            )

    def _set(self, state: State) -> None:
        if state != self.state:
            log.info("vLLM %s: %s -> %s", self.name, self.state, state)
            self.state = state
        if state == "ready":
            self._ready.set()
        else:
            self._ready.clear()

    def _open_log(self):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > _MAX_LOG_BYTES:
                self.log_path.replace(self.log_path.with_suffix(".log.1"))
        f = self.log_path.open("ab", buffering=0)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        f.write(f"\n=== keel: starting vLLM ({stamp}): {' '.join(self.command())}\n".encode())
        return f

    async def _run(self) -> None:
        backoff = self.cfg.restart_backoff_s
        while not self._stopping:
            self._set("starting" if self.restarts == 0 else "restarting")
            with self._open_log() as logf:
                proc = self._proc = await asyncio.create_subprocess_exec(
                    *self.command(), stdout=logf, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
                    env=self.environment(), start_new_session=True, preexec_fn=_die_with_parent,
                )
            self.pid = proc.pid
            if await self._wait_until_ready(proc):
                self._set("ready")
                self.ready_at = time.monotonic()
                backoff = self.cfg.restart_backoff_s
                if self._was_ready:  # a server that was serving lost what was loaded into it
                    self._ready_again()
                self._was_ready = True
                await self._watch(proc)
            _reap_group(proc.pid)
            if self._stopping:
                break
            self.last_exit_code = proc.returncode
            self._set("restarting")
            now = time.monotonic()
            while self._recent_restarts and now - self._recent_restarts[0] > self.cfg.restart_window_s:
                self._recent_restarts.popleft()
            if not self.cfg.restart_on_exit or len(self._recent_restarts) >= self.cfg.max_restarts:
                self.last_error = (
                    f"vLLM exited with code {proc.returncode} and was not restarted ({len(self._recent_restarts)} "
                    f"restarts in the last {self.cfg.restart_window_s:.0f} s); see {self.log_path}"
                )
                log.error(self.last_error)
                self._set("failed")
                return
            self._recent_restarts.append(now)
            self.restarts += 1
            log.warning("vLLM %s exited (code %s); restart %d in %.1f s",
                        self.name, proc.returncode, self.restarts, backoff)
            if self.on_restart:
                self.on_restart()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 60.0)

    def _ready_again(self) -> None:
        for callback in self.on_ready_again:
            task = asyncio.create_task(callback(), name=f"vllm-{self.name}-ready-again")
            self._notifying.add(task)
            task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Task[None]) -> None:
        self._notifying.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("after vLLM %s restarted: %s", self.name, task.exception(), exc_info=task.exception())

    async def _wait_until_ready(self, proc: asyncio.subprocess.Process) -> bool:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        async with httpx.AsyncClient(timeout=2.0, headers=self.auth_headers()) as client:
            while time.monotonic() < deadline:
                if proc.returncode is not None:
                    self.last_error = f"vLLM exited with code {proc.returncode} during start-up; see {self.log_path}"
                    return False
                with contextlib.suppress(httpx.HTTPError):
                    r = await client.get(f"{self.base_url}/v1/models")
                    if r.status_code == 200:
                        return True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.5)
        self.last_error = f"vLLM was not ready after {self.cfg.startup_timeout_s:.0f} s; killed"
        await self._terminate(proc, 5.0)
        return False

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        """Return when the server died, or kill it when it stops answering (hung)."""
        failures = 0
        async with httpx.AsyncClient(timeout=self.liveness_interval_s) as client:
            while True:
                try:
                    await asyncio.wait_for(proc.wait(), self.liveness_interval_s)
                    return
                except TimeoutError:
                    pass
                try:
                    r = await client.get(f"{self.base_url}/health")
                    failures = 0 if r.status_code == 200 else failures + 1
                except httpx.HTTPError:
                    failures += 1
                if failures >= self.liveness_failures:
                    self.last_error = f"vLLM stopped answering /health ({failures} checks); killed"
                    log.error(self.last_error)
                    await self._terminate(proc, 5.0)
                    return

    async def _terminate(self, proc: asyncio.subprocess.Process, timeout: float) -> None:
        # The server runs its engine in child processes: signal the whole process group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
                break
            except TimeoutError:
                log.warning("vLLM %s did not exit after %s; escalating", self.name, sig.name)
        _reap_group(proc.pid)


def _reap_group(pgid: int) -> None:
    """Kill engine processes left behind by a server that exited (they hold memory and the port)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
