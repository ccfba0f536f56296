"""`keel serve` stopped with SIGINT (Ctrl-C) or SIGTERM during and after an ingest (issue 22, item 2): the
process shuts down cleanly (no traceback, no failed flush, no failed shutdown step) and, on restart, every
chunk is there: each document is complete or absent, the interrupted job (durable: issue 13) runs again by
itself and finishes with exactly the chunks of one clean run, and a finished ingest survives the stop
unchanged.

No vLLM here: the only backend is an OpenAI-compatible URL where nothing listens (nothing calls it), so the
server is healthy but not ready, and each signal's test takes about a minute (three server starts, ~1,100
chunks embedded). The embedding model and the embedded engine (qdrant-edge) are the real ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.security.keys import KeyStore
from tests.integration.conftest import ROOT, free_port

pytestmark = pytest.mark.integration

COLLECTION = "kb"
N_DOCS = 190  # x 6 chunks: more than two of the pipeline's 512-chunk batches, so a stop lands mid-run
TOPICS = ["rivers", "glaciers", "volcanoes", "deserts", "forests", "reefs", "tundra"]
OWLS = "Barn owls hunt at night by sound alone: the disc of feathers around their face funnels the faint rustle " \
       "of a mouse in the grass to their ears, so they strike prey they never see."
# What uvicorn does once its graceful shutdown is complete: it restores the previous handler and raises the
# captured signal again, so the process ends the way that signal means. SIGINT becomes KeyboardInterrupt,
# which typer turns into exit code 130 (the shell's 128 + 2 for Ctrl-C); SIGTERM's default action ends the
# process with it (Popen: -15). The log lines checked in stop() show the shutdown itself completed.
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: -signal.SIGTERM}
BAD_LOG = ("Traceback", "Application shutdown failed", "Failed to flush", "flushing to its segment files failed",
           "shutdown finished with", "did not stop within", " ERROR ", " CRITICAL ")


def write_docs(root: Path) -> None:
    root.mkdir(parents=True)
    for i in range(N_DOCS):
        t = TOPICS[i % len(TOPICS)]
        sections = [f"## Part {j}\n\nNote {i}.{j}: the {t} of site {i} changed in season {j} of the survey. "
                    f"Observers at site {i} logged the {t} again after week {j + 3} of the survey.\n"
                    for j in range(6)]
        (root / f"doc{i:03d}.md").write_text(f"# Site {i}\n\n" + "\n".join(sections))
    (root / "owls.md").write_text(f"# Owls\n\n{OWLS}\n")


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shutdown") / "docs"
    write_docs(root)
    return root


@pytest.fixture(scope="module")
def expected(docs: Path) -> dict[str, int]:
    """Chunks per document of one clean run, computed with the server's own chunker and tokenizer (default
    settings) without embedding anything."""
    from ingest.chunking import Chunker, HFTokenizer
    from ingest.documents import LoadReport, discover, iter_load
    from ingest.embedding import default_model_path
    from ingest.settings import ChunkerConfig

    report = LoadReport()
    files, _ = discover([docs], report)
    chunker = Chunker(ChunkerConfig(), HFTokenizer(default_model_path()))
    counts = {d.doc_id: len(chunker.chunk(d)) for _, loaded in iter_load(files, report) for d in loaded}
    assert len(counts) == N_DOCS + 1 and not report.rejections
    # The premise of the "during" phase: the first batch is written while a good part of the run is still ahead.
    assert sum(counts.values()) > 2 * 512 + 64, counts
    return counts


class Keel:
    """One Keel home, served by `python -m app.cli serve` processes started and stopped in turn."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir()
        config = {
            "home": str(home),
            "auth": {"default_rate_limit_per_minute": 100_000},
            # The only backend: nothing listens there and nothing calls it (no /readyz wait below).
            "backends": {"local": {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                                   "retries": 0, "managed": None}},
            # Off (the embedder's cached graph is the machine's, as for every test server)
            "guardrails": {"enabled": False},
        }
        self.config = home / "keel.yaml"
        self.config.write_text(yaml.safe_dump(config))
        store = KeyStore(home / "keel.db")
        self.keys = {"admin": store.create("admin", ["admin"])[1]}
        store.close()
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None
        self.url = ""
        self.starts = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys['admin']}"}

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.exists() else "(no log)"

    def start(self, timeout: float = 240) -> None:
        self.starts += 1
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.home / f"serve-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
        env.update(KEEL_CONFIG=str(self.config), KEEL_SERVER__PORT=str(port), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"keel serve exited ({self.proc.returncode}) while starting; log:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"keel serve not healthy after {timeout:.0f} s; log:\n{self.log_tail()}")

    def stop(self, sig: signal.Signals, timeout: float = 90) -> str:
        """Send ``sig`` and check a clean exit: the expected code and nothing bad in the log."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"keel serve still running {timeout:.0f} s after {sig.name}; log:\n{self.log_tail()}")
        finally:
            self.proc = None
        log = self.log.read_text(errors="replace")
        assert rc == EXIT_CODES[sig], f"exit code {rc} after {sig.name}; log:\n{self.log_tail()}"
        bad = [line for line in log.splitlines() if any(b in line for b in BAD_LOG)]
        assert not bad, f"after {sig.name}: {bad[:5]}; log:\n{self.log_tail(8000)}"
        assert "Application shutdown complete." in log and "Finished server process" in log, self.log_tail()
        return log

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}{path}", params=params, headers=self.headers, timeout=120)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    def post(self, path: str, body: dict) -> Any:
        r = httpx.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=120)
        assert r.status_code in (200, 202), (path, r.status_code, r.text)
        return r.json()

    def ingest(self, docs: Path) -> dict:
        return self.post("/v1/ingest/paths", {"paths": [str(docs)], "collection": COLLECTION})

    def wait_job(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/ingest/jobs/{job_id}", wait_s=30)
            if job["state"] not in ("queued", "running"):
                return job
        pytest.fail(f"ingest job {job_id} not done after {timeout:.0f} s: {job}; log:\n{self.log_tail()}")

    def collection(self) -> dict:
        found = [c for c in self.get("/v1/collections") if c["name"] == COLLECTION]
        assert found, f"collection {COLLECTION!r} missing after restart; log:\n{self.log_tail()}"
        return found[0]


def store_documents(home: Path) -> tuple[dict[str, dict[str, int]], int]:
    """What the embedded store holds, read directly while no server runs: doc_id -> {version: chunks}, and
    the number of hidden (half-committed) versions."""
    from ingest.factory import build_store
    from ingest.settings import RagSettings

    store = build_store(RagSettings(), home)
    try:
        docs = {k: dict(v.versions) for k, v in store.documents(COLLECTION).items()}
        return docs, store.collection_info(COLLECTION)["hidden_versions"]
    finally:
        store.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_during_and_after_ingest_keeps_every_chunk(sig: signal.Signals, docs: Path, expected: dict[str, int],
                                                        tmp_path: Path) -> None:
    keel = Keel(tmp_path / "home")
    total = sum(expected.values())
    try:
        # 1. During: the signal arrives once a first batch is written and the job is still running.
        keel.start()
        job = keel.ingest(docs)
        deadline = time.monotonic() + 300
        while True:
            state = keel.get(f"/v1/ingest/jobs/{job['id']}")
            if state["state"] == "running" and state["chunks_written"] > 0:
                break
            assert state["state"] in ("queued", "running"), (
                f"the ingest ended before it could be interrupted (make the folder bigger): {state}")
            assert time.monotonic() < deadline, f"no chunk written after 300 s: {state}; log:\n{keel.log_tail()}"
            time.sleep(0.1)
        keel.stop(sig)

        partial, hidden = store_documents(keel.home)
        assert 0 < len(partial) < len(expected), (len(partial), state)
        assert hidden == 0
        incomplete = {d: v for d, v in partial.items() if v != {next(iter(v)): expected[d]}}
        assert not incomplete, f"documents not complete after {sig.name} mid-ingest: {incomplete}"

        # The job is durable: the next start runs it again, and that run finishes it: exactly one clean run's
        # chunks, none lost or doubled (what the first run wrote is unchanged and skipped).
        keel.start()
        done = keel.wait_job(job["id"])
        assert done["state"] == "succeeded" and done["attempts"] == 1, done  # a shutdown costs no attempt
        snapshots = keel.get("/v1/snapshots", collection=COLLECTION)
        assert [s["id"] for s in snapshots[:1]] == [done["snapshot_id"]], snapshots
        interrupted = snapshots[1]
        assert interrupted["status"] == "failed" and "shut down" in (interrupted["error"] or ""), interrupted
        counts = done["counts"]
        assert counts["unchanged"] == len(partial) and counts["added"] == len(expected) - len(partial), counts
        assert counts["documents_total"] == len(expected) and counts["chunks_total"] == total, counts
        manifest = keel.get(f"/v1/snapshots/{done['snapshot_id']}")
        assert {f["doc_id"]: f["chunks"] for f in manifest["files"]} == expected
        finished = keel.collection()
        assert finished["chunks"] == total and finished["hidden_versions"] == 0, finished

        # 2. After: a finished ingest survives the stop unchanged and stays searchable.
        keel.stop(sig)
        keel.start()
        assert keel.collection() == finished
        hits = keel.post("/v1/retrieve", {"query": "How do barn owls find prey they cannot see?",
                                          "collection": COLLECTION, "top_k": 1})
        assert hits["chunks"][0]["citation"]["source"].endswith("owls.md"), hits
        again = keel.wait_job(keel.ingest(docs)["id"])
        assert again["state"] == "succeeded" and again["counts"]["unchanged"] == len(expected), again
        assert again["counts"]["chunks_written"] == 0 and keel.collection() == finished
        keel.stop(sig)
    finally:
        keel.kill()
