"""What seeing production costs: tracing and lineage on the chat path, and a drift check over logged traffic.

    .venv/bin/python bench/observe.py [--requests 2000] [--concurrency 8] [--rounds 20] [--quick]

Keel APIs (uvicorn on 127.0.0.1, auth on, guardrails off) run in child processes on scripted backends (no model:
tests/fakes/llm.py), identical but for what they record:

* ON: the defaults: ``otel.enabled`` (spans of every request, the HTTP server span included), ``otel.store``
  (kept in <home>/traces.db), ``monitor.lineage`` (a lineage record and drift features per answer, in
  <home>/lineage.db) with ``monitor.embed_sample`` 1.0 (every question embedded by the lineage writer thread);
* OFF: ``otel.enabled=false``, ``monitor.lineage=false``.

This process is the client (httpx, keep-alive, one client per API, a distinct ~60-character question per request
so no embedder cache answers). Bursts of streaming chat requests at ``--concurrency`` alternate between ON and OFF
round by round (swapping who goes first), so drift on a shared machine hits both alike. In one run:

(a) zero-latency backend (every token at once): Keel's own CPU is the bottleneck, so TTFT there includes
    queueing behind the other requests' CPU and req/s is a CPU-capacity number. Reported: TTFT p50/p95, total
    latency p50, req/s, API CPU per request (psutil, every thread of the API process: the span and lineage
    writers too), the added TTFT p50 (pooled, and the median of the per-round paired differences with its
    spread), the throughput ratio ON/OFF and the capacity ratio the CPU per request implies. ``--split`` adds an
    API with traces only and one with lineage only to this comparison.
(b) paced backend (``--token-delay`` s per token, 16 tokens: a model's pace): the API is not CPU-bound, which is
    the honest case for the throughput target; same columns. The APIs of (a) and (b) embed questions with a
    hashing embedder, as bench/releases.py does.
(b') the same, on a second ON/OFF pair built with the container's own RAG services: the shared MiniLM, which
    the lineage writer embeds every question with, as deployed (unless ``--no-minilm``).
(c) where the CPU goes, in this process (the chat front door as the API calls it: lineage recorder, release
    gateway, chat service; no HTTP), one request at a time: CPU per request with traces and lineage each on and
    off, spans made but not stored, lineage without question embeddings, and lineage on MiniLM (unless
    ``--no-minilm``), the span and lineage writers flushed inside the timed window so their work counts.
(e) the HTTP client span of each request to a model server (the httpx instrumentation): CPU per request of the
    backend client with and without it (scripted transport), interleaved rounds;
(d) drift checks: ``lifecycle.monitor.drift.build_monitor`` on a ``LineageStore`` filled with synthetic
    ``Features`` rows (as tests/unit/test_drift.py: 384-d embeddings around 6 topics, every row embedded), a
    current window of N logged requests against the N before it (the scheduled check's default), for N = 10k
    and 100k: seconds per check (Evidently's import reported separately, and the first check's own lazy imports
    on a 1k window), the lineage read alone, the report's size and the process's peak RSS.

Targets (issue 17): <= 1 ms added TTFT p50 and >= 98% throughput at concurrency 8. Prints a table and writes
bench/results/observe.json. Helpers (percentiles, psutil CPU, summaries, paired differences) are
bench/releases.py's. ``--profile DIR`` writes each API process's cProfile (event-loop thread).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import resource
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load_releases():
    # by its path: bench/ on sys.path would shadow the ingest package with bench/ingest.py
    spec = importlib.util.spec_from_file_location("bench_releases", ROOT / "bench" / "releases.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_rel = _load_releases()
REPLY, pct, cpu_s, summary, paired_diff, metric = (
    _rel.REPLY, _rel.pct, _rel.cpu_s, _rel.summary, _rel.paired_diff, _rel.metric)
_asked = iter(range(10**9))


def question() -> str:
    """A distinct question each time (~60 characters, a typical one): no embedder cache ever answers it."""
    return f"How do I rotate the API keys of tenant {next(_asked)} without any downtime?"


async def one(client, url: str, headers: dict, model: str) -> tuple[float, float | None]:
    """A streaming request: (latency to the last byte, time to the first content token) in ms (bench/releases.py's,
    with a distinct question)."""
    body = {"model": model, "messages": [{"role": "user", "content": question()}], "stream": True}
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"content"' in line:
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = (time.perf_counter() - t0) * 1000
    return (time.perf_counter() - t0) * 1000, ttft


async def burst(client, url: str, headers: dict, model: str, n: int, concurrency: int,
                stream: bool = True) -> tuple[float, list[float], list[float]]:
    """``n`` streaming requests, ``concurrency`` at a time; (wall s, latencies ms, TTFTs ms)."""
    todo = iter(range(n))
    lats: list[float] = []
    ttfts: list[float] = []

    async def worker() -> None:
        for _ in todo:
            lat, ttft = await one(client, url, headers, model)
            lats.append(lat)
            if ttft is not None:
                ttfts.append(ttft)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, lats, ttfts

CONFIGS = {
    "on": {},  # the defaults: otel.enabled, otel.store, monitor.lineage, monitor.embed_sample 1.0
    "off": {"otel": {"enabled": False}, "monitor": {"lineage": False}},
}
SPLIT = {  # --split: each on its own, in (a) only
    "traces_only": {"monitor": {"lineage": False}},
    "lineage_only": {"otel": {"enabled": False}},
}


def _settings(home: Path, overrides: dict, token_delay: float):
    from app.settings import load_settings

    return load_settings(
        home=home,
        backends={"local": {"kind": "openai", "base_url": "http://unused-fast/v1", "retries": 0},
                  "paced": {"kind": "openai", "base_url": "http://unused-paced/v1", "retries": 0}},
        models={"fast": {"backend": "local", "model": "fast"}, "paced": {"backend": "paced", "model": "paced"}},
        default_model="fast", auth={"default_rate_limit_per_minute": 10_000_000}, guardrails={"enabled": False},
        log_level="WARNING", **overrides)


def _backends(token_delay: float) -> dict:
    from tests.fakes.llm import ScriptedBackend

    return {"local": ScriptedBackend(name="fast", reply=REPLY, served=["fast"]),
            "paced": ScriptedBackend(name="paced", reply=REPLY, served=["paced"], delay_s=token_delay)}


# -- the servers (child processes) ---------------------------------------------------------------------------


def _serve(home: str, overrides: dict, token_delay: float, port_out, info_out, profile: str | None,
           minilm: bool) -> None:
    """One API on a free localhost port; its port, key and effective settings go back through the pipes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import uvicorn

    from app.api.main import create_app
    from app.container import Container
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        settings = _settings(Path(home), overrides, token_delay)
        # minilm: the container's own RAG services, i.e. the shared MiniLM (loaded and warmed up) that the lineage
        # writer embeds questions with, as deployed; otherwise a hashing embedder, as bench/releases.py
        container = await Container.build(settings, backends=_backends(token_delay), rag=None if minilm else
                                          build_rag(settings, embedder=HashingEmbedder(64)))
        key = container.keys.create("bench-admin", ["admin"])[1]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (socket.socket()'s
        # proto 0 leaves Nagle on, and every response then waits ~40 ms for the client's delayed ACK)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(container=container), log_level="warning",
                                               access_log=False))
        port_out.send(sock.getsockname()[1])
        info_out.send({"key": key, "settings": {
            "otel.enabled": settings.otel.enabled, "otel.store": settings.otel.store,
            "otel.sample_ratio": settings.otel.sample_ratio, "monitor.lineage": settings.monitor.lineage,
            "monitor.embed_sample": settings.monitor.embed_sample,
            "lineage_recorder": container.front is not None, "http_spans": container.tracing.provider is not None,
            "embedder": container.rag.embedder.model_id}})
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        try:
            await server.serve(sockets=[sock])
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(profile)
            await container.aclose()

    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it once done: let the container close
    asyncio.run(main())


