"""kill -9 in the middle of an ingest, then re-run: exactly the chunks of one clean run, none lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.settings import Settings
from ingest import build_rag
from ingest.embedding import HashingEmbedder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = textwrap.dedent("""
    import os, sys, time
    from app.settings import Settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder

    class Slow(HashingEmbedder):
        def embed_documents(self, texts):
            time.sleep(float(os.environ.get("EMBED_DELAY", "0.05")))
            return super().embed_documents(texts)

    home, kind, docs = sys.argv[1], sys.argv[2], sys.argv[3]
    s = build_rag(Settings(home=home, rag={"store": kind, "chunker": {"max_tokens": 40, "overlap_tokens": 8}}),
                  embedder=Slow(64))
    s.pipeline.batch_chunks = 6
    if os.environ.get("STALL_AFTER_UPSERT"):
        inner = s.store._upsert
        def upsert(c, points):
            inner(c, points)
            print("UPSERTED", flush=True)
            time.sleep(60)  # killed here: new version written, not yet flipped
        s.store._upsert = upsert
    s.pipeline.run([docs], "kb", prune=True, progress=lambda p: print("PROGRESS", p.chunks_written, flush=True))
    s.close()
    print("DONE", flush=True)
""")


def write_docs(root: Path, n: int, variant: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = " ".join(f"Document {i} sentence {j} is about topic {i % 7}{variant}." for j in range(25))
        (root / f"doc{i:02d}.md").write_text(f"# Doc {i}\n\n## Part A\n\n{body}\n\n## Part B\n\n{body[::-1]}\n")


def run_script(tmp: Path, home: Path, kind: str, docs: Path, kill_on: str | None, after: int = 1,
               env_extra: dict | None = None) -> str:
    script = tmp / "ingest_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, str(script), str(home), kind, str(docs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    seen = 0
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    for line in proc.stdout:
        if kill_on and line.startswith(kill_on):
            seen += 1
            if seen >= after:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                return "killed"
        if line.startswith("DONE") or time.monotonic() > deadline:
            break
    proc.wait(60)
    if proc.returncode != 0:
        raise AssertionError(f"ingest script failed ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    return "done"


def state(home: Path, kind: str) -> tuple[dict, int, int]:
    s = build_rag(Settings(home=home, rag={"store": kind, "chunker": {"max_tokens": 40, "overlap_tokens": 8}}),
                  embedder=HashingEmbedder(64))
    try:
        docs = {k: dict(v.versions) for k, v in s.store.documents("kb").items()}
        return docs, s.store.count("kb"), s.store.collection_info("kb")["hidden_versions"]
    finally:
        s.close()


def reference(tmp: Path, kind: str, docs: Path) -> tuple[dict, int, int]:
    home = tmp / f"ref-{time.monotonic_ns()}"
    s = build_rag(Settings(home=home, rag={"store": kind, "chunker": {"max_tokens": 40, "overlap_tokens": 8}}),
                  embedder=HashingEmbedder(64))
    s.pipeline.run([docs], "kb", prune=True)
    s.close()
    return state(home, kind)


@pytest.mark.parametrize("kind", ["edge", "qdrant"])
def test_kill_mid_ingest_then_rerun(tmp_path: Path, kind: str):
    docs = tmp_path / "docs"
    home = tmp_path / "home"
    write_docs(docs, 24)

    # 1. Killed twice during the first ingest (between batches and mid-replace), then completed.
    assert run_script(tmp_path, home, kind, docs, "PROGRESS", after=3) == "killed"
    partial, _n_partial, _ = state(home, kind)
    assert 0 < len(partial) < 24
    assert run_script(tmp_path, home, kind, docs, "UPSERTED", env_extra={"STALL_AFTER_UPSERT": "1"}) == "killed"
    _, _, hidden = state(home, kind)
    assert hidden >= 1  # the crash left a hidden, half-committed version behind
    assert run_script(tmp_path, home, kind, docs, None) == "done"
    assert state(home, kind) == reference(tmp_path, kind, docs)

    # 2. Files change and one disappears; killed mid-replace of a changed file, then re-run.
    write_docs(docs, 24, variant=" revised")
    (docs / "doc23.md").unlink()
    assert run_script(tmp_path, home, kind, docs, "UPSERTED", env_extra={"STALL_AFTER_UPSERT": "1"}) == "killed"
    assert run_script(tmp_path, home, kind, docs, "PROGRESS", after=2) == "killed"
    assert run_script(tmp_path, home, kind, docs, None) == "done"
    got = state(home, kind)
    want = reference(tmp_path, kind, docs)
    assert got == want
    assert len(got[0]) == 23 and got[2] == 0 and all(len(v) == 1 for v in got[0].values())

    # 3. Snapshots record the interrupted runs as failed and the last one as complete.
    s = build_rag(Settings(home=home), embedder=HashingEmbedder(64), store=None)
    try:
        statuses = [x.status for x in s.snapshots.list("kb")]
    finally:
        s.close()
    assert statuses[0] == "completed" and statuses.count("failed") == 4
