"""The eval runner against the backend's own throughput: the same N prompts, with the same
concurrency, sent straight to vLLM and run as an eval suite through Keel's runner (in-process
ChatService, scoring, SQLite store), alternating round by round in one run, then a re-run that the
response cache answers.

    .venv/bin/python bench/evals.py                                  # starts a managed vLLM itself
    .venv/bin/python bench/evals.py --vllm-url http://127.0.0.1:8001 # use a running vLLM server
    .venv/bin/python bench/evals.py --cases 4 --rounds 1             # a quick check

The target is >= 90%: the runner must keep the backend busy. Prints a table and writes JSON under
bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = "You are a helpful assistant. Answer in two sentences."
TOPICS = ["a lighthouse", "the water cycle", "honey bees", "a compiler", "photosynthesis", "a bicycle gear",
          "the tides", "a rainbow", "a vaccine", "a volcano", "a hash table", "the moon's phases",
          "an espresso machine", "a suspension bridge", "a thunderstorm", "a refrigerator"]
ASPECTS = ["how it works", "why it matters", "a common misconception about", "the history of"]


def prompts(n: int, round_no: int) -> list[str]:
    """n distinct prompts; each round its own set, so vLLM's prefix cache favours neither side."""
    out = []
    for i in range(n):
        k = round_no * n + i
        out.append(f"Explain {ASPECTS[(k // len(TOPICS)) % len(ASPECTS)]} {TOPICS[k % len(TOPICS)]} (#{k}).")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def suite_for(texts: list[str], name: str, max_tokens: int, concurrency: int) -> Any:
    from evals.suite import parse_suite

    return parse_suite({
        "name": name,
        "target": {"model": "smollm2", "system": SYSTEM, "params": {"temperature": 0.0, "max_tokens": max_tokens}},
        "dataset": {"cases": [{"id": f"c{i}", "input": t} for i, t in enumerate(texts)]},
        # Cheap metrics: this measures the runner's plumbing, not a judge.
        "metrics": [{"name": "latency_ms", "threshold": 600000}, {"name": "completion_tokens",
                                                                  "threshold": max_tokens}],
        "gate": {"min_pass_rate": 0.0},
        "concurrency": concurrency,
    })


async def direct(vllm_url: str, model: str, texts: list[str], max_tokens: int, concurrency: int) -> dict[str, float]:
    """The same chat requests straight to vLLM (non-streaming), at most ``concurrency`` in flight."""
    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        async def one(text: str) -> None:
            nonlocal tokens
            body = {"model": model, "temperature": 0.0, "max_tokens": max_tokens,
                    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]}
            async with sem:
                r = await client.post(f"{vllm_url}/v1/chat/completions", json=body)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - t0
    return {"cases": len(texts), "wall_s": wall, "cases_per_s": len(texts) / wall, "completion_tokens": tokens}


