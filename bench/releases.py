"""What a release endpoint costs on the chat path, and what a shadow costs the primary.

    .venv/bin/python bench/releases.py [--requests 2000] [--concurrency 8] [--rounds 20] [--quick]

One Keel API (uvicorn on 127.0.0.1, auth on, guardrails off, traces on as by default) runs in a child process on
scripted backends (no model: tests/fakes/llm.py), so what is timed is Keel itself; this process is the client
(httpx, keep-alive, a pool twice the concurrency). In one run:

(a) routing overhead: ``model=fast`` (the alias) against ``model=bench-ab`` (an A/B release whose two variants
    both answer with that alias, assignment per request), non-streaming, at ``--concurrency``; the two targets
    alternate round by round (swapping who goes first) so drift hits both alike. Reported: p50/p95 latency,
    requests/s, the p50 added (pooled, and the median of the per-round differences with its spread), the
    throughput ratio, and the API process's CPU per request (psutil, every thread), whose ratio is the capacity
    lost where the API is CPU-bound (with a zero-latency backend it is; with a real model it rarely is).
(b) shadow cost to the primary: streaming TTFT of ``bench-shadow`` (a shadow release at sample 1.0 whose shadow
    variant answers from a separate SLOW backend, ``--shadow-delay`` s per token) against ``bench-plain`` (the same
    two variants as an A/B at 100/0: the same routing, no shadow), interleaved the same way. Reported: p50/p95
    TTFT, the added p50, the API CPU added, and the shadow requests stored, dropped (queue full: never waited
    for), errored and unpaired (from /metrics).
(c) traffic: the sequential test's per-arm n to catch a 10-point drop (0.9 -> 0.8) against the fixed-horizon n,
    from bench/release_stats.py's own simulation (its functions, imported).
(d) where the time goes: the same targets through the chat path in this process (no HTTP, one request at a time),
    CPU per request with traces on and off: wall-clock numbers on a busy shared machine wander by milliseconds,
    these by microseconds.

Targets: (a) <= 1 ms added at p50 and <= 1% throughput lost; (b) <= 2 ms added TTFT p50. Prints a table and
writes bench/results/releases.json. ``--profile FILE`` writes the API process's cProfile (its event-loop thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REPLY = " ".join(f"word{i}" for i in range(16))  # 16 tokens per answer
QUESTION = "Give me sixteen words."


_RELEASES = (
    # (a): an A/B test whose two variants both answer with the alias: only the release's own work differs
    {"name": "bench-ab", "strategy": "ab", "unit": "request",
     "variants": [{"name": "a", "model": "fast"}, {"name": "b", "model": "fast"}]},
    # (b): a shadow at sample 1.0 on the slow backend, and the same two variants with no shadow (A/B at 100/0)
    {"name": "bench-shadow", "strategy": "shadow", "unit": "request",
     "variants": [{"name": "primary", "model": "fast"}, {"name": "shadow", "model": "slow"}],
     "shadow": {"sample": 1.0, "concurrency": 2, "queue": 64, "timeout_s": 120}},
    {"name": "bench-plain", "strategy": "ab", "unit": "request", "weights": {"primary": 100, "shadow": 0},
     "variants": [{"name": "primary", "model": "fast"}, {"name": "shadow", "model": "slow"}]},
)


# -- the server (child process) ----------------------------------------------------------------------------


def _serve(home: str, port_out, keys_out, shadow_delay: float, profile: str | None) -> None:
    """The API on a free localhost port; its port and keys go back through the pipes."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import uvicorn

    from app.api.main import create_app
    from app.container import Container
    from app.settings import load_settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder
    from tests.fakes.llm import ScriptedBackend

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        settings = load_settings(
            home=Path(home),
            backends={"local": {"kind": "openai", "base_url": "http://unused-fast/v1", "retries": 0},
                      "slow": {"kind": "openai", "base_url": "http://unused-slow/v1", "retries": 0}},
            models={"fast": {"backend": "local", "model": "fast"}, "slow": {"backend": "slow", "model": "slow"}},
            default_model="fast", auth={"default_rate_limit_per_minute": 10_000_000}, guardrails={"enabled": False},
            log_level="WARNING",
        )
        fast = ScriptedBackend(name="fast", reply=REPLY, served=["fast"])
        slow = ScriptedBackend(name="slow", reply=REPLY, served=["slow"], delay_s=shadow_delay)
        container = await Container.build(settings, backends={"local": fast, "slow": slow},
                                          rag=build_rag(settings, embedder=HashingEmbedder(64)))
        keys = {"admin": container.keys.create("bench-admin", ["admin"])[1]}
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (socket.socket()'s
        # proto 0 leaves Nagle on, and every response then waits ~40 ms for the client's delayed ACK)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(container=container), log_level="warning",
                                               access_log=False))
        port_out.send(sock.getsockname()[1])
        keys_out.send(keys)
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

    # uvicorn re-raises the SIGTERM it shut down on once it is done: a no-op here lets the container close and
    # the profile be written
    signal.signal(signal.SIGTERM, lambda *_: None)
    asyncio.run(main())


