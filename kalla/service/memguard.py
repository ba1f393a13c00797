"""The worker memory cap: a worker whose memory passes KALLA_WORKER_MEMORY_LIMIT is stopped.

KALLA_WORKER_MEMORY budgets DataFusion's memory pool, but memory outside the pool (the
Arrow arrays of a projection such as ``repeat(x, 10000000)``, the Parquet writer, Polars)
is counted nowhere, so one job could grow until the kernel's OOM killer picks a victim -
perhaps the supervisor, or the database next door. The guard samples the anonymous
resident memory of every worker (Linux /proc) each POLL seconds and reports one above the
cap; the supervisor's main loop then kills it: a busy worker's job fails with an error
saying so, an idle worker still holding that much is simply replaced.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

log = logging.getLogger("kalla.supervisor")

POLL = 0.1      # seconds between samples; a job allocating fast overshoots by one interval


def resident_bytes(pid: int) -> int | None:
    """Anonymous resident memory of a process (heap, not mapped files); None if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_cap(settings) -> int:
    """Bytes; 0 for no cap. ``auto``: twice the job's budget plus 1 GiB for the interpreter,
    the libraries and the buffers the budget does not cover."""
    if settings.worker_memory_limit is None:
        return 2 * settings.worker_memory + (1 << 30)
    return settings.worker_memory_limit


def gib(size: int) -> str:
    """A size for messages.

    >>> gib(3 << 29)
    '1.5 GiB'
    """
    return f"{size / (1 << 30):.1f} GiB"


class MemoryGuard:
    """Samples the processes in ``watched`` and calls ``report(pid, tag, used)`` once for
    each that is above ``cap``; the caller decides what to do (on its own thread)."""

    def __init__(self, cap: int, report: Callable[[int, object, int], None]):
        self.cap = cap
        self.report = report
        self.watched: tuple[tuple[int, object], ...] = ()    # (pid, tag): replaced whole
        self._reported: set[tuple[int, object]] = set()
        self.enabled = cap > 0 and resident_bytes(os.getpid()) is not None
        if self.enabled:
            threading.Thread(target=self._watch, name="memory-guard", daemon=True).start()
        elif cap > 0:
            log.warning("KALLA_WORKER_MEMORY_LIMIT is not enforced here (no /proc)")

    def watch(self, processes) -> None:
        self.watched = tuple(processes)

    def _watch(self) -> None:
        while True:
            time.sleep(POLL)
            for pid, tag in self.watched:
                used = resident_bytes(pid)
                if used is not None and used > self.cap and (pid, tag) not in self._reported:
                    self._reported.add((pid, tag))
                    self.report(pid, tag, used)
