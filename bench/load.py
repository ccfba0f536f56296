"""Load: the request rate one and two Keel API processes sustain within an error budget, on shared state.

    .venv/bin/python bench/load.py [--duration 8] [--p95-ms 1000] [--vllm] [--guards] [--quick]

Two Keel APIs (child processes: uvicorn + the container, as ``keel serve`` runs them) share one Postgres through
``database_url`` (keys, the shared rate limits, prompts, evals, audit...: what several processes behind a load
balancer share; ``bench/_postgres.py``: a throwaway local server unless ``--postgres-url``). Every request is a
streaming chat completion with a distinct question, authenticated and rate-limited (the limit set high enough
never to refuse).

(a) fast fake backend: each API answers from a scripted in-process backend (16 tokens, ``--token-delay`` s each),
    so the APIs' own CPU is the limit, the case where a second process should hold more;
(b) ``--vllm``: the same two APIs on one real vLLM (SmolLM2 on CPU, ``--max-tokens`` tokens): vLLM is the limit,
    and a second Keel process should hold about what one does.

Method: open-loop arrivals (evenly spaced, so a slow server cannot slow the offered load down) at a rate R for
``--duration`` s; "1 API" sends everything to the first, "2 APIs" alternates between both (a round-robin load
balancer). R doubles from ``--start-rate`` until a step breaks the budget (any error, or latency p95 over
``--p95-ms``), then two bisection steps. The highest rate held is the capacity; the table shows each step and the
ratio 2 APIs / 1 API. The client shares the machine's cores: its CPU per request is reported, and a step whose
requests could not all be sent on time (but were served within budget) is marked client-bound rather than counted;
on a small machine the client, the APIs and Postgres share the cores, so the ratio is what the machine allows,
not what two hosts would. Writes bench/results/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _sibling(name: str):
    """A sibling script by its path: bench/ on sys.path would shadow the ingest package with bench/ingest.py."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module

REPLY = " ".join(f"word{i}" for i in range(16))


# -- the APIs (child processes) --------------------------------------------------------------------------------


def _serve(home: str, database_url: str, token_delay: float, vllm: dict | None, guards: bool, port_out,
           key_out) -> None:
    """One API on a free localhost port; its port and an API key go back through the pipes."""
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
    backends: dict = {"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}}
    models: dict = {"fast": {"backend": "local", "model": "fast"}}
    if vllm:
        backends["vllm"] = {"kind": "vllm", "base_url": vllm["url"], "api_key": vllm["key"], "read_timeout_s": 120}
        models["smollm2"] = {"backend": "vllm", "model": "smollm2"}

    async def main() -> None:
        settings = load_settings(home=Path(home), database_url=database_url, backends=backends, models=models,
                                 default_model="fast", auth={"default_rate_limit_per_minute": 100_000_000},
                                 guardrails={"enabled": guards}, log_level="WARNING")
        fake = ScriptedBackend(name="fast", reply=REPLY, served=["fast"], delay_s=token_delay)
        container = await Container.build(settings, backends={"local": fake},
                                          rag=build_rag(settings, embedder=HashingEmbedder(64)))
        key = container.keys.create(f"load-{os.getpid()}", ["chat"])[1]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (see bench/observe.py)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(container=container), log_level="warning",
                                               access_log=False))
        port_out.send(sock.getsockname()[1])
        key_out.send(key)
        try:
            await server.serve(sockets=[sock])
        finally:
            await container.aclose()

    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn re-raises it once done: let the container close
    asyncio.run(main())


class Api:
    def __init__(self, name: str, home: Path, database_url: str, token_delay: float, vllm: dict | None,
                 guards: bool) -> None:
        ctx = mp.get_context("spawn")
        port_r, port_w = ctx.Pipe(duplex=False)
        key_r, key_w = ctx.Pipe(duplex=False)
        self.name = name
        self.proc = ctx.Process(target=_serve, name=f"keel-load-{name}", daemon=True,
                                args=(str(home), database_url, token_delay, vllm, guards, port_w, key_w))
        self.proc.start()
        deadline = time.monotonic() + 300
        while not port_r.poll(0.2):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"API {name} did not start (exit code {self.proc.exitcode})")
        self.url = f"http://127.0.0.1:{port_r.recv()}"
        self.headers = {"Authorization": f"Bearer {key_r.recv()}"}

    def wait_ready(self) -> None:
        for _ in range(600):
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"API {self.name} never answered")

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(30)


# -- the load ---------------------------------------------------------------------------------------------------

_asked = iter(range(10**9))


