"""The start-up heap out of the collector's scans, and the collector's pauses timed (app/core/heap.py)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app.core import heap

ROOT = Path(__file__).resolve().parents[2]


def test_watch_times_every_collection_until_stopped() -> None:
    seen: list[tuple[int, float]] = []
    stop = heap.watch(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect()
    finally:
        stop()
    assert seen and seen[-1][0] == 2 and 0 < seen[-1][1] < 60  # a full collection, timed
    count = len(seen)
    gc.collect()
    assert len(seen) == count


# In a process of its own: freezing is process-wide, and this suite's process must keep collecting its garbage.
SERVER = textwrap.dedent("""
    import gc, json, sys
    from fastapi.testclient import TestClient
    from app.api.main import create_app
    from app.settings import load_settings

    settings = load_settings(home=sys.argv[1], guardrails={"enabled": False}, auth={"enabled": False},
                             backends={"local": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1"}},
                             models={"m": {"backend": "local", "model": "m"}}, default_model="m",
                             server={"gc_freeze": sys.argv[2] == "on"})
    with TestClient(create_app(settings, owns_process=True)) as client:
        frozen = gc.get_freeze_count()
        gc.collect()
        metrics = client.get("/metrics").text
    print(json.dumps({"frozen": frozen, "callbacks": len(gc.callbacks),
                      "timed": 'keel_gc_pause_seconds_count{generation="2"}' in metrics}))
""")


@pytest.mark.parametrize("freeze", ["on", "off"])
def test_the_server_freezes_its_start_up_heap_and_times_the_collector(freeze: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SERVER, str(tmp_path), freeze], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                       "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["timed"] and out["callbacks"] == 0  # timed while serving, unhooked at shutdown
    if freeze == "on":
        assert out["frozen"] > 100_000  # the libraries, the embedding model, the service graph
    else:
        assert out["frozen"] == 0
