"""What a keyed request pays for its key and its rate limit: verifying the key (cached, then from the store) and
taking a token from its bucket, in this process (SQLite keys, the in-memory limiter) and shared (Postgres keys and
buckets, ``database_url``).

    .venv/bin/python bench/auth.py [--requests 2000] [--postgres postgresql://...]

Postgres: the URL given, else a throwaway local server from the ``pgserver`` package (the tests' own, over a Unix
socket: a networked server adds its round trip to each shared limit check and to each key read past the cache).
Prints a table and writes bench/results/auth-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.security.keys import KeyStore, PostgresKeyStore  # noqa: E402
from app.security.ratelimit import PostgresRateLimiter, RateLimiter  # noqa: E402
from bench._postgres import postgres  # noqa: E402


def timed(fn, n: int) -> dict[str, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"p50_ms": round(statistics.median(samples), 4), "p95_ms": round(samples[int(0.95 * (n - 1))], 4)}


def measure(keys, limiter, n: int) -> dict[str, dict[str, float]]:
    _, raw = keys.create("bench", ["chat"])
    cached = timed(lambda: keys.verify(raw), n)
    keys._ttl = 0  # every verify reads the store: the cost once a second per key and process
    keys._cache.clear()
    uncached = timed(lambda: keys.verify(raw), n)
    limit = timed(lambda: limiter.check("bench", 10**9), n)
    return {"key verify (cached)": cached, "key verify (store)": uncached, "rate limit check": limit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--postgres", help="a Postgres URL (default: a throwaway pgserver)")
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = KeyStore(Path(tmp) / "keel.db")
        results["this process (sqlite + memory)"] = measure(keys, RateLimiter(), args.requests)
        keys.close()
        with postgres(args.postgres, Path(tmp) / "pg") as url:
            pg_keys, pg_limits = PostgresKeyStore(url), PostgresRateLimiter(url)
            results["shared (postgres)"] = measure(pg_keys, pg_limits, args.requests)
            pg_keys.close()
            pg_limits.close()
    print(f"{'':24}" + "".join(f"{b:>34}" for b in results))
    for op in next(iter(results.values())):
        print(f"{op:24}" + "".join(f"{results[b][op]['p50_ms']:>14.3f} p50 {results[b][op]['p95_ms']:>9.3f} p95 ms"
                                   for b in results))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"auth-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"requests": args.requests, "machine": platform.platform(), "results": results},
                               indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
