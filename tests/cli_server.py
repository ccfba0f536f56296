"""A real Keel API for the CLI tests: uvicorn on a localhost port, its own event loop in a thread (like
`keel serve`), the container built on scripted backends; the CLI talks HTTP to it exactly as it does in
production. Also the environment a `keel ...` command runs in against it."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from app.api.main import create_app
from app.container import Container
from app.settings import load_settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder


class ApiServer:
    """One API process on 127.0.0.1:<free port>. ``settings`` are ``load_settings`` overrides (``home`` is
    given), ``backends`` the scripted backends by name, ``keys`` the API keys to create (name -> scopes; the
    secrets end up in ``self.keys``). ``self.container`` is the running container."""

    def __init__(self, home: Path, *, settings: dict[str, Any], backends: dict[str, Any],
                 keys: dict[str, list[str]], embedder: HashingEmbedder | None = None) -> None:
        self.home = home
        self.settings = settings
        self.backends = backends
        self.key_scopes = keys
        self.embedder = embedder or HashingEmbedder()
        self.keys: dict[str, str] = {}
        self.container: Container | None = None
        self.built = threading.Event()
        self.error: BaseException | None = None
        self.server: uvicorn.Server | None = None
        # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only then (proto 0 leaves Nagle on: ~40 ms a response)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self._run, name="keel-test-api", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # surfaced by start()
            self.error = e
            self.built.set()

    async def _main(self) -> None:
        settings = load_settings(home=self.home, **self.settings)
        container = await Container.build(settings, backends=self.backends,
                                          rag=build_rag(settings, embedder=self.embedder))
        self.keys = {name: container.keys.create(name, scopes)[1] for name, scopes in self.key_scopes.items()}
        self.container = container
        self.server = uvicorn.Server(uvicorn.Config(create_app(container=container), log_level="warning",
                                                    access_log=False))
        self.built.set()
        try:
            await self.server.serve(sockets=[self.sock])
        finally:
            await container.aclose()

    def start(self) -> ApiServer:
        self.thread.start()
        assert self.built.wait(60)
        if self.error is not None:
            raise self.error
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the API did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def h(self, key: str) -> dict[str, str]:
        """The Authorization header of one of the keys."""
        return {"Authorization": f"Bearer {self.keys[key]}"}


def cli_env(monkeypatch: Any, tmp_path: Path, key: str) -> None:
    """A `keel` command's environment against a test server: its key in KEEL_API_KEY, a home of its own (not
    the server's: --url and the key say where the API is) and no keel.yaml from KEEL_CONFIG."""
    monkeypatch.setenv("KEEL_API_KEY", key)
    monkeypatch.setenv("KEEL_HOME", str(tmp_path / "cli-home"))
    monkeypatch.delenv("KEEL_CONFIG", raising=False)
