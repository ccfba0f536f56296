"""Guardrail overhead benchmark.

Measures, on benign requests (the common case), in one run:
  * latency of each validator (its guardrails-ai Guard call), p50/p95;
  * the whole default input policy (check_input, validators concurrent) vs the same requests with guards off;
  * the whole default output policy on benign answers (check_output);
  * the added time to first token of the streaming output guard on a simulated 30 tokens/s stream;
  * detection / false-positive rates of keel/prompt_injection on the shipped sets.
Prints a table and writes bench/results/guardrails-<UTC timestamp>.json.

    .venv/bin/python bench/guardrails.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this file is named like the guardrails-ai package: drop bench/ from the path so `import guardrails` finds it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from app.core.types import ChatMessage, Finished, TextDelta  # noqa: E402
from app.guardrails.offline import configure_offline  # noqa: E402
from app.guardrails.settings import GuardrailSettings  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "How do I reverse a list in Python?",
    "Can you summarize the plot of Pride and Prejudice in a few sentences?",
    "What's the difference between TCP and UDP, and when should I use each?",
    "How do I prevent prompt injection attacks in my LLM application?",
    "What is the recommended dose of ibuprofen for adults?",
    "My manager John Smith asked me to write a status report. Can you help me structure it?",
    "Convert 1234.56 dollars to euros at a rate of 0.92.",
    "Explain how SQL injection works and how parameterized queries stop it.",
    "Give me three ideas for a birthday party for a 10-year-old.",
]
ANSWERS = [
    "Paris is the capital of France. It is also the country's largest city.",
    "Use reversed(my_list) for an iterator, or my_list[::-1] for a new list. my_list.reverse() reverses in place.",
    "Elizabeth Bennet meets the proud Mr. Darcy. After misunderstandings and a rejected proposal, they marry.",
    "TCP is reliable and ordered; UDP is connectionless and faster. Use TCP for web pages, UDP for live video.",
]
SYSTEM = "You are Keel, a concise and helpful assistant. Answer accurately and say when you do not know."


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summary(xs: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(xs, 50), 3), "p95_ms": round(pct(xs, 95), 3), "mean_ms": round(statistics.mean(xs), 3),
            "n": len(xs)}


async def simulated_stream(text: str, tps: float):
    words = text.split(" ")
    for i, w in enumerate(words):
        await asyncio.sleep(1 / tps)
        yield TextDelta(w + (" " if i < len(words) - 1 else ""))
    yield Finished("stop")


async def main(rounds: int) -> dict:
    configure_offline(ROOT / ".keel" / "cache")
    from app.guardrails.engine import GuardrailEngine
    from app.guardrails.types import GuardContext

    t0 = time.perf_counter()
    engine = GuardrailEngine(GuardrailSettings(audit_db=":memory:", policy_path=ROOT / "infra/guardrails/default.yaml"))
    await asyncio.to_thread(engine.warm_up)
    warm_s = time.perf_counter() - t0
    off = GuardrailEngine(GuardrailSettings(enabled=False, audit_db=":memory:"))

    def requests(i: int):
        return [ChatMessage("system", SYSTEM), ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]

    # warm the caches' cold paths once (first-call costs are start-up, not per request)
    for i in range(len(QUESTIONS)):
        await engine.check_input(requests(i), GuardContext(f"warm-{i}", user="u"))

    # -- per validator (direct Guard calls, sequential, fresh text each round to defeat the embedding cache) --
    per_validator: dict[str, list[float]] = {}
    for stage, texts in (("input", QUESTIONS), ("output", ANSWERS)):
        for comp in engine.compiled("default", stage):
            xs = per_validator.setdefault(f"{stage}:{comp.spec.label}", [])
            for r in range(rounds):
                text = texts[r % len(texts)] + f" (ref {r})"
                meta = engine._meta(GuardContext(system_prompt=SYSTEM), None, __import__(
                    "app.guardrails.validators.pii", fromlist=["PiiVault"]).PiiVault())
                run = engine._run_sync(comp, [text], meta, None)
                xs.append(run.result.latency_ms)

    # -- whole input policy vs off, same requests (unique suffix: no embedding-cache hits) --
    guarded, unguarded, cached = [], [], []
    for r in range(rounds):
        msgs = requests(r)
        msgs[-1] = ChatMessage("user", msgs[-1].content + f" Thanks ({r}).")
        t = time.perf_counter()
        await off.check_input(msgs, GuardContext(f"off-{r}"))
        unguarded.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await engine.check_input(msgs, GuardContext(f"in-{r}", user="u"))
        guarded.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        await engine.check_input(msgs, GuardContext(f"in-cached-{r}", user="u"))  # repeated text: cache hit
        cached.append((time.perf_counter() - t) * 1000)

    out_lat = []
    for r in range(rounds):
        t = time.perf_counter()
        await engine.check_output(ANSWERS[r % len(ANSWERS)] + f" Ref {r}.",
                                  GuardContext(f"out-{r}", system_prompt=SYSTEM))
        out_lat.append((time.perf_counter() - t) * 1000)

    # -- streaming: added time to first token at 30 tokens/s --
    tps = 30.0
    ttft_plain, ttft_guarded, total_plain, total_guarded = [], [], [], []
    for r in range(max(5, rounds // 3)):
        text = ANSWERS[r % len(ANSWERS)]
        t = time.perf_counter()
        first = None
        async for ev in simulated_stream(text, tps):
            if first is None and isinstance(ev, TextDelta):
                first = time.perf_counter() - t
        total_plain.append((time.perf_counter() - t) * 1000)
        ttft_plain.append(first * 1000)
        g = engine.output_guard(GuardContext(f"stream-{r}", system_prompt=SYSTEM))
        t = time.perf_counter()
        first = None
        async for ev in g.wrap(simulated_stream(text, tps)):
            if first is None and isinstance(ev, TextDelta):
                first = time.perf_counter() - t
        total_guarded.append((time.perf_counter() - t) * 1000)
        ttft_guarded.append(first * 1000)

    from tests.unit.test_guardrails_eval import rates

    det = {k: {"detection_rate": round(v[0], 4), "false_positive_rate": round(v[1], 4), "attacks": v[2],
               "benign": v[3]} for k, v in rates().items()}
    await engine.aclose()
    added = [g - p for g, p in zip(ttft_guarded, ttft_plain, strict=True)]
    return {
        "benchmark": "guardrails",
        "when": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "policy": engine.policy.version_tag,
        "warm_up_s": round(warm_s, 2),
        "rounds": rounds,
        "per_validator": {k: summary(v) for k, v in per_validator.items()},
        "input_policy": {"guarded": summary(guarded), "guards_off": summary(unguarded),
                         "guarded_repeat_text": summary(cached),
                         "added_p50_ms": round(pct(guarded, 50) - pct(unguarded, 50), 3)},
        "output_policy_non_streaming": summary(out_lat),
        "streaming": {"tokens_per_s": tps, "ttft_plain": summary(ttft_plain), "ttft_guarded": summary(ttft_guarded),
                      "added_ttft": summary(added), "total_plain": summary(total_plain),
                      "total_guarded": summary(total_guarded)},
        "prompt_injection": det,
    }


def table(res: dict) -> str:
    lines = [f"Guardrails benchmark  policy={res['policy']}  warm-up {res['warm_up_s']} s  rounds={res['rounds']}", "",
             f"{'what':44} {'p50 ms':>9} {'p95 ms':>9}"]
    for k, v in res["per_validator"].items():
        lines.append(f"{'validator ' + k:44} {v['p50_ms']:9.2f} {v['p95_ms']:9.2f}")
    ip = res["input_policy"]
    lines += [f"{'input policy, guards off':44} {ip['guards_off']['p50_ms']:9.2f} {ip['guards_off']['p95_ms']:9.2f}",
              f"{'input policy, guarded (new text)':44} {ip['guarded']['p50_ms']:9.2f} {ip['guarded']['p95_ms']:9.2f}",
              f"{'input policy, guarded (repeated text)':44} {ip['guarded_repeat_text']['p50_ms']:9.2f} "
              f"{ip['guarded_repeat_text']['p95_ms']:9.2f}",
              f"{'output policy (whole answer)':44} {res['output_policy_non_streaming']['p50_ms']:9.2f} "
              f"{res['output_policy_non_streaming']['p95_ms']:9.2f}"]
    s = res["streaming"]
    lines += [f"{'stream TTFT plain @30 tok/s':44} {s['ttft_plain']['p50_ms']:9.2f} {s['ttft_plain']['p95_ms']:9.2f}",
              f"{'stream TTFT guarded':44} {s['ttft_guarded']['p50_ms']:9.2f} {s['ttft_guarded']['p95_ms']:9.2f}",
              f"{'stream added TTFT':44} {s['added_ttft']['p50_ms']:9.2f} {s['added_ttft']['p95_ms']:9.2f}",
              f"{'stream total plain / guarded (p50)':44} {s['total_plain']['p50_ms']:9.2f} "
              f"{s['total_guarded']['p50_ms']:9.2f}", ""]
    for split, v in res["prompt_injection"].items():
        lines.append(f"prompt_injection [{split:7}] detection {v['detection_rate']:.0%} of {v['attacks']}, "
                     f"false positives {v['false_positive_rate']:.0%} of {v['benign']}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    result = asyncio.run(main(args.rounds))
    print(table(result))
    out = ROOT / "bench" / "results" / f"guardrails-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")
