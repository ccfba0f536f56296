"""Batch serving: a batch's throughput against the same requests sent straight to vLLM at its best concurrency,
and what a running batch costs interactive requests.

    .venv/bin/python bench/batch.py [--requests 64] [--max-tokens 32] [--concurrency 2 4 8] [--interactive 12]

Starts Keel with its managed vLLM (SmolLM2) in a scratch home (bench/serving.py's ``start_keel``), then in one
run:

(a) direct: ``--requests`` chat requests straight to vLLM at each ``--concurrency``; the best is the baseline;
(b) batch: the same requests as one batch through Keel (``/v1/files`` + ``/v1/batches``, the ``smollm2-raw``
    alias: no guardrails, so the batch path itself is what is measured; ``batch.concurrency`` set to the best
    direct concurrency), timed from create to completed; reported as requests/s and the ratio to (a);
(c) interactive TTFT: ``--interactive`` streaming requests one after another, with no batch running and then
    while a batch runs (Keel yields: ``batch.concurrency_under_load`` while interactive requests are in flight and
    for ``batch.yield_s`` after); p50/p95 and the added p50;
(d) the same as (c) on a second Keel with ``batch.yield_s: 0`` (yielding only while a request is in flight: the
    behaviour before the hold-down), the baseline for what the hold-down buys.

Target: (b) >= 90% of (a). Prints a table and writes bench/results/batch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from serving import PROMPTS, start_keel  # noqa: E402 - a sibling script, not a package


def body(model: str, i: int, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}


async def direct(vllm: str, vllm_key: str, n: int, concurrency: int, max_tokens: int) -> float:
    """Requests per second for ``n`` requests at ``concurrency`` straight to vLLM."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {vllm_key}"}) as client:
        async def one(i: int) -> None:
            async with sem:
                r = await client.post(f"{vllm}/v1/chat/completions", json=body("smollm2", i, max_tokens))
                r.raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - t0)


