"""The in-process job runner (app.jobs.runner): handlers, outcomes, cancellation, shutdown and restart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app.core.errors import InvalidRequest, KeelError
from app.jobs import Job, JobContext, JobRunner, SqliteJobQueue
from app.jobs.queue import retire_worker


def make_runner(path: Path, **kw: Any) -> JobRunner:
    queue = SqliteJobQueue(path, retry_backoff_s=0.0, max_attempts=kw.pop("max_attempts", 3),
                           lease_s=kw.pop("lease_s", 60.0))
    return JobRunner(queue, heartbeat_s=kw.pop("heartbeat_s", 0.2), progress_interval_s=0.05, poll_s=0.05,
                     shutdown_grace_s=kw.pop("shutdown_grace_s", 5.0), **kw)


@pytest.fixture
async def runners(tmp_path: Path) -> AsyncIterator[Callable[..., JobRunner]]:
    made: list[JobRunner] = []

    def make(**kw: Any) -> JobRunner:
        r = make_runner(tmp_path / "jobs.db", **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.aclose(grace_s=1)


async def wait_state(runner: JobRunner, job_id: str, *states: str, timeout: float = 10) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await runner.get(job_id)
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job {job_id} is {job.state}, not {states}: {job}"
        await asyncio.sleep(0.02)


async def test_a_job_runs_reports_progress_and_succeeds(runners) -> None:
    runner = runners()
    seen = asyncio.Event()

    async def handler(job: Job, ctx: JobContext) -> dict:
        ctx.set_progress({"step": 1})
        await asyncio.sleep(0.3)  # long enough for the progress to be written
        seen.set()
        return {"echo": job.payload["x"]}

    runner.register("echo", handler)
    job = await runner.submit("echo", {"x": 7}, owner="k1")  # the first submit starts the runner
    assert runner.started
    done = await runner.wait(job.id, 10)
    assert done.state == "succeeded" and done.result == {"echo": 7} and done.progress == {"step": 1}
    assert done.attempts == 1 and done.owner == "k1"


async def test_a_crashing_handler_is_retried_then_fails(runners) -> None:
    runner = runners(max_attempts=2)
    calls: list[int] = []

    async def crash(job: Job, ctx: JobContext) -> None:
        calls.append(job.attempts)
        raise RuntimeError("boom")

    runner.register("crash", crash)
    job = await runner.submit("crash", {})
    done = await wait_state(runner, job.id, "failed")
    assert calls == [1, 2]
    assert done.error == {"code": "internal_error", "message": "RuntimeError: boom"}


async def test_a_refused_request_fails_at_once_and_a_server_error_is_retried(runners) -> None:
    runner = runners(max_attempts=3)
    calls: list[str] = []

    async def handler(job: Job, ctx: JobContext) -> dict:
        calls.append(job.payload["kind"])
        if job.payload["kind"] == "bad":
            raise InvalidRequest("no such suite", param="suite")
        if job.attempts < 2:
            raise KeelError("backend hiccup")  # a 500: may pass next time
        return {}

    runner.register("h", handler)
    bad = await runner.submit("h", {"kind": "bad"})
    flaky = await runner.submit("h", {"kind": "flaky"})
    failed = await wait_state(runner, bad.id, "failed")
    assert failed.error["code"] == "invalid_request" and failed.attempts == 1
    ok = await wait_state(runner, flaky.id, "succeeded")
    assert ok.attempts == 2 and calls.count("bad") == 1


async def test_cancel_a_queued_and_a_running_interruptible_job(runners) -> None:
    runner = runners()
    started = asyncio.Event()
    unwound = asyncio.Event()

    async def slow(job: Job, ctx: JobContext) -> dict:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            unwound.set()
            raise
        return {}

    runner.register("slow", slow, slots=1, interruptible=True)
    running = await runner.submit("slow", {"n": 1})
    queued = await runner.submit("slow", {"n": 2})  # one slot: waits
    await asyncio.wait_for(started.wait(), 5)
    assert (await runner.cancel(queued.id)).state == "cancelled"
    asked = await runner.cancel(running.id)
    assert asked.cancel_requested
    done = await wait_state(runner, running.id, "cancelled")
    assert unwound.is_set() and done.finished_at is not None
    assert (await runner.get(queued.id)).state == "cancelled"  # never started


async def test_cancel_reaches_a_thread_handler_through_its_flag(runners) -> None:
    runner = runners()
    steps: list[int] = []
    in_thread = threading.Event()

    def work(ctx: JobContext) -> dict:
        for i in range(500):
            in_thread.set()
            ctx.check()  # a safe point
            steps.append(i)
            ctx.set_progress({"step": i})
            time.sleep(0.01)
        return {"steps": len(steps)}

    async def handler(job: Job, ctx: JobContext) -> dict:
        return await asyncio.to_thread(work, ctx)

    runner.register("thread", handler)
    job = await runner.submit("thread", {})
    await asyncio.to_thread(in_thread.wait, 5)
    await runner.cancel(job.id)
    done = await wait_state(runner, job.id, "cancelled")
    assert 0 < len(steps) < 500 and done.progress["step"] == steps[-1]


async def test_a_cancel_from_another_process_is_seen_at_the_next_heartbeat(runners, tmp_path: Path) -> None:
    runner = runners(heartbeat_s=0.1)
    started = asyncio.Event()

    async def slow(job: Job, ctx: JobContext) -> dict:
        started.set()
        await asyncio.sleep(60)
        return {}

    runner.register("slow", slow, interruptible=True)
    job = await runner.submit("slow", {})
    await asyncio.wait_for(started.wait(), 5)
    other = SqliteJobQueue(tmp_path / "jobs.db")  # e.g. `keel` or another API process
    try:
        assert other.cancel(job.id).cancel_requested
    finally:
        other.close()
    assert (await wait_state(runner, job.id, "cancelled", timeout=5)).state == "cancelled"


async def test_slots_bound_concurrency_per_kind(runners) -> None:
    runner = runners()
    now_running = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0}

    def handler_for(kind: str):
        async def handler(job: Job, ctx: JobContext) -> dict:
            now_running[kind] += 1
            peak[kind] = max(peak[kind], now_running[kind])
            await asyncio.sleep(0.1)
            now_running[kind] -= 1
            return {}
        return handler

    runner.register("a", handler_for("a"), slots=1)
    runner.register("b", handler_for("b"), slots=3)
    jobs = [await runner.submit(k, {"i": i}) for i in range(6) for k in ("a", "b")]
    for job in jobs:
        await wait_state(runner, job.id, "succeeded")
    assert peak == {"a": 1, "b": 3}


async def test_shutdown_releases_a_running_job_and_the_next_start_resumes_it(runners) -> None:
    first = runners()
    started = asyncio.Event()

    async def stubborn(job: Job, ctx: JobContext) -> dict:
        started.set()
        await ctx.wait_stop()  # a cooperative handler: stops at its safe point when asked
        ctx.check()
        return {}

    first.register("work", stubborn)
    job = await first.submit("work", {"resume": "me"})
    await asyncio.wait_for(started.wait(), 5)
    await first.aclose()
    back = await asyncio.to_thread(SqliteJobQueue(first.queue.path).get, job.id)
    assert (back.state, back.attempts, back.claimed_by) == ("queued", 0, None)

    second = runners()
    runs: list[int] = []

    async def finish(job: Job, ctx: JobContext) -> dict:
        runs.append(job.attempts)
        return {"resumed": job.payload["resume"]}

    second.register("work", finish)
    await second.start()  # what the API lifespan does
    done = await wait_state(second, job.id, "succeeded")
    assert done.result == {"resumed": "me"} and runs == [1]


async def test_shutdown_cancels_a_handler_that_does_not_stop_within_the_grace_period(runners, caplog) -> None:
    runner = runners()
    started = asyncio.Event()

    async def deaf(job: Job, ctx: JobContext) -> dict:
        started.set()
        await asyncio.sleep(60)  # ignores the stop flag
        return {}

    runner.register("deaf", deaf)  # not interruptible: only the grace period ends it
    job = await runner.submit("deaf", {})
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.monotonic()
    await runner.aclose(grace_s=0.3)
    assert time.monotonic() - t0 < 5
    assert "did not stop within" in caplog.text
    queue = SqliteJobQueue(runner.queue.path)
    try:
        assert queue.get(job.id).state == "queued"
    finally:
        queue.close()


async def test_a_restart_runs_queued_jobs_and_takes_back_a_dead_process_jobs(runners) -> None:
    first = runners()
    hold = asyncio.Event()

    async def hang(job: Job, ctx: JobContext) -> dict:
        await hold.wait()
        return {}

    first.register("work", hang)
    running = await first.submit("work", {"n": 1})
    queued = await first.submit("work", {"n": 2})
    await wait_state(first, running.id, "running")
    # the process dies: nothing is released, its worker is simply gone
    first._closing = True
    retire_worker(first.worker_id)

    second = runners()
    ran: list[int] = []

    async def count(job: Job, ctx: JobContext) -> dict:
        ran.append(job.payload["n"])
        return {}

    second.register("work", count)
    await second.start()
    resumed = await wait_state(second, running.id, "succeeded")
    await wait_state(second, queued.id, "succeeded")
    assert sorted(ran) == [1, 2] and resumed.attempts == 2  # the lost run counts as an attempt
    hold.set()


async def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(runners, tmp_path: Path) -> None:
    runner = runners(heartbeat_s=0.1)
    stopped = asyncio.Event()

    async def slow(job: Job, ctx: JobContext) -> dict:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return {}

    runner.register("slow", slow, interruptible=True)
    job = await runner.submit("slow", {})
    await wait_state(runner, job.id, "running")
    other = SqliteJobQueue(tmp_path / "jobs.db", lease_s=60)
    try:  # another process decides this worker is gone, and another worker takes the job
        other.recover_stale(now=time.time() + 120)
        assert other.claim(["slow"], "elsewhere:1:x").claimed_by == "elsewhere:1:x"
        await asyncio.wait_for(stopped.wait(), 5)
        await asyncio.sleep(0.2)
        job = other.get(job.id)
        assert (job.state, job.claimed_by) == ("running", "elsewhere:1:x")
    finally:
        other.close()


async def test_a_handler_that_recorded_its_failure_or_its_cancel_ends_the_job_at_once(runners) -> None:
    from app.jobs import JobFailed
    from app.jobs.queue import JobCancelled

    runner = runners(max_attempts=3)
    calls: list[str] = []

    async def failed(job: Job, ctx: JobContext) -> None:
        calls.append("failed")
        raise JobFailed(KeelError("training crashed", code="training_failed"))  # would crash again: no retry

    async def cancelled(job: Job, ctx: JobContext) -> None:
        calls.append("cancelled")
        raise JobCancelled("its own store said so before the heartbeat did")

    runner.register("failed", failed)
    runner.register("cancelled", cancelled)
    one = await runner.submit("failed", {})
    two = await runner.submit("cancelled", {})
    one, two = await wait_state(runner, one.id, "failed"), await wait_state(runner, two.id, "cancelled")
    assert one.attempts == 1 and one.error == {"code": "training_failed", "message": "training crashed"}
    assert sorted(calls) == ["cancelled", "failed"]


async def test_max_running_holds_one_job_at_a_time_and_claims_kinds_in_order(runners) -> None:
    runner = runners(max_running=1)
    ran: list[str] = []
    running = 0
    most = 0

    async def handler(job: Job, ctx: JobContext) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        ran.append(job.payload["n"])
        await asyncio.sleep(0.05)
        running -= 1

    jobs = [runner.queue.enqueue("train", {"n": "t1"}), runner.queue.enqueue("train", {"n": "t2"}),
            runner.queue.enqueue("evals", {"n": "e1"})]
    runner.register("evals", handler)  # registered first: claimed first
    runner.register("train", handler)
    await runner.start()
    for job in jobs:
        await wait_state(runner, job.id, "succeeded")
    assert most == 1 and ran == ["e1", "t1", "t2"]


async def test_failing_heartbeats_stop_a_job_before_its_lease_lapses(runners, monkeypatch, caplog) -> None:
    runner = runners(lease_s=0.4, heartbeat_s=0.05)
    stopped = asyncio.Event()

    def broken(*args: Any) -> bool:
        raise OSError("database is locked")

    async def handler(job: Job, ctx: JobContext) -> None:
        assert await ctx.wait_stop() == "lease_lost"
        stopped.set()

    monkeypatch.setattr(runner.queue, "heartbeat", broken)
    runner.register("long", handler)
    job = await runner.submit("long", {})
    await asyncio.wait_for(stopped.wait(), 5)
    assert "stopping it before the queue gives it to another worker" in caplog.text
    for _ in range(250):  # the failure is written once the handler has stopped
        failed = await runner.get(job.id)
        if failed.error is not None:
            break
        await asyncio.sleep(0.02)
    # an attempt spent, as if the worker had died (a queue that keeps refusing beats ends the job)
    assert failed.error["code"] == "heartbeat_failed" and "before its lease lapsed" in failed.error["message"]
