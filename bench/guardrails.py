"""Guardrail overhead benchmark.

Measures, on benign requests (the common case), in one run:
  * per request: the default input policy + output policy (check_input, then check_output on an answer) vs
    the same requests through an engine with guards off, interleaved; p50/p95 wall time, the added p50/p95,
    and the process CPU time per request (steadier than wall time on a shared machine);
  * latency of each validator: its guardrails-ai Guard call and the check's own share of it, p50/p95;
  * the input policy alone (new text and repeated text) and the output policy alone;
  * the added time to first token of the streaming output guard on a simulated 30 tokens/s stream;
  * detection / false-positive rates of keel/prompt_injection on the shipped sets, with and without the
    classifier (app/guardrails/injection_eval.py; ``heldout`` is the never-trained-on set), and of every
    other shipped validator on its labelled set (app/guardrails/validator_eval.py).
Every text carries a unique suffix so the embedding cache never answers; the target is <= 10 ms added p50.
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
    engine = GuardrailEngine(GuardrailSettings(audit_db=":memory:", policy_path=ROOT / "infra/guardrails/default.yaml"),
                             home=ROOT / ".keel")
    await asyncio.to_thread(engine.warm_up)
    warm_s = time.perf_counter() - t0
    off = GuardrailEngine(GuardrailSettings(enabled=False, audit_db=":memory:"))

    def requests(i: int):
        return [ChatMessage("system", SYSTEM), ChatMessage("user", QUESTIONS[i % len(QUESTIONS)])]

    # warm the caches' cold paths once (first-call costs are start-up, not per request)
    for i in range(len(QUESTIONS)):
        await engine.check_input(requests(i), GuardContext(f"warm-{i}", user="u"))

    # -- per validator (direct Guard calls, sequential, fresh text each round to defeat the embedding cache):
    #    "guard" = the whole guardrails-ai Guard call, "check" = the validator's own work inside it --
    from app.guardrails.validators.pii import PiiVault

    per_validator: dict[str, list[float]] = {}
    for stage, texts in (("input", QUESTIONS), ("output", ANSWERS)):
        for comp in engine.compiled("default", stage):
            guard_ms = per_validator.setdefault(f"{stage}:{comp.spec.label} guard", [])
            check_ms = per_validator.setdefault(f"{stage}:{comp.spec.label} check", [])
            for r in range(rounds):
                text = texts[r % len(texts)] + f" (ref {r})"
                meta = engine._meta(GuardContext(system_prompt=SYSTEM), None, PiiVault())
                t = time.perf_counter()
                run = engine._run_sync(comp, [text], meta, None)
                guard_ms.append((time.perf_counter() - t) * 1000)
                check_ms.append(run.result.latency_ms)

    # -- per request: input + output policy vs guards off, interleaved (unique suffix: no cache hits) --
    req_on, req_off, req_cpu_on, req_cpu_off = [], [], [], []
    for r in range(rounds):
        msgs = requests(r)
        msgs[-1] = ChatMessage("user", msgs[-1].content + f" Please (req {r}).")
        answer = ANSWERS[r % len(ANSWERS)] + f" Request {r}."
        for eng, wall, cpu, tag in ((off, req_off, req_cpu_off, "off"), (engine, req_on, req_cpu_on, "on")):
            t, c = time.perf_counter(), time.process_time()
            d = await eng.check_input(msgs, GuardContext(f"req-{tag}-{r}", user="u"))
            await eng.check_output(answer, GuardContext(f"req-{tag}-{r}", user="u"), d)
            wall.append((time.perf_counter() - t) * 1000)
            cpu.append((time.process_time() - c) * 1000)
    added = [a - b for a, b in zip(req_on, req_off, strict=True)]

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

    from app.guardrails.injection_eval import injection_rates

    index, clf = engine._resources.get("attack_index"), engine._resources.get("injection_classifier")
    det = {}
    for label, c in (("", clf), ("no_classifier:", None)):
        for k, v in injection_rates(index, c).items():
            det[label + k] = {"detection_rate": round(v.detection_rate, 4),
                              "false_positive_rate": round(v.false_positive_rate, 4), "attacks": v.attacks,
                              "benign": v.benign}
    from app.guardrails.validator_eval import validator_rates

    others = {name: {"policy": f"{r.labelled.policy}/{r.labelled.stage}",
                     "detection_rate": round(r.rates.detection_rate, 4),
                     "false_positive_rate": round(r.rates.false_positive_rate, 4), "positives": r.rates.attacks,
                     "benign": r.rates.benign} for name, r in validator_rates(engine).items()}
    await engine.aclose()
    added_ttft = [g - p for g, p in zip(ttft_guarded, ttft_plain, strict=True)]
    return {
        "benchmark": "guardrails",
        "when": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
        "policy": engine.policy.version_tag,
        "warm_up_s": round(warm_s, 2),
        "rounds": rounds,
        "request": {"guarded": summary(req_on), "guards_off": summary(req_off), "added": summary(added),
                    "added_p50_ms": round(pct(req_on, 50) - pct(req_off, 50), 3),
                    "cpu_guarded": summary(req_cpu_on), "cpu_guards_off": summary(req_cpu_off),
                    "target_added_p50_ms": 10.0},
        "per_validator": {k: summary(v) for k, v in per_validator.items()},
        "input_policy": {"guarded": summary(guarded), "guards_off": summary(unguarded),
                         "guarded_repeat_text": summary(cached),
                         "added_p50_ms": round(pct(guarded, 50) - pct(unguarded, 50), 3)},
        "output_policy_non_streaming": summary(out_lat),
        "streaming": {"tokens_per_s": tps, "ttft_plain": summary(ttft_plain), "ttft_guarded": summary(ttft_guarded),
                      "added_ttft": summary(added_ttft), "total_plain": summary(total_plain),
                      "total_guarded": summary(total_guarded)},
        "prompt_injection": det,
        "validators": others,
    }


def table(res: dict) -> str:
    lines = [f"Guardrails benchmark  policy={res['policy']}  warm-up {res['warm_up_s']} s  rounds={res['rounds']}", "",
             f"{'what':44} {'p50 ms':>9} {'p95 ms':>9}"]
    rq = res["request"]
    lines += [f"{'request (input+output), guards off':44} {rq['guards_off']['p50_ms']:9.2f} "
              f"{rq['guards_off']['p95_ms']:9.2f}",
              f"{'request (input+output), default policy':44} {rq['guarded']['p50_ms']:9.2f} "
              f"{rq['guarded']['p95_ms']:9.2f}",
              f"{'request: added by the guards':44} {rq['added']['p50_ms']:9.2f} {rq['added']['p95_ms']:9.2f}"
              f"   (target <= {rq['target_added_p50_ms']:.0f} ms p50)",
              f"{'request: process CPU, guarded':44} {rq['cpu_guarded']['p50_ms']:9.2f} "
              f"{rq['cpu_guarded']['p95_ms']:9.2f}", ""]
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
        lines.append(f"prompt_injection [{split:22}] detection {v['detection_rate']:6.1%} of {v['attacks']:3}, "
                     f"false positives {v['false_positive_rate']:5.1%} of {v['benign']:3}")
    lines.append("")
    for name, v in res["validators"].items():
        lines.append(f"{name:28} [{v['policy']:14}] detection {v['detection_rate']:6.1%} of {v['positives']:3}, "
                     f"false positives {v['false_positive_rate']:5.1%} of {v['benign']:3}")
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
