"""What the start-up heap costs a serving Keel, and what freezing it (``server.gc_freeze``) wins.

    .venv/bin/python bench/heap.py [--rounds 6] [--requests 600] [--concurrency 8] [--guards]

A started Keel holds ~600k objects (libraries, models, the service graph) that CPython's cyclic collector scans on
every full collection. Here the real container and API run in process (a scripted backend streaming 8 tokens, so
Keel's own work is what is timed) and the same streaming chat requests are sent in rounds that alternate between
the heap as start-up left it and the heap frozen (:func:`app.core.heap.freeze`; ``gc.unfreeze`` between rounds).
For each: request latency p50/p95/p99/max, CPU per request, every collection's pause by generation (timed
through ``gc.callbacks``; a full one comes when enough objects have survived, rarely: maybe none in a run), and
the pause a full collection makes (one forced after each round). Prints a table and writes
bench/results/heap.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ itself must not be on the path: bench/guardrails.py would shadow the guardrails-ai package
sys.path[:] = [str(ROOT), *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import httpx  # noqa: E402

from app.api.main import create_app  # noqa: E402
from app.container import Container  # noqa: E402
from app.core import heap  # noqa: E402
from app.core.types import Finished, TextDelta, Usage  # noqa: E402
from app.settings import load_settings  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How do bees make honey?", "Why is the sky blue?",
             "Give three tips for learning a new language.", "Describe the water cycle step by step."]


class Tokens:
    """Eight tokens, at once: the backend costs nothing, so what is timed is Keel."""

    name = "tokens"

    async def stream(self, request):
        for i in range(8):
            yield TextDelta("Paris" if i == 0 else " word")
        yield Finished("stop")
        yield Usage(prompt_tokens=10, completion_tokens=8)

    async def models(self):
        return ["tokens"]

    async def ready(self):
        return True

    async def start(self):
        return None

    async def aclose(self):
        return None


class Pauses:
    """Every collection's duration, by generation, through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.by_gen: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.by_gen[info["generation"]].append(time.perf_counter() - self._start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_round(client, headers, requests: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    queue = list(range(requests))

    async def worker() -> None:
        while queue:
            i = queue.pop()
            body = {"model": "m", "stream": True, "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"}]}
            t = time.perf_counter()
            async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status_code == 200, await r.aread()
                async for _ in r.aiter_bytes():
                    pass
            latencies.append(time.perf_counter() - t)

    cpu = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, (time.process_time() - cpu) / requests


async def main(args: argparse.Namespace) -> dict:
    home = Path(tempfile.mkdtemp(prefix="keel-heap-"))
    settings = load_settings(
        home=home, backends={"local": {"kind": "openai", "base_url": "http://unused/v1"}},
        models={"m": {"backend": "local", "model": "tokens"}}, default_model="m",
        guardrails={"enabled": args.guards}, auth={"default_rate_limit_per_minute": 1_000_000})
    container = await Container.build(settings, backends={"local": Tokens()})
    app = create_app(container=container)
    _, key = container.keys.create("bench", ["chat"])
    headers = {"Authorization": f"Bearer {key}"}
    pauses = {"as started": Pauses(), "frozen": Pauses()}
    results: dict[str, dict] = {m: {"latencies": [], "cpu": [], "full_collection": []} for m in pauses}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://keel",
                                 timeout=60) as client:
        await one_round(client, headers, 50, args.concurrency)  # warm: caches, first-call imports
        gc.collect()
        tracked = len(gc.get_objects())
        frozen = 0
        for r in range(args.rounds):
            for mode in (("as started", "frozen") if r % 2 == 0 else ("frozen", "as started")):
                if mode == "frozen":
                    frozen = heap.freeze()
                gc.callbacks.append(pauses[mode])
                try:
                    lat, cpu = await one_round(client, headers, args.requests, args.concurrency)
                finally:
                    gc.callbacks.remove(pauses[mode])
                # the pause a full collection makes now (the collector triggers one when enough has survived)
                t = time.perf_counter()
                gc.collect()
                results[mode]["full_collection"].append(time.perf_counter() - t)
                if mode == "frozen":
                    gc.unfreeze()
                    # untimed: the collector counts the long-lived objects again (it counts none frozen), so the
                    # next round's full collections come when they would on a server that never froze
                    gc.collect()
                results[mode]["latencies"] += lat
                results[mode]["cpu"].append(cpu)
                print(f"round {r + 1} {mode:>10}: p50 {statistics.median(lat) * 1e3:6.2f} ms, max "
                      f"{max(lat) * 1e3:7.1f} ms", flush=True)
    await container.aclose()
    out = {"benchmark": "heap", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "settings": vars(args), "tracked_objects_after_start": tracked, "frozen_objects": frozen, "modes": {}}
    for mode, r in results.items():
        lat = r["latencies"]
        out["modes"][mode] = {
            "requests": len(lat), "p50_ms": statistics.median(lat) * 1e3, "p95_ms": pct(lat, 0.95) * 1e3,
            "p99_ms": pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3,
            "cpu_ms_per_request": statistics.median(r["cpu"]) * 1e3,
            "full_collection_ms": statistics.median(r["full_collection"]) * 1e3,
            "collections": {f"gen{g}": {"count": len(p), "max_ms": max(p, default=0) * 1e3,
                                        "total_ms": sum(p) * 1e3} for g, p in pauses[mode].by_gen.items()}}
    return out


def report(out: dict) -> None:
    print(f"\nheap after start-up: {out['tracked_objects_after_start']:,} tracked objects "
          f"({out['frozen_objects']:,} frozen); {out['settings']['rounds']} rounds x "
          f"{out['settings']['requests']} streaming requests per mode, concurrency {out['settings']['concurrency']}")
    print(f"{'mode':>11} | {'p50 ms':>7} | {'p95 ms':>7} | {'p99 ms':>7} | {'max ms':>7} | {'CPU ms/req':>10} | "
          f"{'gen2 GCs':>8} | {'gen2 max ms':>11} | {'all GC ms':>9} | {'a full GC ms':>12}")
    for mode, m in out["modes"].items():
        c = m["collections"]
        total = sum(g["total_ms"] for g in c.values())
        print(f"{mode:>11} | {m['p50_ms']:7.2f} | {m['p95_ms']:7.2f} | {m['p99_ms']:7.2f} | {m['max_ms']:7.1f} | "
              f"{m['cpu_ms_per_request']:10.2f} | {c['gen2']['count']:8d} | {c['gen2']['max_ms']:11.1f} | "
              f"{total:9.0f} | {m['full_collection_ms']:12.1f}")
    a, f = out["modes"]["as started"], out["modes"]["frozen"]
    print(f"frozen / as started: CPU per request {f['cpu_ms_per_request'] / a['cpu_ms_per_request']:.2f}x, "
          f"p99 {f['p99_ms'] / a['p99_ms']:.2f}x, max {f['max_ms'] / a['max_ms']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--guards", action="store_true", help="the default guardrail policy on (its models loaded)")
    args = parser.parse_args()
    result = asyncio.run(main(args))
    report(result)
    path = ROOT / "bench" / "results" / "heap.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path.relative_to(ROOT)}")