class Server:
    def __init__(self, home: Path, shadow_delay: float, profile: str | None = None) -> None:
        ctx = mp.get_context("spawn")
        port_r, port_w = ctx.Pipe(duplex=False)
        keys_r, keys_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_serve, args=(str(home), port_w, keys_w, shadow_delay, profile),
                                name="keel-bench-api", daemon=True)
        self.proc.start()
        deadline = time.monotonic() + 120
        while not port_r.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start (exit code {self.proc.exitcode})")
        self.url = f"http://127.0.0.1:{port_r.recv()}"
        self.keys = keys_r.recv()

    async def wait_ready(self, client) -> None:
        for _ in range(300):
            try:
                if (await client.get(self.url + "/healthz")).status_code < 500:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError("the API never answered")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()  # uvicorn's SIGTERM: a graceful shutdown (and the profile written)
            self.proc.join(30)


# -- the client --------------------------------------------------------------------------------------------


async def one(client, url: str, headers: dict, model: str, stream: bool) -> tuple[float, float | None]:
    """(latency to the last byte, time to the first content token) in ms."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "stream": stream}
    t0 = time.perf_counter()
    ttft = None
    if not stream:
        r = await client.post(url, json=body, headers=headers)
        if r.status_code != 200:
            raise RuntimeError(f"{model}: {r.status_code} {r.text[:300]}")
        return (time.perf_counter() - t0) * 1000, None
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
                stream: bool) -> tuple[float, list[float], list[float]]:
    """``n`` requests, ``concurrency`` at a time; (wall s, latencies ms, TTFTs ms)."""
    todo = iter(range(n))
    lats: list[float] = []
    ttfts: list[float] = []

    async def worker() -> None:
        for _ in todo:
            lat, ttft = await one(client, url, headers, model, stream)
            lats.append(lat)
            if ttft is not None:
                ttfts.append(ttft)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, lats, ttfts


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def interleaved(client, url: str, headers: dict, targets: tuple[str, str], n: int, rounds: int,
                      concurrency: int, stream: bool, pid: int) -> dict[str, dict]:
    """``n`` requests per target in ``rounds`` rounds, alternating which target goes first; the API process's
    CPU time is summed per target (much steadier than wall time on a shared machine)."""
    per = max(concurrency, n // rounds)
    out = {t: {"wall": 0.0, "cpu": 0.0, "client_cpu": 0.0, "lats": [], "ttfts": [], "round_p50": [],
               "round_cpu": []} for t in targets}
    for i in range(rounds):
        for t in (targets if i % 2 == 0 else targets[::-1]):
            await asyncio.sleep(0.25)  # the API's writer threads finish the last burst's records outside the window
            c0, k0 = cpu_s(pid), time.process_time()
            wall, lats, ttfts = await burst(client, url, headers, t, per, concurrency, stream)
            await asyncio.sleep(0.25)  # ... and write this burst's inside it (they flush every 0.2 s)
            o = out[t]
            cpu = cpu_s(pid) - c0
            o["cpu"] += cpu
            o["round_cpu"].append(cpu * 1000 / per)
            o["client_cpu"] += time.process_time() - k0
            o["wall"] += wall
            o["lats"] += lats
            o["ttfts"] += ttfts
            o["round_p50"].append(statistics.median(ttfts if stream else lats))
    return out


def summary(o: dict) -> dict[str, float]:
    n = len(o["lats"])
    s = {"requests": n, "latency_ms_p50": round(statistics.median(o["lats"]), 3),
         "latency_ms_p95": round(pct(o["lats"], 0.95), 3), "throughput_rps": round(n / o["wall"], 1),
         "server_cpu_ms_per_request": round(o["cpu"] * 1000 / n, 3),
         "client_cpu_ms_per_request": round(o["client_cpu"] * 1000 / n, 3)}
    if o["ttfts"]:
        s["ttft_ms_p50"] = round(statistics.median(o["ttfts"]), 3)
        s["ttft_ms_p95"] = round(pct(o["ttfts"], 0.95), 3)
    return s


def paired_diff(a: list[float], b: list[float]) -> tuple[float, float]:
    """Median and spread (p10..p90 half-width) of the per-round differences b - a: how stable the added ms is."""
    d = sorted(y - x for x, y in zip(a, b, strict=True))
    return statistics.median(d), (pct(d, 0.9) - pct(d, 0.1)) / 2


async def metric(client, url: str, headers: dict, name: str, labels: dict[str, str]) -> float:
    text = (await client.get(url + "/metrics", headers=headers)).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def measure(server: Server, args) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2)
    admin = {"Authorization": f"Bearer {server.keys['admin']}"}
    chat_url = server.url + "/v1/chat/completions"
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await server.wait_ready(client)
        for body in _RELEASES:
            r = await client.post(server.url + "/v1/releases", json=body, headers=admin)
            if r.status_code != 201:
                raise RuntimeError(f"creating {body['name']}: {r.status_code} {r.text}")
        # warm-up: every path once at full concurrency (imports, pools, the first allocation of everything)
        for model, stream in (("fast", False), ("bench-ab", False), ("bench-plain", True), ("bench-shadow", True)):
            await burst(client, chat_url, admin, model, args.concurrency * 4, args.concurrency, stream)

        pid = server.proc.pid
        a = await interleaved(client, chat_url, admin, ("fast", "bench-ab"), args.requests, args.rounds,
                              args.concurrency, stream=False, pid=pid)
        b = await interleaved(client, chat_url, admin, ("bench-plain", "bench-shadow"), args.shadow_requests,
                              args.rounds, args.concurrency, stream=True, pid=pid)
        await asyncio.sleep(0.5)
        shadow = {outcome: int(await metric(client, server.url, admin, "keel_release_shadow_total",
                                            {"release": "bench-shadow", "outcome": outcome}))
                  for outcome in ("stored", "dropped", "error", "unpaired")}
        report = (await client.get(server.url + "/v1/releases/bench-shadow", headers=admin)).json()
        shadow["pairs_in_store"] = report.get("shadow", {}).get("pairs")
        shadow["offered"] = len(b["bench-shadow"]["lats"]) + args.concurrency * 4  # + the warm-up's
        ab_report = (await client.get(server.url + "/v1/releases/bench-ab", headers=admin)).json()
    out = {"routing": {t: summary(o) for t, o in a.items()}, "shadow": {t: summary(o) for t, o in b.items()}}
    direct, release = out["routing"]["fast"], out["routing"]["bench-ab"]
    added, spread = paired_diff(a["fast"]["round_p50"], a["bench-ab"]["round_p50"])
    out["routing"]["added_ms_p50"] = round(release["latency_ms_p50"] - direct["latency_ms_p50"], 3)
    out["routing"]["added_ms_p95"] = round(release["latency_ms_p95"] - direct["latency_ms_p95"], 3)
    out["routing"]["added_ms_p50_per_round"] = {"median": round(added, 3), "spread": round(spread, 3)}
    out["routing"]["throughput_ratio"] = round(release["throughput_rps"] / direct["throughput_rps"], 4)
    out["routing"]["added_cpu_ms_per_request"] = round(
        release["server_cpu_ms_per_request"] - direct["server_cpu_ms_per_request"], 3)
    added, spread = paired_diff(a["fast"]["round_cpu"], a["bench-ab"]["round_cpu"])
    out["routing"]["added_cpu_ms_per_round"] = {"median": round(added, 3), "spread": round(spread, 3)}
    # where the API is CPU-bound, what it serves per second goes as 1 / CPU per request
    out["routing"]["capacity_ratio_cpu"] = round(
        direct["server_cpu_ms_per_request"] / release["server_cpu_ms_per_request"], 4)
    out["routing"]["release_split"] = {v: d["requests"] for v, d in ab_report["variants"].items()}
    plain, shadowed = out["shadow"]["bench-plain"], out["shadow"]["bench-shadow"]
    added, spread = paired_diff(b["bench-plain"]["round_p50"], b["bench-shadow"]["round_p50"])
    out["shadow"]["added_ttft_ms_p50"] = round(shadowed["ttft_ms_p50"] - plain["ttft_ms_p50"], 3)
    out["shadow"]["added_ttft_ms_p95"] = round(shadowed["ttft_ms_p95"] - plain["ttft_ms_p95"], 3)
    out["shadow"]["added_ttft_ms_p50_per_round"] = {"median": round(added, 3), "spread": round(spread, 3)}
    out["shadow"]["shadow_requests"] = shadow
    out["shadow"]["added_cpu_ms_per_request"] = round(
        shadowed["server_cpu_ms_per_request"] - plain["server_cpu_ms_per_request"], 3)
    added, spread = paired_diff(b["bench-plain"]["round_cpu"], b["bench-shadow"]["round_cpu"])
    out["shadow"]["added_cpu_ms_per_round"] = {"median": round(added, 3), "spread": round(spread, 3)}
    return out


# -- (d) where the time goes: the chat path in process ---------------------------------------------------------


async def in_process(per: int, rounds: int, otel: bool, shadow_delay: float) -> dict[str, float]:
    """CPU per request of the chat path itself (the gateway and everything under it, no HTTP), one request at a
    time, for each target; this process's CPU time counts every thread (the writers of observations, spans and
    lineage too). Steadier than any wall-clock number on a shared machine."""
    from app.container import Container
    from app.core.types import ChatMessage
    from app.services.chat import ChatRequest, collect
    from app.settings import load_settings
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder
    from lifecycle.releases.spec import ReleaseSpec
    from tests.fakes.llm import ScriptedBackend

    with tempfile.TemporaryDirectory(prefix="keel-bench-releases-inproc-") as home:
        settings = load_settings(
            home=Path(home), backends={"local": {"kind": "openai", "base_url": "http://unused-fast/v1", "retries": 0},
                                       "slow": {"kind": "openai", "base_url": "http://unused-slow/v1", "retries": 0}},
            models={"fast": {"backend": "local", "model": "fast"}, "slow": {"backend": "slow", "model": "slow"}},
            default_model="fast", guardrails={"enabled": False}, otel={"enabled": otel})
        c = await Container.build(settings, backends={
            "local": ScriptedBackend(name="fast", reply=REPLY, served=["fast"]),
            "slow": ScriptedBackend(name="slow", reply=REPLY, served=["slow"], delay_s=shadow_delay)},
            rag=build_rag(settings, embedder=HashingEmbedder(64)))
        try:
            for body in _RELEASES:
                c.releases.create(ReleaseSpec.model_validate(body), actor="bench")
            targets = ("fast", "bench-ab", "bench-plain", "bench-shadow")

            async def run(model: str, n: int) -> None:
                for i in range(n):
                    await collect(c.serving.stream(ChatRequest(
                        model=model, messages=(ChatMessage("user", QUESTION),), request_id=f"b{i}", user="bench")))

            for t in targets:
                await run(t, per)
            cpu: dict[str, list[float]] = {t: [] for t in targets}
            for i in range(rounds):
                for t in (targets if i % 2 == 0 else targets[::-1]):
                    await asyncio.sleep(0.25)
                    t0 = time.process_time()
                    await run(t, per)
                    await asyncio.sleep(0.25)
                    cpu[t].append((time.process_time() - t0) * 1e6 / per)
        finally:
            await c.aclose()
    out = {f"{t}_cpu_us": round(statistics.median(v), 1) for t, v in cpu.items()}
    out["release_added_cpu_us"] = round(statistics.median(
        b - a for a, b in zip(cpu["fast"], cpu["bench-ab"], strict=True)), 1)
    out["shadow_added_cpu_us"] = round(statistics.median(
        b - a for a, b in zip(cpu["bench-plain"], cpu["bench-shadow"], strict=True)), 1)
    return out


# -- (c) traffic ---------------------------------------------------------------------------------------------


def traffic(runs: int, seed: int = 0) -> dict:
    """bench/release_stats.py's simulation, 0.9 -> 0.8 at alpha 0.05, a look every 10 requests per arm."""
    import importlib.util

    import numpy as np

    from lifecycle.releases.stats import fixed_horizon_n

    # bench/release_stats.py by its path: bench/ on sys.path would shadow the ingest package with bench/ingest.py
    spec = importlib.util.spec_from_file_location("release_stats", ROOT / "bench" / "release_stats.py")
    release_stats = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(release_stats)
    first_fail = release_stats.first_fail

    p0, drop, alpha, peek, max_n = 0.9, 0.1, 0.05, 10, 3000
    rng = np.random.default_rng(seed)
    firsts = [first_fail(rng, p0, p0 - drop, max_n, peek, alpha) for _ in range(runs)]
    ordered = sorted(n if n is not None else max_n + 1 for n in firsts)
    return {"p0": p0, "drop": drop, "alpha": alpha, "peek": peek, "runs": runs,
            "sequential_fail_n_p50": int(np.quantile(ordered, 0.5, method="inverted_cdf")),
            "sequential_fail_n_p90": int(np.quantile(ordered, 0.9, method="inverted_cdf")),
            "fixed_horizon_n_power80": fixed_horizon_n(p0, -drop, alpha, 0.8),
            "fixed_horizon_n_power90": fixed_horizon_n(p0, -drop, alpha, 0.9)}


