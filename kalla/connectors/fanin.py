"""Run a generator per task on a few threads and merge what they yield, with bounded memory.

Used by the S3 connector: each task is a byte range or a Parquet row group; the threads
spend their time in pyarrow (GETs, parsing, filtering), which releases the GIL, so they
really run in parallel. Items arrive in any order. A bounded queue keeps at most ``depth``
items waiting; closing the consuming generator stops the threads at their next item.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
Item = TypeVar("Item")

_DONE = object()
_POLL_S = 0.1           # how often a blocked producer re-checks whether the consumer left
_JOIN_TIMEOUT_S = 60.0  # a thread stuck in one GET is abandoned (it is a daemon) after this


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def fan_in(tasks: Iterable[T], work: Callable[[T], Iterator[Item]], threads: int,
           depth: int | None = None) -> Iterator[Item]:
    """Yield every item of ``work(task)`` for all tasks, computed on up to ``threads`` threads.

    The first exception raised by any ``work`` is re-raised here, after the other threads
    were told to stop.

    >>> sorted(fan_in(range(4), lambda n: iter([n, n * 10]), threads=3))
    [0, 0, 1, 2, 3, 10, 20, 30]
    """
    pending = list(tasks)
    count = max(1, min(threads, len(pending)))
    items: queue.Queue = queue.Queue(maxsize=depth or 2 * count)
    stop = threading.Event()
    take = _Tasks(pending)
    pool = [threading.Thread(target=_run, args=(take, work, items, stop), daemon=True,
                             name=f"kalla-fanin-{i}") for i in range(count)]
    for thread in pool:
        thread.start()
    try:
        yield from _drain(items, count)
    finally:
        stop.set()
        for thread in pool:
            thread.join(_JOIN_TIMEOUT_S)


class _Tasks:
    """Hands out tasks to the threads, each once."""

    def __init__(self, tasks: list):
        self._next = iter(tasks)
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            return next(self._next, _DONE)


def _run(take: _Tasks, work: Callable, items: queue.Queue, stop: threading.Event) -> None:
    try:
        while not stop.is_set() and (task := take()) is not _DONE:
            for item in work(task):
                if not _put(items, item, stop):
                    return
    except BaseException as exc:            # handed to the consumer, which re-raises it
        _put(items, _Failed(exc), stop)
    finally:
        _put(items, _DONE, stop)


def _drain(items: queue.Queue, running: int) -> Iterator:
    while running:
        item = items.get()
        if item is _DONE:
            running -= 1
        elif isinstance(item, _Failed):
            raise item.exc
        else:
            yield item


def _put(items: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless the consumer has gone; False when it has."""
    while not stop.is_set():
        try:
            items.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False