async def one(client: httpx.AsyncClient, api: Api, model: str, max_tokens: int) -> tuple[float | None, str | None]:
    """One streaming request: (latency to the last byte in ms, None) or (None, what went wrong)."""
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"How do I rotate the keys of tenant {next(_asked)}?"}]}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", api.url + "/v1/chat/completions", json=body, headers=api.headers) as r:
            if r.status_code != 200:
                await r.aread()
                return None, f"HTTP {r.status_code}: {r.text[:120]}"
            done = False
            async for line in r.aiter_lines():
                if line.startswith("event: error") or '"error"' in line[:20]:
                    return None, f"stream error: {line[:120]}"
                done = done or line == "data: [DONE]"
            if not done:
                return None, "stream ended without [DONE]"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return (time.perf_counter() - t0) * 1000, None


async def step(apis: list[Api], rate: float, duration: float, model: str, max_tokens: int) -> dict:
    """``rate`` requests per second for ``duration`` s, evenly spaced, alternating over ``apis``."""
    n = max(1, round(rate * duration))
    lats: list[float] = []
    errors: list[str] = []
    late = 0
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def fire(i: int) -> None:
            lat, err = await one(client, apis[i % len(apis)], model, max_tokens)
            if err is None:
                lats.append(lat)
            else:
                errors.append(err)

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.05:
                late += 1  # the client could not send this one on time: it is the bottleneck, not the APIs
            tasks.append(asyncio.create_task(fire(i)))
        sent_s = time.perf_counter() - t0
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    s = sorted(lats)
    return {"rate": rate, "requests": n, "ok": len(lats), "errors": len(errors), "error_sample": errors[:3],
            "late_sends": late, "offered_rps": round(n / sent_s, 1) if sent_s else rate,
            "completed_rps": round(len(lats) / wall, 1),
            "latency_ms_p50": round(statistics.median(s), 1) if s else None,
            "latency_ms_p95": round(s[min(len(s) - 1, int(0.95 * len(s)))], 1) if s else None,
            "client_cpu_ms_per_request": round(cpu * 1000 / n, 3)}


def verdict(r: dict, p95_ms: float) -> str:
    """broken: an error, or p95 over budget; client-bound: within budget, but the client could not offer the rate
    (more than 5% of the requests sent late), so the step says nothing about the APIs."""
    if r["errors"] or r["latency_ms_p95"] is None or r["latency_ms_p95"] > p95_ms:
        return "broken"
    if r["late_sends"] > 0.05 * r["requests"]:
        return "client-bound"
    return "held"


async def capacity(apis: list[Api], *, start: float, duration: float, p95_ms: float, model: str,
                   max_tokens: int, ceiling: float, label: str) -> dict:
    """Double the rate until a step breaks the budget, then bisect twice; the highest rate held."""
    steps: list[dict] = []

    async def run(rate: float) -> str:
        r = await step(apis, rate, duration, model, max_tokens)
        r["verdict"] = verdict(r, p95_ms)
        steps.append(r)
        print(f"  {label:8} {rate:>8.1f} req/s  p50 {r['latency_ms_p50'] or 0:>8.1f} ms  p95 "
              f"{r['latency_ms_p95'] or 0:>8.1f} ms  errors {r['errors']:>3}  late {r['late_sends']:>4}  "
              f"{r['verdict']}", flush=True)
        await asyncio.sleep(1.0)  # let the queues drain between steps
        return r["verdict"]

    held, broke = 0.0, None
    rate = start
    while rate <= ceiling:
        outcome = await run(rate)
        if outcome != "held":
            broke = rate
            break
        held, rate = rate, rate * 2
    if broke is not None and held > 0:
        for _ in range(2):
            mid = round((held + broke) / 2, 1)
            if await run(mid) == "held":
                held = mid
            else:
                broke = mid
    client_bound = any(s["verdict"] == "client-bound" for s in steps)
    return {"capacity_rps": held, "first_broken_rps": broke, "client_bound": client_bound, "steps": steps}


async def measure(apis: list[Api], args, *, model: str, start: float, p95_ms: float, max_tokens: int,
                  ceiling: float) -> dict:
    out = {}
    for label, used in (("1 API", apis[:1]), ("2 APIs", apis)):
        out[label] = await capacity(used, start=start, duration=args.duration, p95_ms=p95_ms, model=model,
                                    max_tokens=max_tokens, ceiling=ceiling, label=label)
    one, two = out["1 API"]["capacity_rps"], out["2 APIs"]["capacity_rps"]
    out["ratio_2_over_1"] = round(two / one, 2) if one else None
    return out


