"""Keel's serving overhead: the same concurrent streaming requests sent directly to vLLM and
through Keel, alternating round by round in one run, so both see the same machine state.

    .venv/bin/python bench/serving.py                       # starts Keel + vLLM itself
    .venv/bin/python bench/serving.py --keel-url http://127.0.0.1:8000 --vllm-url http://127.0.0.1:8001 \
        --key "$(cat .keel/dev-api-key)"                    # measure running servers

Prints a table (TTFT p50/p95, inter-token latency, tokens/s, Keel/direct ratios) and writes JSON
under bench/results/. The ``+tool`` rows send the same prompts with a function and a named tool_choice (guided
decoding of the call's arguments): the function-calling path through Keel against straight to vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Explain how a lighthouse works.",
    "Write a short story about a cat who learns to fly.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle step by step.",
    "Give three tips for learning a new language.",
    "Why is the sky blue?",
    "Describe a busy market in the morning.",
    "How do bees make honey?",
]


@dataclass
class Sample:
    ttft_s: float
    itl_s: list[float]
    tokens: int
    total_s: float
    retracted: bool = False  # a guardrail withdrew text the client had shown


@dataclass
class Round:
    target: str
    concurrency: int
    wall_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)


#: The +tool rows' function: the model writes its arguments under guided decoding (a named tool_choice).
TOOL = {"type": "function", "function": {"name": "answer", "description": "Answer the question.", "parameters": {
    "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
    "additionalProperties": False}}}


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, model: str, prompt: str,
                      max_tokens: int, tools: bool = False) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if tools:
        body |= {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "answer"}}}
    start = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    retracted = False
    async with client.stream("POST", url, json=body, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if (chunk.get("guardrail") or {}).get("type") == "retraction":
                retracted = retracted or (chunk["guardrail"].get("retracted_chars") or 0) > 0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") or any((c.get("function") or {}).get("arguments")
                                           for c in delta.get("tool_calls") or ()):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter()
    return Sample(ttft_s=(first or end) - start, itl_s=gaps, tokens=tokens, total_s=end - start,
                  retracted=retracted)


async def run_round(target: str, url: str, headers: dict, model: str, concurrency: int,
                    max_tokens: int, offset: int, tools: bool = False) -> Round:
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        samples = await asyncio.gather(*(
            one_request(client, url, headers, model, PROMPTS[(offset + i) % len(PROMPTS)], max_tokens, tools)
            for i in range(concurrency)
        ))
        return Round(target, concurrency, time.perf_counter() - start, list(samples))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(rounds: list[Round]) -> dict[str, float]:
    samples = [s for r in rounds for s in r.samples]
    ttft = [s.ttft_s for s in samples]
    itl = [g for s in samples for g in s.itl_s]
    return {
        "requests": len(samples),
        "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p95_ms": pct(ttft, 0.95) * 1000,
        "itl_p50_ms": pct(itl, 0.5) * 1000, "itl_p95_ms": pct(itl, 0.95) * 1000,
        "tokens_per_s": sum(r.tokens for r in rounds) / sum(r.wall_s for r in rounds),
        "tokens": sum(r.tokens for r in rounds),
        "retractions": sum(s.retracted for s in samples),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overlap_policies() -> dict:
    """The default policy file plus ``default_blocking`` (its input entries blocking instead of redacting:
    ``input_overlap`` needs an input stage that never changes the input) and ``default_overlap`` (that, with it)."""
    policy = yaml.safe_load((ROOT / "infra/guardrails/default.yaml").read_text())
    policy["policies"]["default_blocking"] = {"extends": "default", "input": [
        {**e, "on_fail": "block"} if e.get("on_fail") == "redact" else e
        for e in policy["policies"]["default"]["input"]]}
    policy["policies"]["default_overlap"] = {"extends": "default_blocking", "input_overlap": True}
    return policy


def start_keel(enforce_eager: bool, extra: dict | None = None) -> tuple[subprocess.Popen, str, str, str, str]:
    """Start Keel with its managed vLLM in a scratch home; returns (proc, keel_url, vllm_url, key, vllm_key): the
    managed vLLM answers only requests with its key. ``extra``: more settings sections (another benchmark's)."""
    sys.path.insert(0, str(ROOT))
    from app.security.keys import KeyStore

    home = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    api_port, vllm_port = free_port(), free_port()
    vllm_key = secrets.token_urlsafe(24)
    cfg = {
        "home": str(home), "server": {"port": api_port},
        "auth": {"default_rate_limit_per_minute": 1_000_000},
        "backends": {"local": {"kind": "vllm", "api_key": vllm_key, "managed": {
            "python": str(ROOT / ".venv-vllm/bin/python"), "port": vllm_port,
            "model_path": str(ROOT / ".keel/models/smollm2"), "enforce_eager": enforce_eager}}},
    }
    # More aliases on the same model: one bound to the 'unguarded' policy (the serving overhead alone), one
    # to the default policy released window by window (how Keel streamed before progressive release), next
    # to the default policy's cost, in the same run.
    # Two more on the default policy with its input entries blocking instead of redacting (input_overlap needs
    # an input stage that never changes the input): without and with the model starting during the input check.
    cfg["models"] = {name: {"backend": "local", "model": "smollm2"}
                     for name in ("smollm2-raw", "smollm2-windows", "smollm2-blocking", "smollm2-overlap")}
    policy = overlap_policies()
    policy["policies"]["default_windows"] = {"extends": "default", "streaming": "windows"}
    policy["bindings"] = [{"model": "smollm2-raw", "policy": "unguarded"},
                          {"model": "smollm2-windows", "policy": "default_windows"},
                          {"model": "smollm2-blocking", "policy": "default_blocking"},
                          {"model": "smollm2-overlap", "policy": "default_overlap"}, *policy.get("bindings", [])]
    (home / "policy.yaml").write_text(yaml.safe_dump(policy))
    cfg["guardrails"] = {"policy_path": str(home / "policy.yaml")}
    cfg.update(extra or {})
    (home / "keel.yaml").write_text(yaml.safe_dump(cfg))
    store = KeyStore(home / "keel.db")
    _, key = store.create("bench", ["chat"])
    store.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}
    env.update(KEEL_CONFIG=str(home / "keel.yaml"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = (home / "keel.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{api_port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"keel exited; see {home / 'keel.log'}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return proc, url, f"http://127.0.0.1:{vllm_port}", key, vllm_key
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("keel not ready in 900 s")


async def guard_time(keel_url: str) -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of Keel's guard stages so far, per stage, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=30) as client:
        text = (await client.get(f"{keel_url}/metrics")).text
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "keel_guardrail_check_duration_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("policy") == "unguarded":
                continue
            stage = sample.labels.get("stage", "")
            if sample.name.endswith("_sum"):
                out.setdefault(stage, [0.0, 0.0])[0] += sample.value
            elif sample.name.endswith("_count"):
                out.setdefault(stage, [0.0, 0.0])[1] += sample.value
    return {k: (v[0], v[1]) for k, v in out.items()}


async def main_async(args: argparse.Namespace) -> dict:
    auth = {"Authorization": f"Bearer {args.key}"}
    targets = {
        "direct": (f"{args.vllm_url}/v1/chat/completions",
                   {"Authorization": f"Bearer {args.vllm_key}"} if args.vllm_key else {}, args.vllm_model),
        "keel": (f"{args.keel_url}/v1/chat/completions", auth, args.raw_model),
        "keel+guards": (f"{args.keel_url}/v1/chat/completions", auth, args.model),
    }
    if args.windows_model:
        targets["keel+guards:windows"] = (f"{args.keel_url}/v1/chat/completions", auth, args.windows_model)
    if args.overlap:
        targets["keel+guards:blocking"] = (f"{args.keel_url}/v1/chat/completions", auth, "smollm2-blocking")
        targets["keel+guards:overlap"] = (f"{args.keel_url}/v1/chat/completions", auth, "smollm2-overlap")
    if not args.no_tools:
        targets["direct+tool"] = targets["direct"]
        targets["keel+tool"] = targets["keel"]
    for name, (url, headers, model) in targets.items():  # warm-up, not measured
        await run_round(name, url, headers, model, 2, 16, 0, name.endswith("+tool"))
    results: dict[str, dict] = {}
    for concurrency in args.concurrency:
        rounds: dict[str, list[Round]] = {name: [] for name in targets}
        names = list(targets)
        before = await guard_time(args.keel_url)
        for i in range(args.rounds):
            order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
            for name in order:
                url, headers, model = targets[name]
                rounds[name].append(await run_round(name, url, headers, model, concurrency, args.max_tokens, i,
                                                    name.endswith("+tool")))
        summary = {name: summarize(rs) for name, rs in rounds.items()}
        after = await guard_time(args.keel_url)
        # the input guard's own time at this concurrency (what overlapping it with prefill could win back)
        n_in = after.get("input", (0, 0))[1] - before.get("input", (0, 0))[1]
        input_ms = (after.get("input", (0, 0))[0] - before.get("input", (0, 0))[0]) / n_in * 1000 if n_in else None
        result: dict = {**summary, "input_guard_mean_ms": input_ms,
                        "rounds": {k: [asdict(r) | {"tokens": r.tokens} for r in v] for k, v in rounds.items()}}
        for label, (name, base) in _RATIOS.items():
            if name not in summary or base not in summary:
                continue
            d, k = summary[base], summary[name]
            # Each round ran right next to a direct round: comparing pairs cancels most of the slow
            # drifts in machine load that pooled percentiles would mix in.
            pairs = [(summarize([a]), summarize([b])) for a, b in zip(rounds[base], rounds[name], strict=True)]
            result[f"ratio:{label}"] = {
                "throughput": k["tokens_per_s"] / d["tokens_per_s"],
                "ttft_p50_added_ms": k["ttft_p50_ms"] - d["ttft_p50_ms"],
                "ttft_p95_added_ms": k["ttft_p95_ms"] - d["ttft_p95_ms"],
                "itl_p50_ratio": k["itl_p50_ms"] / d["itl_p50_ms"],
                "paired_throughput_median": statistics.median(b["tokens_per_s"] / a["tokens_per_s"] for a, b in pairs),
                "paired_ttft_p50_added_ms_median": statistics.median(
                    b["ttft_p50_ms"] - a["ttft_p50_ms"] for a, b in pairs),
            }
        results[str(concurrency)] = result
    return results


async def embeddings_rows(args: argparse.Namespace) -> dict:
    """/v1/embeddings through Keel against the same model called in this process (sentence-transformers, off the
    event loop as Keel does), ``args.embed_concurrency`` requests of one text at a time, alternating rounds."""
    from ingest.embedding import SentenceTransformerEmbedder

    local = SentenceTransformerEmbedder()
    local.warm_up()
    sem = asyncio.Semaphore(args.embed_concurrency)
    texts = [f"{p} ({i})" for i in range(args.embed_requests // len(PROMPTS) + 1) for p in PROMPTS]
    texts = texts[:args.embed_requests]

    async def in_process(text: str) -> None:
        async with sem:
            await asyncio.to_thread(local.embed_documents, [text])

    async def keel(client: httpx.AsyncClient, text: str) -> None:
        async with sem:
            r = await client.post(f"{args.keel_url}/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": text},
                                  headers={"Authorization": f"Bearer {args.key}"})
            r.raise_for_status()

    rates: dict[str, list[float]] = {"in-process": [], "keel": []}
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=args.embed_concurrency * 2)) as c:
        await asyncio.gather(*(keel(c, t) for t in texts[:8]), *(in_process(t) for t in texts[:8]))  # warm-up
        for i in range(args.rounds):
            for name in (["in-process", "keel"] if i % 2 == 0 else ["keel", "in-process"]):
                start = time.perf_counter()
                await asyncio.gather(*((keel(c, t) if name == "keel" else in_process(t)) for t in texts))
                rates[name].append(len(texts) / (time.perf_counter() - start))
    out = {name: {"requests_per_s": statistics.median(r), "rounds": r} for name, r in rates.items()}
    out["ratio"] = out["keel"]["requests_per_s"] / out["in-process"]["requests_per_s"]
    out["concurrency"] = args.embed_concurrency
    return out


#: each measured path and the direct one it is compared with
_RATIOS = {"keel": ("keel", "direct"), "keel+guards": ("keel+guards", "direct"),
           "keel+guards:windows": ("keel+guards:windows", "direct"), "keel+tool": ("keel+tool", "direct+tool"),
           # issue 21's target: guarded against unguarded through Keel
           "guards-vs-keel": ("keel+guards", "keel"), "windows-vs-keel": ("keel+guards:windows", "keel"),
           # issue 21 item 3: the model starting while the input entries run, against waiting for them
           "overlap-vs-blocking": ("keel+guards:overlap", "keel+guards:blocking"),
           "blocking-vs-keel": ("keel+guards:blocking", "keel"), "overlap-vs-keel": ("keel+guards:overlap", "keel")}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Keel vs direct vLLM (streaming, same requests, rotating rounds)")
    for col in ("conc", "target", "reqs", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "tok/s",
                "retracted"):
        table.add_column(col, justify="right")
    for conc, res in results.items():
        if conc == "embeddings":
            continue
        for name in ("direct", "keel", "keel+guards", "keel+guards:windows", "keel+guards:blocking",
                     "keel+guards:overlap", "direct+tool", "keel+tool"):
            if name not in res:
                continue
            s = res[name]
            table.add_row(conc, name, str(s["requests"]), f"{s['ttft_p50_ms']:.1f}", f"{s['ttft_p95_ms']:.1f}",
                          f"{s['itl_p50_ms']:.1f}", f"{s['itl_p95_ms']:.1f}", f"{s['tokens_per_s']:.1f}",
                          str(s.get("retractions", 0)))
        for label, (name, base) in _RATIOS.items():
            if f"ratio:{label}" not in res:
                continue
            r = res[f"ratio:{label}"]
            table.add_row(conc, f"[bold]{name} / {base}[/bold]", "", f"{r['ttft_p50_added_ms']:+.1f}",
                          f"{r['ttft_p95_added_ms']:+.1f}", f"x{r['itl_p50_ratio']:.3f}", "",
                          f"[bold]{r['throughput'] * 100:.1f}%[/bold]")
            table.add_row(conc, "  paired median", "", f"{r['paired_ttft_p50_added_ms_median']:+.1f}", "", "",
                          "", f"{r['paired_throughput_median'] * 100:.1f}%")
    Console().print(table)
    for conc, res in results.items():
        if isinstance(res, dict) and res.get("input_guard_mean_ms") is not None:
            print(f"concurrency {conc}: the input guard took {res['input_guard_mean_ms']:.1f} ms per guarded request "
                  "(mean, Keel's keel_guardrail_check_duration_seconds)")
    e = results.get("embeddings")
    if e:
        table = Table(title=f"/v1/embeddings vs the model in process (one text per request, concurrency "
                            f"{e['concurrency']})")
        for col in ("target", "requests/s (median of rounds)"):
            table.add_column(col, justify="right")
        table.add_row("in-process", f"{e['in-process']['requests_per_s']:.1f}")
        table.add_row("keel", f"{e['keel']['requests_per_s']:.1f}")
        table.add_row("[bold]keel/in-process[/bold]", f"[bold]{e['ratio'] * 100:.1f}%[/bold]")
        Console().print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keel-url")
    p.add_argument("--vllm-url")
    p.add_argument("--key", default=os.environ.get("KEEL_API_KEY"))
    p.add_argument("--vllm-key", default=os.environ.get("KEEL_VLLM_API_KEY"), help="the vLLM server's API key")
    p.add_argument("--model", default="smollm2", help="model alias on Keel (default guard policy)")
    p.add_argument("--raw-model", default="smollm2-raw", help="alias bound to the 'unguarded' policy")
    p.add_argument("--windows-model", default="smollm2-windows",
                   help="alias bound to the default policy with 'streaming: windows' ('' to skip that row)")
    p.add_argument("--vllm-model", default="smollm2", help="served model name on vLLM")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=8, help="rounds per target and concurrency (alternating)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--enforce-eager", action="store_true", help="when starting vLLM: skip torch.compile")
    p.add_argument("--no-tools", action="store_true", help="skip the function-calling rows")
    p.add_argument("--overlap", action="store_true", help=(
        "add the input_overlap rows: the default policy with blocking input entries, without and with overlap "
        "(Keel started by this script)"))
    p.add_argument("--no-embeddings", action="store_true", help="skip the /v1/embeddings row")
    p.add_argument("--embed-concurrency", type=int, default=8)
    p.add_argument("--embed-requests", type=int, default=200, help="requests per embeddings round")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()

    proc = None
    if not args.keel_url:
        print("starting Keel with a managed vLLM server (compile step: 1-3 min)...", flush=True)
        proc, args.keel_url, args.vllm_url, args.key, args.vllm_key = start_keel(args.enforce_eager)
    elif not (args.vllm_url and args.key):
        p.error("--keel-url needs --vllm-url and --key")
    try:
        results = asyncio.run(main_async(args))
        if not args.no_embeddings:
            results["embeddings"] = asyncio.run(embeddings_rows(args))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serving-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({
        "benchmark": "serving", "created": datetime.now(UTC).isoformat(), "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "settings": {"rounds": args.rounds, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "enforce_eager": args.enforce_eager, "tools": not args.no_tools},
        "results": results,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
