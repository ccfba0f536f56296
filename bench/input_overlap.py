"""What ``input_overlap`` wins when the model does not share the CPU with the guards (a model on its own GPU):
the same guarded chat requests, through Keel's API in process, to a backend that waits ``--model-ttft-ms`` for its
first token without using the CPU (as a remote or GPU-served model does), under the default policy's input
entries made blocking, without and with ``input_overlap``, alternating request by request.

    .venv/bin/python bench/input_overlap.py [--requests 40] [--model-ttft-ms 150] [--concurrency 1 8]

On a machine where the guards and the model server share a few cores (``bench/serving.py --overlap``, vLLM on
CPU), both are CPU-bound and overlapping them wins little; here the model's wait is idle time, so the gain is up
to the input guard's own time. Prints a table and writes bench/results/input_overlap.json.
"""

from __future__ import annotations

import argparse
import asyncio
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
import yaml  # noqa: E402

from app.api.main import create_app  # noqa: E402
from app.container import Container  # noqa: E402
from app.core.types import Finished, TextDelta, Usage  # noqa: E402
from app.settings import load_settings  # noqa: E402
from bench.serving import overlap_policies  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How do bees make honey?", "Why is the sky blue?",
             "Give three tips for learning a new language.", "Describe the water cycle step by step."]


class IdleModel:
    """A backend whose first token comes ``ttft_s`` after the request, then 16 tokens 5 ms apart; it waits,
    it does not compute."""

    name = "idle"

    def __init__(self, ttft_s: float) -> None:
        self.ttft_s = ttft_s

    async def stream(self, request):
        await asyncio.sleep(self.ttft_s)
        for i in range(16):
            yield TextDelta("Bees" if i == 0 else " word")
            await asyncio.sleep(0.005)
        yield Finished("stop")
        yield Usage(prompt_tokens=10, completion_tokens=16)

    async def models(self) -> list[str]:
        return ["idle"]

    async def ready(self) -> bool:
        return True

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def ttft(client: httpx.AsyncClient, model: str, question: str) -> float:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": question}], "max_tokens": 16}
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
                return (time.perf_counter() - t0) * 1000
    raise RuntimeError("no text came back")


async def main(requests: int, model_ttft_ms: float, concurrency: int = 1) -> dict:
    home = Path(tempfile.mkdtemp(prefix="keel-bench-overlap-"))
    policy = overlap_policies()
    policy["bindings"] = [{"model": "blocking", "policy": "default_blocking"},
                          {"model": "overlap", "policy": "default_overlap"}]
    (home / "policy.yaml").write_text(yaml.safe_dump(policy))
    settings = load_settings(home=home, guardrails={"policy_path": str(home / "policy.yaml")},
                             backends={"local": {"kind": "openai", "base_url": "http://unused/v1", "retries": 0}},
                             models={"blocking": {"backend": "local", "model": "idle"},
                                     "overlap": {"backend": "local", "model": "idle"}}, default_model="blocking")
    container = await Container.build(settings, backends={"local": IdleModel(model_ttft_ms / 1000)})
    _, key = container.keys.create("bench", ["chat"])
    times: dict[str, list[float]] = {"blocking": [], "overlap": []}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(container=container)),
                                 base_url="http://keel", headers={"Authorization": f"Bearer {key}"},
                                 timeout=60) as client:
        for name in times:  # warm-up, not measured
            await ttft(client, name, QUESTIONS[0])
        for i in range(requests // concurrency):
            order = ("blocking", "overlap") if i % 2 == 0 else ("overlap", "blocking")
            for name in order:  # a round: ``concurrency`` requests at once, all under one policy
                times[name] += await asyncio.gather(*(ttft(client, name, QUESTIONS[(i + j) % len(QUESTIONS)])
                                                      for j in range(concurrency)))
    await container.aclose()
    out = {name: {"ttft_p50_ms": statistics.median(v), "ttft_mean_ms": statistics.fmean(v), "requests": len(v)}
           for name, v in times.items()}
    out["saved_p50_ms"] = out["blocking"]["ttft_p50_ms"] - out["overlap"]["ttft_p50_ms"]
    out["paired_saved_median_ms"] = statistics.median(b - o for b, o in zip(times["blocking"], times["overlap"],
                                                                             strict=True))
    return out


def run() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=40, help="requests per policy (alternating)")
    ap.add_argument("--model-ttft-ms", type=float, default=150.0, help="the idle model's time to first token")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    results = {c: asyncio.run(main(args.requests, args.model_ttft_ms, c)) for c in args.concurrency}
    print(f"{'conc':>4} {'policy':<10} {'TTFT p50 ms':>12} {'mean ms':>9}  (the model's own TTFT: "
          f"{args.model_ttft_ms:g} ms)")
    for c, result in results.items():
        for name in ("blocking", "overlap"):
            r = result[name]
            print(f"{c:>4} {name:<10} {r['ttft_p50_ms']:>12.1f} {r['ttft_mean_ms']:>9.1f}")
        print(f"{c:>4} overlap saves {result['saved_p50_ms']:.1f} ms at p50 "
              f"(paired median {result['paired_saved_median_ms']:.1f} ms)")
    out = ROOT / "bench" / "results" / "input_overlap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(), "args": vars(args),
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    run()