def table(res: dict, args) -> None:
    for key, title in (("fake", f"(a) fast fake backend (16 tokens x {args.token_delay * 1000:g} ms): the APIs' CPU "
                                f"is the limit; budget: 0 errors, p95 <= {args.p95_ms:g} ms"),
                       ("vllm", f"(b) one real vLLM (SmolLM2, {args.max_tokens} tokens, CPU): vLLM is the limit; "
                                f"budget: 0 errors, p95 <= {args.vllm_p95_ms:g} ms")):
        if key not in res:
            continue
        r = res[key]
        print(f"\n{title}\n{'':10}{'held req/s':>12}{'broke at':>10}{'p50 ms':>9}{'p95 ms':>9}{'late sends':>12}")
        for label in ("1 API", "2 APIs"):
            c = r[label]
            best = max((s for s in c["steps"] if s["verdict"] == "held"), key=lambda s: s["rate"], default=None)
            print(f"{label:10}{c['capacity_rps']:>12.1f}{c['first_broken_rps'] or 0:>10.1f}"
                  f"{(best or {}).get('latency_ms_p50') or 0:>9.1f}{(best or {}).get('latency_ms_p95') or 0:>9.1f}"
                  f"{sum(x['late_sends'] for x in c['steps']):>12}"
                  f"{' (a step client-bound)' if c['client_bound'] else ''}")
        print(f"{'2 APIs / 1 API':10}{r['ratio_2_over_1'] or 0:>12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per rate step")
    ap.add_argument("--start-rate", type=float, default=20.0, help="(a): the first rate step, req/s")
    ap.add_argument("--ceiling", type=float, default=2000.0, help="(a): stop doubling above this rate")
    ap.add_argument("--token-delay", type=float, default=0.005, help="(a): the fake backend's seconds per token")
    ap.add_argument("--p95-ms", type=float, default=1000.0, help="(a): the latency p95 budget, ms")
    ap.add_argument("--vllm", action="store_true", help="(b): also on one real vLLM (SmolLM2 on CPU)")
    ap.add_argument("--max-tokens", type=int, default=16, help="(b): tokens per answer")
    ap.add_argument("--vllm-p95-ms", type=float, default=2000.0,
                    help="(b): the latency p95 budget, ms (about three times one answer alone)")
    ap.add_argument("--guards", action="store_true", help="the default guardrail policy on (off: the serving path)")
    ap.add_argument("--postgres-url", default=None, help="a Postgres to share (default: a throwaway local one)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 s steps")
    args = ap.parse_args()
    if args.quick:
        args.duration = 3.0
    t0 = time.time()
    load = {"start": os.getloadavg()}
    res: dict = {}
    keel = None
    postgres = _sibling("_postgres").postgres
    with tempfile.TemporaryDirectory(prefix="keel-bench-load-") as tmp, postgres(args.postgres_url,
                                                                                Path(tmp) / "pg") as url:
        vllm = None
        if args.vllm:
            # Keel with its managed vLLM (bench/serving.py's): (b)'s APIs share that vLLM server
            keel, _, vllm_url, _, vllm_key = _sibling("serving").start_keel(enforce_eager=True)
            vllm = {"url": f"{vllm_url}/v1", "key": vllm_key}
        apis: list[Api] = []
        try:
            for name in ("a", "b"):
                apis.append(Api(name, Path(tmp) / name, url, args.token_delay, vllm, args.guards))
            for api in apis:
                api.wait_ready()
            print("(a) fast fake backend")
            res["fake"] = asyncio.run(measure(apis, args, model="fast", start=args.start_rate, p95_ms=args.p95_ms,
                                              max_tokens=64, ceiling=args.ceiling))
            if vllm:
                print("(b) one real vLLM")
                res["vllm"] = asyncio.run(measure(apis, args, model="smollm2", start=0.5,
                                                  p95_ms=args.vllm_p95_ms, max_tokens=args.max_tokens,
                                                  ceiling=64.0))
        finally:
            for api in apis:
                api.stop()
            if keel is not None:
                keel.send_signal(signal.SIGTERM)
                try:
                    keel.wait(60)
                except subprocess.TimeoutExpired:
                    keel.kill()
    load["end"] = os.getloadavg()
    table(res, args)
    print(f"\nload average (1/5/15 min): {load}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / "load.json"
    path.write_text(json.dumps({"config": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version(), "load_average": load,
                                "seconds": round(time.time() - t0, 1), "results": res}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