# -- main ----------------------------------------------------------------------------------------------------


def table(res: dict, args) -> None:
    r, s, t = res["routing"], res["shadow"], res["traffic"]
    c = args.concurrency
    print(f"\n(a) routing overhead, non-streaming, concurrency {c}, {r['fast']['requests']} requests per target "
          f"in {args.rounds} interleaved rounds")
    print(f"{'':34}{'p50 ms':>10}{'p95 ms':>10}{'req/s':>10}{'API CPU ms/req':>16}")
    for label, key in (("model=fast (the alias)", "fast"), ("model=bench-ab (A/B, both fast)", "bench-ab")):
        x = r[key]
        print(f"{label:34}{x['latency_ms_p50']:>10.2f}{x['latency_ms_p95']:>10.2f}{x['throughput_rps']:>10.1f}"
              f"{x['server_cpu_ms_per_request']:>16.3f}")
    pr = r["added_ms_p50_per_round"]
    ok_lat = "ok" if r["added_ms_p50"] <= 1 else "ABOVE TARGET"
    ok_thr = "ok" if r["throughput_ratio"] >= 0.99 else "ABOVE TARGET"
    print(f"{'added by the release, p50':34}{r['added_ms_p50']:>+10.2f} ms   (per round: median {pr['median']:+.2f}, "
          f"+/- {pr['spread']:.2f}; target <= 1 ms: {ok_lat})")
    print(f"{'added by the release, p95':34}{r['added_ms_p95']:>+10.2f} ms")
    print(f"{'throughput, release / alias':34}{r['throughput_ratio']:>10.4f}      (target >= 0.99: {ok_thr}; wall "
          "clock)")
    ok_cap = "ok" if r["capacity_ratio_cpu"] >= 0.99 else "ABOVE TARGET"
    pc = r["added_cpu_ms_per_round"]
    print(f"{'API CPU added per request':34}{r['added_cpu_ms_per_request']:>+10.3f} ms   (per round: median "
          f"{pc['median']:+.3f}, +/- {pc['spread']:.3f})")
    print(f"{'capacity where the API is CPU-bound':34}{r['capacity_ratio_cpu']:>10.4f}      (alias CPU / release "
          f"CPU; target >= 0.99: {ok_cap})")
    print(f"{'client CPU per request (httpx)':34}{r['fast']['client_cpu_ms_per_request']:>10.3f} ms   (the load "
          f"generator's own cost: what bounds req/s when it is near 1000 / req/s)")
    print(f"{'A/B split (requests)':34}{json.dumps(r['release_split']):>10}")

    print(f"\n(b) primary TTFT with a slow shadow (sample 1.0, {args.shadow_delay:g} s/token, queue 64, 2 at a time), "
          f"streaming, concurrency {c}, {s['bench-plain']['requests']} requests per target")
    print(f"{'':34}{'TTFT p50':>10}{'TTFT p95':>10}{'last p50':>10}{'req/s':>10}{'API CPU ms/req':>16}")
    for label, key in (("bench-plain (A/B 100/0)", "bench-plain"), ("bench-shadow (shadow 1.0)", "bench-shadow")):
        x = s[key]
        print(f"{label:34}{x['ttft_ms_p50']:>10.2f}{x['ttft_ms_p95']:>10.2f}{x['latency_ms_p50']:>10.2f}"
              f"{x['throughput_rps']:>10.1f}{x['server_cpu_ms_per_request']:>16.3f}")
    pr = s["added_ttft_ms_p50_per_round"]
    ok = "ok" if s["added_ttft_ms_p50"] <= 2 else "ABOVE TARGET"
    print(f"{'added TTFT p50 by the shadow':34}{s['added_ttft_ms_p50']:>+10.2f} ms   (per round: median "
          f"{pr['median']:+.2f}, +/- {pr['spread']:.2f}; target <= 2 ms: {ok})")
    print(f"{'added TTFT p95 by the shadow':34}{s['added_ttft_ms_p95']:>+10.2f} ms")
    pc = s["added_cpu_ms_per_round"]
    print(f"{'API CPU added per request':34}{s['added_cpu_ms_per_request']:>+10.3f} ms   (per round: median "
          f"{pc['median']:+.3f}, +/- {pc['spread']:.3f}; the shadow requests' own work included)")
    sh = s["shadow_requests"]
    print(f"{'shadow requests':34}offered {sh['offered']}, stored {sh['stored']}, dropped (queue full) "
          f"{sh['dropped']}, errors {sh['error']}, unpaired {sh['unpaired']}")

    print(f"\n(c) traffic to catch a {t['drop'] * 100:g}-point drop ({t['p0']} -> {t['p0'] - t['drop']:.1f}), "
          f"alpha {t['alpha']}, a look every {t['peek']} per arm, {t['runs']} simulated canaries")
    print(f"{'sequential (peek freely): median n/arm':44}{t['sequential_fail_n_p50']:>8}")
    print(f"{'sequential: p90 n/arm':44}{t['sequential_fail_n_p90']:>8}")
    print(f"{'fixed horizon, 80% power (look once)':44}{t['fixed_horizon_n_power80']:>8}")
    print(f"{'fixed horizon, 90% power (look once)':44}{t['fixed_horizon_n_power90']:>8}")

    d = res["in_process"]
    print("\n(d) where the time goes: the chat path in process (no HTTP), one request at a time, CPU us per request "
          "(all threads)")
    print(f"{'':34}{'alias':>9}{'A/B':>9}{'added':>9}{'plain':>9}{'shadow':>9}{'added':>9}")
    for label, key in (("traces on (the default)", "traces_on"), ("traces off (otel.enabled false)", "traces_off")):
        x = d[key]
        print(f"{label:34}{x['fast_cpu_us']:>9.0f}{x['bench-ab_cpu_us']:>9.0f}{x['release_added_cpu_us']:>+9.0f}"
              f"{x['bench-plain_cpu_us']:>9.0f}{x['bench-shadow_cpu_us']:>9.0f}{x['shadow_added_cpu_us']:>+9.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="(a): requests per target")
    ap.add_argument("--shadow-requests", type=int, default=None, help="(b): requests per target (default: "
                    "--requests / 2)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds per comparison")
    ap.add_argument("--shadow-delay", type=float, default=0.05, help="(b): the shadow backend's seconds per token")
    ap.add_argument("--sim-runs", type=int, default=200, help="(c): simulated canaries")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 400 requests, 4 rounds, 50 simulations")
    ap.add_argument("--profile", default=None, help="write the API process's cProfile stats to this file")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds, args.sim_runs = min(args.requests, 400), min(args.rounds, 4), 50
    args.shadow_requests = args.shadow_requests or max(args.concurrency, args.requests // 2)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="keel-bench-releases-") as tmp:
        server = Server(Path(tmp), args.shadow_delay, args.profile)
        try:
            res = asyncio.run(measure(server, args))
        finally:
            server.stop()
    per, rounds = (150, 4) if args.quick else (300, 8)
    res["in_process"] = {
        "requests_per_round": per, "rounds": rounds,
        "traces_on": asyncio.run(in_process(per, rounds, True, args.shadow_delay)),
        "traces_off": asyncio.run(in_process(per, rounds, False, args.shadow_delay))}
    res["traffic"] = traffic(args.sim_runs)
    table(res, args)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "releases.json"
    path.write_text(json.dumps({"config": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version(), "seconds": round(time.time() - t0, 1),
                                "results": res}, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
