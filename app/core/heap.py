"""The interpreter's heap once a process has started.

A started Keel holds 600k to 1M objects the cyclic garbage collector would otherwise scan again and again: the loaded
libraries (torch, transformers, FastAPI, OpenTelemetry), the models, the settings and the service graph, none
of which becomes garbage while the process serves. Each full collection walks all of them: a pause of ~0.5 s on
this project's 2-core machine, landing on whichever requests are in flight (``bench/heap.py``).
:func:`freeze` moves them to the collector's permanent generation (:func:`gc.freeze`, the technique CPython
documents for servers after start-up), so a collection scans only what requests allocate. What freezing costs:
a reference cycle among those start-up objects that becomes garbage later is not collected (reference counting
still frees everything else). :func:`watch` times every collection into ``keel_gc_pause_seconds``.

Both change the whole process: the server calls them (``keel serve``), not an app built inside another program.

Kernel module: the standard library only.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("keel.heap")


def freeze() -> int:
    """Collect what start-up left behind, then freeze every object alive; returns how many are frozen."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up heap frozen: %d objects out of the garbage collector's scans (%.0f ms)", frozen,
             (time.perf_counter() - start) * 1000)
    return frozen


def watch(observe: Callable[[int, float], None]) -> Callable[[], None]:
    """Report every collection's pause, ``observe(generation, seconds)``; returns what stops it.

    ``observe`` runs inside the collector, on whichever thread allocated when a collection was due, maybe while
    that thread holds a lock: it must take no lock that code allocating objects may hold (a Prometheus metric's
    ``labels()`` does; a child bound beforehand only guards float arithmetic, which allocates nothing the collector
    tracks)."""
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            observe(info["generation"], time.perf_counter() - started[0])

    def stop() -> None:
        gc.callbacks.remove(callback)

    gc.callbacks.append(callback)
    return stop