async def through_runner(container: Any, store: Any, suite: Any, *, use_cache: bool) -> dict[str, Any]:
    from evals.metrics import MetricEnv
    from evals.runner import EvalRunner
    from ingest.embedding import HashingEmbedder

    runner = EvalRunner(container.eval_deps(), store, env=MetricEnv(embedder=HashingEmbedder()), use_cache=use_cache,
                        progress=False)
    t0 = time.perf_counter()
    out = await runner.run(suite, fresh=True)
    wall = time.perf_counter() - t0
    rows = store.results(out.run.id)
    errors = [r.error for r in rows if r.error]
    if errors:
        raise SystemExit(f"the runner's cases failed: {errors[:3]}")
    return {"cases": len(rows), "wall_s": wall, "cases_per_s": len(rows) / wall, "executed": out.executed,
            "cache_hits": out.cached, "completion_tokens": sum(r.record.get("completion_tokens", 0) for r in rows)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from app.container import Container
    from app.settings import load_settings
    from evals.store import EvalStore
    from ingest import build_rag
    from ingest.embedding import HashingEmbedder

    home = Path(tempfile.mkdtemp(prefix="keel-bench-evals-"))
    if args.vllm_url:
        backend: dict[str, Any] = {"kind": "vllm", "base_url": f"{args.vllm_url}/v1", "read_timeout_s": 600}
        vllm_url = args.vllm_url
    else:
        port = free_port()
        backend = {"kind": "vllm", "read_timeout_s": 600, "managed": {
            "python": str(ROOT / ".venv-vllm/bin/python"), "port": port,
            "model_path": str(ROOT / ".keel/models/smollm2"), "enforce_eager": args.enforce_eager}}
        vllm_url = f"http://127.0.0.1:{port}"
    settings = load_settings(
        home=home, backends={"local": backend}, default_model="smollm2",
        models={"smollm2": {"backend": "local", "model": args.vllm_model}},
        guardrails={"enabled": args.guards}, evals={"gate_enabled": False},
    )
    # The runner's work does not involve retrieval: a hashing embedder keeps MiniLM out of the measurement.
    container = await Container.build(settings, rag=build_rag(settings, embedder=HashingEmbedder()))
    store = EvalStore(settings.evals.db_path(home))
    try:
        deadline = time.monotonic() + 900
        while not all(i["ready"] for i in (await container.llm.readiness()).values()):
            if time.monotonic() > deadline:
                raise SystemExit("vLLM not ready in 900 s")
            await asyncio.sleep(2)
        # Warm-up (not measured): both paths once.
        warm = prompts(2, 999)
        await direct(vllm_url, args.vllm_model, warm, 8, 2)
        await through_runner(container, store, suite_for(warm, "warm", 8, 2), use_cache=False)

        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            texts = prompts(args.cases, i)
            suite = suite_for(texts, f"bench-{i}", args.max_tokens, args.concurrency)
            res: dict[str, Any] = {}
            # Alternate who goes first so slow drifts in machine load do not favour one side.
            for side in (("direct", "runner") if i % 2 == 0 else ("runner", "direct")):
                if side == "direct":
                    res[side] = await direct(vllm_url, args.vllm_model, texts, args.max_tokens, args.concurrency)
                else:
                    res[side] = await through_runner(container, store, suite, use_cache=False)
            res["ratio"] = res["runner"]["cases_per_s"] / res["direct"]["cases_per_s"]
            rounds.append(res)
            print(f"round {i}: direct {res['direct']['cases_per_s']:.3f} cases/s, runner "
                  f"{res['runner']['cases_per_s']:.3f} cases/s ({res['ratio']:.1%})", flush=True)

        # The cache: a first cached run asks the model, the re-run answers every case from the store.
        texts = prompts(args.cases, args.rounds)
        suite = suite_for(texts, "bench-cache", args.max_tokens, args.concurrency)
        first = await through_runner(container, store, suite, use_cache=True)
        rerun = await through_runner(container, store, suite, use_cache=True)
    finally:
        store.close()
        await container.aclose()
    d = sum(r["direct"]["cases"] for r in rounds) / sum(r["direct"]["wall_s"] for r in rounds)
    k = sum(r["runner"]["cases"] for r in rounds) / sum(r["runner"]["wall_s"] for r in rounds)
    return {
        "direct_cases_per_s": d, "runner_cases_per_s": k, "ratio": k / d,
        "paired_ratio_median": statistics.median(r["ratio"] for r in rounds),
        "rounds": rounds,
        "cache": {"first_run": first, "rerun": rerun, "rerun_speedup": rerun["cases_per_s"] / first["cases_per_s"]},
    }


def print_table(res: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval runner vs direct vLLM ({args.cases} cases x {args.rounds} rounds, concurrency "
                        f"{args.concurrency}, max_tokens {args.max_tokens})")
    for col in ("", "cases/s", "note"):
        table.add_column(col, justify="right")
    table.add_row("direct vLLM", f"{res['direct_cases_per_s']:.3f}", "")
    table.add_row("eval runner", f"{res['runner_cases_per_s']:.3f}", "cache off")
    ok = "[green]meets[/green]" if res["ratio"] >= 0.9 else "[red]below[/red]"
    table.add_row("[bold]runner/direct[/bold]", f"[bold]{res['ratio']:.1%}[/bold]",
                  f"{ok} the 90% target; paired median {res['paired_ratio_median']:.1%}")
    c = res["cache"]
    table.add_row("runner, first cached run", f"{c['first_run']['cases_per_s']:.3f}",
                  f"{c['first_run']['executed']} asked, {c['first_run']['cache_hits']} hits")
    table.add_row("runner, re-run", f"{c['rerun']['cases_per_s']:.3f}",
                  f"{c['rerun']['executed']} asked, {c['rerun']['cache_hits']} hits (x{c['rerun_speedup']:.0f})")
    Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-url", help="a running vLLM server (without /v1); default: start a managed one")
    p.add_argument("--vllm-model", default="smollm2", help="served model name on vLLM")
    p.add_argument("--cases", type=int, default=16, help="prompts per round")
    p.add_argument("--rounds", type=int, default=4, help="rounds per side (alternating)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--guards", action="store_true", help="run the runner's requests through the default guards")
    p.add_argument("--enforce-eager", action="store_true", help="when starting vLLM: skip torch.compile")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAGAS_DO_NOT_TRACK": "true"}.items():
        os.environ.setdefault(k, v)
    if not args.vllm_url:
        print("starting a managed vLLM server (compile step: 1-3 min)...", flush=True)
    res = asyncio.run(main_async(args))
    print_table(res, args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"evals-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({
        "benchmark": "evals", "created": datetime.now(UTC).isoformat(), "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"cases": args.cases, "rounds": args.rounds, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "guards": args.guards, "enforce_eager": args.enforce_eager,
                     "vllm_url": args.vllm_url},
        "results": res,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
