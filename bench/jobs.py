"""The job queue's own cost per job: enqueue, claim, a heartbeat with progress, complete; SQLite and Postgres.

    .venv/bin/python bench/jobs.py [--jobs 500] [--postgres postgresql://...]

Postgres: the URL given, else a throwaway local server from the ``pgserver`` package (the tests' own), which
talks over a Unix socket: a networked server adds its round trips (5 transactions per job here). Also timed:
the whole round trip through :class:`~app.jobs.JobRunner` (submit, the dispatcher claims and runs a no-op
handler, its outcome recorded, ``wait`` returns), which is what an API request that starts a job adds before
the job's own work. Every operation is one committed transaction, so the disk's flush (fsync) sets most of the
cost: ``--no-sync`` runs the same with SQLite's ``synchronous=OFF`` and Postgres's ``synchronous_commit=off``
to show the rest (the SQL and the driver). Prints a table and writes bench/results/jobs-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.jobs import JobRunner, PostgresJobQueue, SqliteJobQueue  # noqa: E402
from bench._postgres import postgres  # noqa: E402


def per_job(queue, n: int) -> dict[str, float]:
    """Milliseconds per operation, median over ``n`` jobs, and the mean of the whole lifecycle."""
    steps: dict[str, list[float]] = {"enqueue": [], "claim": [], "progress": [], "complete": [], "total": []}
    for i in range(n):
        t0 = time.perf_counter()
        job = queue.enqueue("bench", {"i": i, "paths": ["/data/a.md"]}, owner="bench")
        t1 = time.perf_counter()
        claimed = queue.claim(["bench"], "bench-worker")
        t2 = time.perf_counter()
        queue.progress(claimed.id, "bench-worker", {"files_done": 1})
        t3 = time.perf_counter()
        queue.complete(job.id, "bench-worker", {"ok": True})
        t4 = time.perf_counter()
        for name, a, b in (("enqueue", t0, t1), ("claim", t1, t2), ("progress", t2, t3), ("complete", t3, t4),
                           ("total", t0, t4)):
            steps[name].append((b - a) * 1000)
    out = {f"{k}_ms_p50": round(statistics.median(v), 3) for k, v in steps.items()}
    out["total_ms_mean"] = round(statistics.fmean(steps["total"]), 3)
    return out


async def through_runner(queue, n: int) -> dict[str, float]:
    runner = JobRunner(queue, poll_s=1.0, close_queue=False)

    async def noop(job, ctx):
        return {"ok": True}

    runner.register("bench", noop, slots=1)
    await runner.start()
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        job = await runner.submit("bench", {"i": i}, owner="bench")
        done = await runner.wait(job.id, 30)
        times.append((time.perf_counter() - t0) * 1000)
        assert done.state == "succeeded", done
    await runner.aclose()
    return {"runner_roundtrip_ms_p50": round(statistics.median(times), 3),
            "runner_roundtrip_ms_p95": round(sorted(times)[int(len(times) * 0.95)], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--postgres", default=None, help="postgresql:// URL (default: a throwaway pgserver)")
    ap.add_argument("--no-sync", action="store_true", help="commits without waiting for the disk")
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="keel-bench-jobs-") as tmp:
        sqlite = SqliteJobQueue(Path(tmp) / "jobs.db")
        if args.no_sync:
            sqlite._db.execute("PRAGMA synchronous=OFF")
        results["sqlite"] = {**per_job(sqlite, args.jobs), **asyncio.run(through_runner(sqlite, args.jobs // 5))}
        sqlite.close()
        with postgres(args.postgres, Path(tmp) / "pg") as url:
            if args.no_sync:
                url += ("&" if "?" in url else "?") + "options=-c%20synchronous_commit%3Doff"
            pg = PostgresJobQueue(url)
            results["postgres"] = {**per_job(pg, args.jobs), **asyncio.run(through_runner(pg, args.jobs // 5))}
            pg.close()
    keys = list(next(iter(results.values())))
    print(f"{'':26}" + "".join(f"{b:>12}" for b in results))
    for k in keys:
        print(f"{k:26}" + "".join(f"{results[b][k]:>12}" for b in results))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"jobs-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"jobs": args.jobs, "no_sync": args.no_sync, "machine": platform.platform(),
                                "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