def batch(keel: str, key: str, n: int, max_tokens: int, model: str = "smollm2-raw") -> tuple[float, str]:
    """Requests per second of one batch of ``n`` requests, created to completed; and its id."""
    h = {"Authorization": f"Bearer {key}"}
    lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body(model, i, max_tokens)}) + "\n" for i in range(n))
    f = httpx.post(f"{keel}/v1/files", headers=h, files={"file": ("b.jsonl", lines.encode())},
                   data={"purpose": "batch"}, timeout=60).json()
    t0 = time.perf_counter()
    b = httpx.post(f"{keel}/v1/batches", headers=h, timeout=60, json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
    while b["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.1)
        b = httpx.get(f"{keel}/v1/batches/{b['id']}", headers=h, timeout=60).json()
    took = time.perf_counter() - t0
    assert b["request_counts"]["completed"] == n, b
    return n / took, b["id"]


def start_batch(keel: str, key: str, n: int, max_tokens: int) -> str:
    h = {"Authorization": f"Bearer {key}"}
    lines = "".join(json.dumps({"custom_id": f"bg{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body("smollm2-raw", i, max_tokens)}) + "\n" for i in range(n))
    f = httpx.post(f"{keel}/v1/files", headers=h, files={"file": ("bg.jsonl", lines.encode())},
                   data={"purpose": "batch"}, timeout=60).json()
    return httpx.post(f"{keel}/v1/batches", headers=h, timeout=60, json={
        "input_file_id": f["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()["id"]


def ttfts(keel: str, key: str, n: int) -> list[float]:
    """TTFT (ms) of ``n`` streaming requests, one after another."""
    out = []
    h = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=600) as client:
        for i in range(n):
            t0 = time.perf_counter()
            with client.stream("POST", f"{keel}/v1/chat/completions", headers=h,
                               json=body("smollm2-raw", i, 16, stream=True)) as r:
                first = None
                for text in r.iter_lines():  # read to the end: the next request starts on a quiet connection
                    if first is None and text.startswith("data:") and '"content"' in text:
                        first = (time.perf_counter() - t0) * 1000
                if first is not None:
                    out.append(first)
    return out


def interactive(keel: str, key: str, args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Interactive TTFTs with no batch running, then while a batch of twice ``--requests`` runs (cancelled after)."""
    quiet = ttfts(keel, key, args.interactive)
    bg = start_batch(keel, key, args.requests * 2, args.max_tokens)
    busy = ttfts(keel, key, args.interactive)
    httpx.post(f"{keel}/v1/batches/{bg}/cancel", headers={"Authorization": f"Bearer {key}"}, timeout=60)
    return quiet, busy


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--interactive", type=int, default=12)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    print("starting Keel with a managed vLLM server...", flush=True)
    # batch.concurrency follows the best direct concurrency: it is set once the direct runs have found it.
    best_guess = max(args.concurrency)
    proc, keel, vllm, key, vkey = start_keel(True, {"batch": {"concurrency": best_guess}})
    try:
        asyncio.run(direct(vllm, vkey, 8, 4, args.max_tokens))  # warm-up
        batch(keel, key, 8, args.max_tokens)
        rates = {}
        for c in args.concurrency:
            rates[c] = asyncio.run(direct(vllm, vkey, args.requests, c, args.max_tokens))
            print(f"direct, concurrency {c}: {rates[c]:.2f} req/s", flush=True)
        best = max(rates, key=rates.get)
        batch_rates = []
        for _ in range(2):
            batch_rates.append(batch(keel, key, args.requests, args.max_tokens)[0])
            print(f"batch: {batch_rates[-1]:.2f} req/s", flush=True)
        direct_again = asyncio.run(direct(vllm, vkey, args.requests, best, args.max_tokens))
        print(f"direct again, concurrency {best}: {direct_again:.2f} req/s", flush=True)
        baseline = statistics.mean([rates[best], direct_again])
        quiet, busy = interactive(keel, key, args)
    finally:
        proc.terminate()
        proc.wait(60)
    print("starting a second Keel with batch.yield_s: 0 (the baseline)...", flush=True)
    proc, keel, _, key, _ = start_keel(True, {"batch": {"concurrency": best, "yield_s": 0}})
    try:
        batch(keel, key, 8, args.max_tokens)  # warm-up
        quiet0, busy0 = interactive(keel, key, args)
    finally:
        proc.terminate()
        proc.wait(60)

    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "requests": args.requests, "max_tokens": args.max_tokens,
        "direct_rps": {str(c): round(r, 3) for c, r in rates.items()}, "best_concurrency": best,
        "direct_rps_baseline": round(baseline, 3), "batch_rps": [round(r, 3) for r in batch_rates],
        "batch_ratio": round(statistics.mean(batch_rates) / baseline, 3),
        "ttft_ms_quiet": {"p50": round(pct(quiet, 0.5), 1), "p95": round(pct(quiet, 0.95), 1)},
        "ttft_ms_during_batch": {"p50": round(pct(busy, 0.5), 1), "p95": round(pct(busy, 0.95), 1)},
        "batch_concurrency": best_guess,
        "ttft_ms_during_batch_no_hold_down": {"p50": round(pct(busy0, 0.5), 1), "p95": round(pct(busy0, 0.95), 1),
                                              "quiet_p50": round(pct(quiet0, 0.5), 1)},
        "ttft_ms_raw": {"quiet": [round(x, 1) for x in quiet], "during_batch": [round(x, 1) for x in busy],
                        "quiet_no_hold_down": [round(x, 1) for x in quiet0],
                        "during_batch_no_hold_down": [round(x, 1) for x in busy0]},
    }
    result["ttft_p50_added_ms"] = round(result["ttft_ms_during_batch"]["p50"] - result["ttft_ms_quiet"]["p50"], 1)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Batch vs direct vLLM ({args.requests} requests x {args.max_tokens} tokens)")
    t.add_column("what")
    t.add_column("value", justify="right")
    for c, r in rates.items():
        t.add_row(f"direct, concurrency {c}", f"{r:.2f} req/s")
    t.add_row("direct baseline (best, measured twice)", f"{baseline:.2f} req/s")
    t.add_row("batch through Keel", " / ".join(f"{r:.2f}" for r in batch_rates) + " req/s")
    t.add_row("[bold]batch / direct[/bold]", f"[bold]{result['batch_ratio'] * 100:.1f}%[/bold] (target >= 90%)")
    t.add_row("interactive TTFT p50 / p95, no batch", f"{result['ttft_ms_quiet']['p50']:.0f} / "
              f"{result['ttft_ms_quiet']['p95']:.0f} ms")
    t.add_row("interactive TTFT p50 / p95, batch running", f"{result['ttft_ms_during_batch']['p50']:.0f} / "
              f"{result['ttft_ms_during_batch']['p95']:.0f} ms")
    t.add_row("[bold]TTFT p50 added by a running batch[/bold]", f"[bold]{result['ttft_p50_added_ms']:+.0f} ms[/bold]")
    nh = result["ttft_ms_during_batch_no_hold_down"]
    t.add_row("baseline: batch.yield_s 0, TTFT p50 / p95 quiet / batch running",
              f"{nh['quiet_p50']:.0f} / {pct(quiet0, 0.95):.0f} ms; {nh['p50']:.0f} / {nh['p95']:.0f} ms")
    Console().print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'batch.json'}")


if __name__ == "__main__":
    main()