class Server:
    def __init__(self, name: str, home: Path, overrides: dict, token_delay: float, profile: str | None = None,
                 minilm: bool = False) -> None:
        ctx = mp.get_context("spawn")
        port_r, port_w = ctx.Pipe(duplex=False)
        info_r, info_w = ctx.Pipe(duplex=False)
        self.name, self.home = name, home
        self.proc = ctx.Process(target=_serve, name=f"keel-bench-api-{name}", daemon=True,
                                args=(str(home), overrides, token_delay, port_w, info_w, profile, minilm))
        self.proc.start()
        deadline = time.monotonic() + 120
        while not port_r.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {name} API did not start (exit code {self.proc.exitcode})")
        self.url = f"http://127.0.0.1:{port_r.recv()}"
        info = info_r.recv()
        self.headers = {"Authorization": f"Bearer {info['key']}"}
        self.settings = info["settings"]

    async def wait_ready(self, client) -> None:
        for _ in range(300):
            try:
                if (await client.get(self.url + "/healthz")).status_code < 500:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {self.name} API never answered")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)


def _count(path: Path, table: str, where: str = "1 = 1") -> int | None:
    if not path.is_file():
        return None
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


async def interleaved(clients: dict, servers: dict[str, Server], model: str, n: int, rounds: int,
                      concurrency: int) -> dict[str, dict]:
    """``n`` streaming requests per API in ``rounds`` rounds, alternating which API goes first; each API
    process's CPU time is summed over its own bursts."""
    per = max(concurrency, n // rounds)
    names = list(servers)
    out = {s: {"wall": 0.0, "cpu": 0.0, "client_cpu": 0.0, "lats": [], "ttfts": [], "round_p50": [],
               "round_cpu": [], "round_rps": []} for s in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            s = servers[name]
            await asyncio.sleep(0.25)  # the last burst's span/lineage writers (0.2 s flushes) finish outside
            c0, k0 = cpu_s(s.proc.pid), time.process_time()
            wall, lats, ttfts = await burst(clients[name], s.url + "/v1/chat/completions", s.headers, model, per,
                                            concurrency, True)
            await asyncio.sleep(0.25)  # ... and this burst's inside its window
            o = out[name]
            cpu = cpu_s(s.proc.pid) - c0
            o["cpu"] += cpu
            o["round_cpu"].append(cpu * 1000 / per)
            o["client_cpu"] += time.process_time() - k0
            o["wall"] += wall
            o["lats"] += lats
            o["ttfts"] += ttfts
            o["round_p50"].append(statistics.median(ttfts))
            o["round_rps"].append(per / wall)
    return out


def compare(raw: dict[str, dict]) -> dict:
    """ON vs OFF: the summaries and what ON adds."""
    on, off = summary(raw["on"]), summary(raw["off"])
    out: dict = {"on": on, "off": off}
    out["added_ttft_ms_p50"] = round(on["ttft_ms_p50"] - off["ttft_ms_p50"], 3)
    out["added_ttft_ms_p95"] = round(on["ttft_ms_p95"] - off["ttft_ms_p95"], 3)
    d, s = paired_diff(raw["off"]["round_p50"], raw["on"]["round_p50"])
    out["added_ttft_ms_p50_per_round"] = {"median": round(d, 3), "spread": round(s, 3)}
    out["added_latency_ms_p50"] = round(on["latency_ms_p50"] - off["latency_ms_p50"], 3)
    out["throughput_ratio"] = round(on["throughput_rps"] / off["throughput_rps"], 4)
    ratios = sorted(b / a for a, b in zip(raw["off"]["round_rps"], raw["on"]["round_rps"], strict=True))
    out["throughput_ratio_per_round"] = {"median": round(statistics.median(ratios), 4),
                                         "spread": round((pct(ratios, 0.9) - pct(ratios, 0.1)) / 2, 4)}
    out["added_cpu_ms_per_request"] = round(on["server_cpu_ms_per_request"] - off["server_cpu_ms_per_request"], 3)
    d, s = paired_diff(raw["off"]["round_cpu"], raw["on"]["round_cpu"])
    out["added_cpu_ms_per_round"] = {"median": round(d, 3), "spread": round(s, 3)}
    # where the API is CPU-bound, what it serves per second goes as 1 / CPU per request
    out["capacity_ratio_cpu"] = round(off["server_cpu_ms_per_request"] / on["server_cpu_ms_per_request"], 4)
    return out


async def measure(servers: dict[str, Server], args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    clients = {name: httpx.AsyncClient(limits=limits, timeout=120) for name in servers}
    try:
        for name, s in servers.items():
            await s.wait_ready(clients[name])
        # warm-up: both paths of both APIs at full concurrency (imports, pools, first allocations, the stores)
        for model in ("fast", "paced"):
            for name, s in servers.items():
                if name.endswith("_minilm"):
                    continue
                await burst(clients[name], s.url + "/v1/chat/completions", s.headers, model, args.concurrency * 4,
                            args.concurrency, True)
        fast = await interleaved(clients, {k: s for k, s in servers.items() if not k.endswith("_minilm")}, "fast",
                                 args.requests, args.rounds, args.concurrency)
        paced = await interleaved(clients, {k: servers[k] for k in CONFIGS}, "paced", args.paced_requests,
                                  args.paced_rounds, args.concurrency)
        paced_minilm = None
        if "on_minilm" in servers:
            pair = {k: servers[k + "_minilm"] for k in CONFIGS}
            for name, s in pair.items():
                await burst(clients[name + "_minilm"], s.url + "/v1/chat/completions", s.headers, "paced",
                            args.concurrency * 4, args.concurrency, True)
            paced_minilm = await interleaved({k: clients[k + "_minilm"] for k in CONFIGS}, pair, "paced",
                                             args.paced_requests, args.paced_rounds, args.concurrency)
        await asyncio.sleep(1.0)
        on = servers["on"]
        dropped = await metric(clients["on"], on.url, on.headers, "keel_trace_spans_dropped_total", {})
    finally:
        for c in clients.values():
            await c.aclose()
    out = {"zero_latency": compare(fast), "paced": compare(paced), "spans_dropped_on": int(dropped)}
    if paced_minilm is not None:
        out["paced_minilm"] = compare(paced_minilm)
    for name in SPLIT:
        if name in fast:
            x = out["zero_latency"][name] = summary(fast[name])
            d, s = paired_diff(fast["off"]["round_cpu"], fast[name]["round_cpu"])
            x["added_cpu_ms_per_round"] = {"median": round(d, 3), "spread": round(s, 3)}
            d, s = paired_diff(fast["off"]["round_p50"], fast[name]["round_p50"])
            x["added_ttft_ms_p50_per_round"] = {"median": round(d, 3), "spread": round(s, 3)}
    return out


# -- (c) where the CPU goes: the chat path in process ------------------------------------------------------------

_OFF = {"enabled": False}
IN_PROCESS = (  # (label, settings, MiniLM embedder)
    ("both_on", {}, False),
    ("traces_off", {"otel": _OFF}, False),
    ("lineage_off", {"monitor": {"lineage": False}}, False),
    ("both_off", {"otel": _OFF, "monitor": {"lineage": False}}, False),
    ("spans_not_stored", {"otel": {"store": False}}, False),  # spans made and ended, no exporter
    ("lineage_no_embed", {"monitor": {"embed_sample": 0.0}}, False),
    ("both_on_minilm", {}, True))


async def in_process(per: int, rounds: int, minilm: bool) -> dict:
    """CPU per request of the chat front door (lineage recorder, release gateway, chat service; no HTTP), one
    request at a time, every configuration built side by side and measured in alternating rounds; the span and
    lineage writers are flushed inside the timed window, so their work counts (this process's CPU: all
    threads)."""
    from app.container import Container
    from app.core.types import ChatMessage
    from app.guardrails.embeddings import SharedEmbedder
    from app.services.chat import ChatRequest, collect
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder

    configs = [c for c in IN_PROCESS if minilm or not c[2]]
    containers: dict[str, object] = {}
    embedders = []
    homes = []
    try:
        for label, overrides, real in configs:
            home = tempfile.TemporaryDirectory(prefix=f"keel-bench-observe-{label}-")
            homes.append(home)
            settings = _settings(Path(home.name), overrides, 0.0)
            embedder = SharedEmbedder() if real else HashingEmbedder(64)
            if real:
                embedders.append(embedder)
                await asyncio.to_thread(embedder.warm_up)
            containers[label] = await Container.build(settings, backends=_backends(0.0),
                                                      rag=build_rag(settings, embedder=embedder))
        counter = iter(range(10**9))

        async def run(c, n: int) -> None:
            front = c.front or c.serving or c.chat
            for _ in range(n):
                await collect(front.stream(ChatRequest(model="fast", messages=(ChatMessage("user", question()),),
                                                       request_id=f"b{next(counter)}", user="bench")))
            if c.front is not None:
                c.front.flush()
            c.tracing.flush()

        for c in containers.values():
            await run(c, per)
        cpu: dict[str, list[float]] = {label: [] for label in containers}
        labels = list(containers)
        for i in range(rounds):
            for label in (labels if i % 2 == 0 else labels[::-1]):
                await asyncio.sleep(0.25)
                t0 = time.process_time()
                await run(containers[label], per)
                cpu[label].append((time.process_time() - t0) * 1e6 / per)
        rows = {label: {"traces": c.settings.otel.enabled, "spans_stored": c.tracing.store is not None,
                        "lineage": c.front is not None, "embed_sample": c.settings.monitor.embed_sample,
                        "lineage_rows": _count(c.settings.home / "lineage.db", "lineage"),
                        "spans": _count(c.settings.home / "traces.db", "spans")} for label, c in containers.items()}
    finally:
        for c in containers.values():
            await c.aclose()
        for e in embedders:
            e.close()
        for h in homes:
            h.cleanup()
    out: dict = {"requests_per_round": per, "rounds": rounds, "stores": rows}
    out.update({f"{label}_cpu_us": round(statistics.median(v), 1) for label, v in cpu.items()})

    def added(a: str, b: str) -> dict[str, float]:
        d, s = paired_diff(cpu[a], cpu[b])
        return {"median": round(d, 1), "spread": round(s, 1)}

    out["traces_added_cpu_us"] = added("traces_off", "both_on")  # lineage on in both
    out["lineage_added_cpu_us"] = added("lineage_off", "both_on")  # traces on in both
    out["both_added_cpu_us"] = added("both_off", "both_on")
    out["span_storage_added_cpu_us"] = added("spans_not_stored", "both_on")  # the SQLite exporter thread
    out["embedding_added_cpu_us"] = added("lineage_no_embed", "both_on")  # the hashing embedder
    if "both_on_minilm" in cpu:
        out["lineage_minilm_added_cpu_us"] = added("lineage_off", "both_on_minilm")
    return out


async def http_span(per: int, rounds: int) -> dict:
    """(e) The HTTP client span of each request to a model server (OpenTelemetry's httpx instrumentation):
    CPU per request of Keel's backend client with and without it, on a scripted transport (no network), spans
    exported to the embedded store's batch processor, rounds interleaved."""
    import httpx
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from app.core.settings import BackendSettings
    from app.llm.clients import http_client

    cfg = BackendSettings(kind="openai", base_url="http://model.test/v1")
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    clients = {name: http_client(cfg, label="bench", tracer_provider=tp,
                                 transport=httpx.MockTransport(lambda r: httpx.Response(200, content=b"{}")))
               for name, tp in (("plain", None), ("instrumented", provider))}
    cpu: dict[str, list[float]] = {name: [] for name in clients}
    for r in range(rounds):
        for name in (list(clients) if r % 2 == 0 else list(reversed(clients))):
            t0 = time.process_time()
            for _ in range(per):
                await clients[name].post("/chat/completions", json={"model": "m"})
            cpu[name].append((time.process_time() - t0) / per * 1e6)
    for c in clients.values():
        await c.aclose()
    provider.shutdown()
    d, s = paired_diff(cpu["plain"], cpu["instrumented"])
    return {"requests_per_round": per, "rounds": rounds,
            **{f"{k}_cpu_us": round(statistics.median(v), 1) for k, v in cpu.items()},
            "added_cpu_us": {"median": round(d, 1), "spread": round(s, 1)}}


# -- (d) drift checks ------------------------------------------------------------------------------------------

DIM = 384
USUAL = [0.3, 0.3, 0.2, 0.1, 0.05, 0.05]


def synthetic(n: int, since: float, seconds: float, *, seed: int, prefix: str):
    """``n`` drift-feature rows spread over ``[since, since + seconds)``, as tests/unit/test_drift.py's traffic()
    (vectorised): unit vectors around 6 topic centres, question lengths, scores, refusals, guard hits."""
    import numpy as np

    from lifecycle.lineage import Features

    centres = np.random.default_rng(7).normal(0, 1, (6, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    topic = rng.choice(6, size=n, p=USUAL)
    v = centres[topic] + rng.normal(0, 1.2, (n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    emb = v.astype(np.float16)
    q = np.maximum(5, rng.normal(60, 15, n).astype(int))
    extra = rng.integers(0, 40, n)
    grounded = rng.random(n) < 0.6
    ok = rng.random(n) > 0.02
    answer = np.maximum(0, rng.normal(400, 80, n).astype(int))
    prompt = rng.integers(200, 400, n)
    completion = np.maximum(1, rng.normal(90, 20, n).astype(int))
    score = rng.uniform(0.012, 0.033, n)
    refused = rng.random(n) < 0.05
    pii = rng.random(n) < 0.04
    return [Features(
        id=f"{prefix}-{i}", at=since + (seconds - 1) * i / n, owner="k", model="m", release=None, variant=None,
        question_chars=int(q[i]), input_chars=int(q[i] + extra[i]), answer_chars=int(answer[i]) if ok[i] else 0,
        prompt_tokens=int(prompt[i]), completion_tokens=int(completion[i]) if ok[i] else 0,
        top_score=float(score[i]) if grounded[i] else None, grounded=bool(grounded[i]), refused=bool(refused[i]),
        validators="pii" if pii[i] else "", outcome="ok" if ok[i] else "error", embedding=emb[i].tobytes())
        for i in range(n)]


def _rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def drift(sizes: list[int], repeats: int) -> dict:
    from app.core.metrics import Metrics
    from app.settings import load_settings
    from lifecycle.lineage import LineageStore
    from lifecycle.monitor.drift import ReferenceSpec, Window, build_monitor

    out: dict = {"sizes": {}, "embedding_dim": DIM, "repeats": repeats}
    with tempfile.TemporaryDirectory(prefix="keel-bench-observe-drift-") as home:
        settings = load_settings(home=Path(home), guardrails={"enabled": False})
        out["settings"] = {k: getattr(settings.monitor, k) for k in (
            "max_rows", "embedding_max_rows", "embedding_components", "clusters", "report_points", "min_rows")}
        store = LineageStore(Path(home) / "lineage.db")
        windows: dict[int, tuple[Window, Window]] = {}
        t = 1_000_000.0
        for n in [1000, *sizes]:
            ref, cur = Window(t, t + 86_400), Window(t + 86_400, t + 2 * 86_400)
            t += 3 * 86_400
            t0 = time.perf_counter()
            for w, seed in ((ref, 1), (cur, 2)):
                for start in range(0, n, 20_000):
                    k = min(20_000, n - start)
                    step = w.seconds / n
                    store.write([], synthetic(k, w.since + start * step, k * step, seed=seed * 1_000_003 + start,
                                              prefix=f"{n}-{seed}-{start}"))
            windows[n] = (ref, cur)
            if n in sizes:
                out["sizes"][str(n)] = {"fill_s": round(time.perf_counter() - t0, 2)}
        monitor = build_monitor(settings, store, Metrics(), None)
        try:
            # Evidently's import, alone (what the first check pays on top; the API imports it lazily too)
            already = {m: m in sys.modules for m in ("evidently", "pandas", "sklearn", "scipy")}
            t0 = time.perf_counter()
            from lifecycle.monitor.drift import _evidently

            _evidently()
            from evidently import DataDefinition, Dataset, Report  # noqa: F401
            from evidently.metrics import EmbeddingsDrift, ValueDrift  # noqa: F401
            out["evidently_import_s"] = round(time.perf_counter() - t0, 2)
            out["already_imported"] = already
            ref, cur = windows[1000]
            t0 = time.perf_counter()
            first = monitor.check(cur, ReferenceSpec(), actor="bench")
            out["first_check_1k_s"] = round(time.perf_counter() - t0, 2)
            out["first_check_verdict"] = first.verdict
            for n in sizes:
                ref, cur = windows[n]
                reads, checks, walls = [], [], []
                result = None
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    rows = store.features(since=cur.since, until=cur.until, limit=settings.monitor.max_rows)
                    reads.append(time.perf_counter() - t0)
                    assert len(rows) == n, (len(rows), n)
                    del rows
                    t0 = time.perf_counter()
                    result = monitor.check(cur, ReferenceSpec(), actor="bench")  # vs the window before
                    walls.append(time.perf_counter() - t0)
                    checks.append(result.duration_s)
                o = out["sizes"][str(n)]
                o.update(check_s=round(statistics.median(checks), 2), check_s_all=[round(x, 2) for x in checks],
                         check_wall_s=round(statistics.median(walls), 2),
                         read_window_s=round(statistics.median(reads), 2),
                         rows=(result.current["rows"], result.reference["rows"]), verdict=result.verdict,
                         drifted=result.drifted_checks,
                         report_mb=round(Path(result.report).stat().st_size / 1e6, 2) if result.report else None,
                         peak_rss_mb=_rss_mb())
        finally:
            monitor.close()
            store.close()
    return out


# -- main ------------------------------------------------------------------------------------------------------


def _ok(good: bool) -> str:
    return "ok" if good else "MISSED"


def table(res: dict, args) -> None:
    c = args.concurrency
    for key, title in (
            ("zero_latency", f"(a) zero-latency backend, streaming, concurrency {c} (Keel's CPU is the bottleneck: "
                             "TTFT includes queueing behind other requests' CPU; req/s is CPU capacity)"),
            ("paced", f"(b) paced backend, {args.token_delay * 1000:g} ms/token x 16 tokens, streaming, concurrency "
                      f"{c} (not CPU-bound: the honest throughput case)"),
            ("paced_minilm", "(b') the same paced backend, both APIs on the deployed embedder (the shared MiniLM, "
                             "which ON's lineage writer embeds every question with)")):
        if key not in res:
            continue
        r = res[key]
        print(f"\n{title}\n    {r['on']['requests']} requests per API in "
              f"{args.rounds if key == 'zero_latency' else args.paced_rounds} interleaved rounds")
        print(f"{'':30}{'TTFT p50':>10}{'TTFT p95':>10}{'total p50':>11}{'req/s':>9}{'API CPU ms/req':>16}")
        for label, k in (("ON (traces + lineage)", "on"), ("traces only", "traces_only"),
                         ("lineage only", "lineage_only"), ("OFF", "off")):
            if k not in r:
                continue
            x = r[k]
            print(f"{label:30}{x['ttft_ms_p50']:>10.2f}{x['ttft_ms_p95']:>10.2f}{x['latency_ms_p50']:>11.2f}"
                  f"{x['throughput_rps']:>9.1f}{x['server_cpu_ms_per_request']:>16.3f}")
        pr = r["added_ttft_ms_p50_per_round"]
        print(f"{'added TTFT p50':30}{r['added_ttft_ms_p50']:>+10.2f} ms   (per round: median {pr['median']:+.2f} "
              f"+/- {pr['spread']:.2f}; target <= 1 ms: {_ok(pr['median'] <= 1 and r['added_ttft_ms_p50'] <= 1)})")
        print(f"{'added TTFT p95':30}{r['added_ttft_ms_p95']:>+10.2f} ms")
        print(f"{'added total latency p50':30}{r['added_latency_ms_p50']:>+10.2f} ms")
        tr = r["throughput_ratio_per_round"]
        print(f"{'throughput ON / OFF':30}{r['throughput_ratio']:>10.4f}      (per round: median {tr['median']:.4f} "
              f"+/- {tr['spread']:.4f}; target >= 0.98: {_ok(r['throughput_ratio'] >= 0.98)})")
        pc = r["added_cpu_ms_per_round"]
        print(f"{'API CPU added per request':30}{r['added_cpu_ms_per_request']:>+10.3f} ms   (per round: median "
              f"{pc['median']:+.3f} +/- {pc['spread']:.3f})")
        for label, k in (("traces only", "traces_only"), ("lineage only", "lineage_only")):
            if k in r:
                pc, pt = r[k]["added_cpu_ms_per_round"], r[k]["added_ttft_ms_p50_per_round"]
                print(f"{'  of which ' + label:30}{pc['median']:>+10.3f} ms   CPU/request (per round +/- "
                      f"{pc['spread']:.3f}); TTFT p50 per round {pt['median']:+.2f} +/- {pt['spread']:.2f}")
        print(f"{'capacity where CPU-bound':30}{r['capacity_ratio_cpu']:>10.4f}      (OFF CPU / ON CPU per request)")
        print(f"{'client CPU per request':30}{r['on']['client_cpu_ms_per_request']:>10.3f} ms   (httpx, this "
              "process: it shares the 2 cores)")
    if "stores" not in res:
        return
    st = res["stores"]
    print(f"\nrecorded by the ON API: {st['on']['lineage_rows']} lineage records ({st['on']['embedded']} questions "
          f"embedded), {st['on']['spans']} spans ({res['spans_dropped_on']} dropped); OFF API: lineage.db "
          f"{st['off']['lineage_rows']}, traces.db {st['off']['spans']}")
    if "on_minilm" in st:
        print(f"ON API on MiniLM: {st['on_minilm']['lineage_rows']} lineage records ({st['on_minilm']['embedded']} "
              f"questions embedded), {st['on_minilm']['spans']} spans; its OFF twin: lineage.db "
              f"{st['off_minilm']['lineage_rows']}, traces.db {st['off_minilm']['spans']}")

    if "in_process" not in res:
        return
    d = res["in_process"]
    print(f"\n(c) where the CPU goes: the chat front door in process (no HTTP), one request at a time, CPU us per "
          f"request (all threads, writers flushed in the window), {d['requests_per_round']} x {d['rounds']} rounds")
    print(f"{'':40}{'CPU us/req':>12}")
    for label, key in (("traces + lineage (the defaults)", "both_on"), ("traces off, lineage on", "traces_off"),
                       ("traces on, lineage off", "lineage_off"), ("both off", "both_off"),
                       ("both on, spans not stored", "spans_not_stored"),
                       ("both on, no question embeddings", "lineage_no_embed"),
                       ("both on, MiniLM embeddings", "both_on_minilm")):
        if f"{key}_cpu_us" in d:
            print(f"{label:40}{d[key + '_cpu_us']:>12.0f}")
    for label, key in (("added by traces", "traces_added_cpu_us"), ("added by lineage (hashing embedder)",
                                                                    "lineage_added_cpu_us"),
                       ("added by both", "both_added_cpu_us"),
                       ("  of which storing spans (SQLite)", "span_storage_added_cpu_us"),
                       ("  of which hashing-embedding questions", "embedding_added_cpu_us"),
                       ("added by lineage (MiniLM embedder)", "lineage_minilm_added_cpu_us")):
        if key in d:
            print(f"{label:40}{d[key]['median']:>+12.0f}   (+/- {d[key]['spread']:.0f} across rounds)")

    if "http_span" in res:
        e = res["http_span"]
        print(f"\n(e) the HTTP client span of each request to the model server (httpx instrumentation), CPU us per "
              f"request, {e['requests_per_round']} x {e['rounds']} rounds: plain {e['plain_cpu_us']:.0f}, "
              f"instrumented {e['instrumented_cpu_us']:.0f}, added {e['added_cpu_us']['median']:+.0f} "
              f"(+/- {e['added_cpu_us']['spread']:.0f})")

    dr = res["drift"]
    print(f"\n(d) drift check: current window of N logged requests vs the N before it (every row embedded, "
          f"{dr['embedding_dim']}-d; the embedding tests sample {dr['settings']['embedding_max_rows']} per window)")
    print(f"{'Evidently import (once per process)':40}{dr['evidently_import_s']:>8.2f} s")
    print(f"{'first check, 1k rows (lazy imports)':40}{dr['first_check_1k_s']:>8.2f} s")
    print(f"{'N':>10}{'s/check':>10}{'read N rows':>13}{'report MB':>11}{'peak RSS MB':>13}{'verdict':>11}"
          f"{'fill s':>9}")
    for n, o in dr["sizes"].items():
        print(f"{int(n):>10}{o['check_s']:>10.2f}{o['read_window_s']:>13.2f}{o['report_mb'] or 0:>11.2f}"
              f"{o['peak_rss_mb']:>13.0f}{o['verdict']:>11}{o['fill_s']:>9.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="(a): requests per API, zero-latency backend")
    ap.add_argument("--paced-requests", type=int, default=None, help="(b): requests per API, paced backend "
                    "(default --requests / 4)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20, help="(a): interleaved rounds ((b): half as many)")
    ap.add_argument("--token-delay", type=float, default=0.02, help="(b): the paced backend's seconds per token")
    ap.add_argument("--drift-sizes", default="10000,100000", help="(d): rows per window, comma-separated")
    ap.add_argument("--drift-repeats", type=int, default=3, help="(d): checks per size")
    ap.add_argument("--no-minilm", action="store_true", help="skip (b') and (c)'s MiniLM row")
    ap.add_argument("--profile", default=None, help="write each API process's cProfile (its event-loop thread) "
                    "to DIR/api-on.prof and DIR/api-off.prof")
    ap.add_argument("--split", action="store_true", help="(a): also an API with traces only and one with lineage "
                    "only (four APIs alternate)")
    ap.add_argument("--only-api", action="store_true", help="(a) and (b) only (with --profile: no JSON written)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 400 requests, 4 rounds, one check per size")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds, args.drift_repeats = min(args.requests, 400), min(args.rounds, 4), 1
    args.paced_requests = args.paced_requests or max(args.concurrency, args.requests // 4)
    args.paced_rounds = max(2, args.rounds // 2)
    t0 = time.time()
    load = {"start": os.getloadavg()}
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="keel-bench-observe-") as tmp:
        servers: dict[str, Server] = {}
        try:
            configs = {**CONFIGS, **(SPLIT if args.split else {})}
            if not args.no_minilm:
                configs.update({f"{k}_minilm": v for k, v in CONFIGS.items()})
            for name, overrides in configs.items():
                profile = str(Path(args.profile) / f"api-{name}.prof") if args.profile else None
                servers[name] = Server(name, Path(tmp) / name, overrides, args.token_delay, profile,
                                       minilm=name.endswith("_minilm"))
            res.update(asyncio.run(measure(servers, args)))
        finally:
            for s in servers.values():
                s.stop()
        res["settings"] = {name: s.settings for name, s in servers.items()}
        res["stores"] = {name: {"lineage_rows": _count(s.home / "lineage.db", "lineage"),
                                "embedded": _count(s.home / "lineage.db", "features", "embedding IS NOT NULL"),
                                "spans": _count(s.home / "traces.db", "spans")} for name, s in servers.items()}
    load["after_api"] = os.getloadavg()
    if args.only_api:
        table(res, args)
        print(f"\nload average (1/5/15 min): {load}\n(--only-api: no JSON written)")
        return
    per, rounds = (100, 4) if args.quick else (300, 8)
    res["in_process"] = asyncio.run(in_process(per, rounds, not args.no_minilm))
    res["http_span"] = asyncio.run(http_span(per * 5, rounds))
    load["after_in_process"] = os.getloadavg()
    res["drift"] = drift([int(x) for x in args.drift_sizes.split(",")], args.drift_repeats)
    load["end"] = os.getloadavg()
    table(res, args)
    print(f"\nload average (1/5/15 min): {load}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "observe.json"
    path.write_text(json.dumps({"config": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version(), "load_average": load,
                                "seconds": round(time.time() - t0, 1), "results": res}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
