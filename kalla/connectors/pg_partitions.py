"""Partition plans for PostgreSQL relations: ctid page ranges and the SQL of each partition.

A partition is a range of heap pages, read with ``ctid >= '(lo,0)' AND ctid < '(hi,0)'``:
PostgreSQL 14+ answers that with a TID Range Scan, reading only those pages, without any
sort or index, so no row is ever seen twice or skipped at a partition edge (a row has one
ctid inside one snapshot). LIMIT/OFFSET is never used: without ORDER BY its row order is
unstable, and with one every partition sorts the whole table.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
from psycopg import sql

from ..filters import BoundFilter
from .pg_types import PgColumn

# Below this many pages (8 KiB each) per partition, another connection costs more than it saves.
MIN_PAGES_PER_PARTITION = 64
TID_RANGE_SCAN_VERSION = 140000        # TID Range Scan arrived in PostgreSQL 14
CTID_RELKINDS = ("r", "m", "p")        # tables, materialized views, partitioned tables

RELATION_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind,
       has_table_privilege(c.oid, 'SELECT') AS can_select
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""

# pg_relation_size, not relpages: relpages is only refreshed by VACUUM/ANALYZE and is 0 for a
# table that was never analyzed. A partitioned table's rows live in its leaves; a ctid range
# applies to every leaf, so the largest leaf sets the page count.
SIZE_SQL = """
SELECT CASE WHEN c.relkind = 'p' THEN
         (SELECT coalesce(max(pg_relation_size(t.relid)), 0) FROM pg_partition_tree(c.oid) t
          WHERE t.isleaf)
       ELSE pg_relation_size(c.oid) END / current_setting('block_size')::int8 AS pages,
       CASE WHEN c.relkind = 'p' THEN
         (SELECT sum(greatest(l.reltuples, 0)) FROM pg_partition_tree(c.oid) t
          JOIN pg_class l ON l.oid = t.relid WHERE t.isleaf)
       ELSE greatest(c.reltuples, 0) END AS est_rows
FROM pg_class c WHERE c.oid = %s
"""

COMPARISONS = {"eq": "=", "neq": "<>", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


@dataclass(frozen=True)
class PageRange:
    """Heap pages [start, stop); ``stop is None`` means "to the end", whatever its size."""
    start: int
    stop: int | None

    def where(self) -> tuple[sql.Composable, list]:
        if self.stop is None:
            return sql.SQL("ctid >= %s::tid"), [f"({self.start},0)"]
        return (sql.SQL("ctid >= %s::tid AND ctid < %s::tid"),
                [f"({self.start},0)", f"({self.stop},0)"])


def plan_ranges(pages: int, partitions: int) -> list[PageRange]:
    """Split ``pages`` heap pages into at most ``partitions`` ranges of about equal size.

    The last range is open-ended, so pages added after the size was read are still covered.

    >>> plan_ranges(1000, 3)
    [PageRange(start=0, stop=334), PageRange(start=334, stop=668), PageRange(start=668, stop=None)]
    >>> plan_ranges(0, 8), plan_ranges(100, 8)
    ([PageRange(start=0, stop=None)], [PageRange(start=0, stop=None)])
    """
    count = max(1, min(partitions, pages // MIN_PAGES_PER_PARTITION))
    step = math.ceil(pages / count) if pages else 0
    starts = [i * step for i in range(count)]
    return [PageRange(start, starts[i + 1] if i + 1 < count else None)
            for i, start in enumerate(starts)]


def supports_ctid_ranges(relkind: str, server_version: int) -> bool:
    """Views and foreign tables have no ctid; before PostgreSQL 14 a ctid range is a full
    scan with a filter, so every partition would read the whole table."""
    return relkind in CTID_RELKINDS and server_version >= TID_RANGE_SCAN_VERSION


def filter_sql(f: BoundFilter, column: PgColumn) -> tuple[sql.Composable, list]:
    """One pushed-down filter as SQL with ``%s`` placeholders and its parameters."""
    expr = column.filter_sql()
    if f.op in COMPARISONS:
        return sql.SQL("{} {} %s").format(expr, sql.SQL(COMPARISONS[f.op])), [f.value]
    if f.op == "like":
        return sql.SQL("{} LIKE %s").format(expr), [f.value]
    if f.op == "between":
        return sql.SQL("{} BETWEEN %s AND %s").format(expr), list(f.value)
    if f.op == "in":
        return sql.SQL("{} = ANY(%s)").format(expr), [list(f.value)]
    raise ValueError(f"unknown filter operator {f.op!r}")


def partition_query(relation: sql.Composable, columns: Sequence[PgColumn],
                    filters: Sequence[BoundFilter], page_range: PageRange | None
                    ) -> tuple[sql.Composed, list]:
    """The SELECT of one partition (``page_range=None``: the whole relation) and its params."""
    by_name = {c.name: c for c in columns}
    conditions, params = [], []
    if page_range is not None:
        cond, values = page_range.where()
        conditions.append(cond)
        params += values
    for f in filters:
        cond, values = filter_sql(f, by_name[f.column])
        conditions.append(cond)
        params += values
    query = sql.SQL("SELECT {} FROM {}").format(
        sql.SQL(", ").join(c.select_sql() for c in columns), relation)
    if conditions:
        query = sql.SQL("{} WHERE {}").format(query, sql.SQL(" AND ").join(conditions))
    return query, params


class PartitionFailed(Exception):
    """A worker's driver error, with the phase it failed in ("connect" or "read")."""

    def __init__(self, phase: str, error: BaseException):
        super().__init__(str(error))
        self.phase, self.error = phase, error


def _cancel(cursor) -> None:
    try:
        cursor.adbc_cancel()
    except Exception:       # already finished or closed: nothing to cancel
        pass


class PartitionReader:
    """Reads partition queries on parallel connections, all inside one exported snapshot.

    Each worker thread opens its own connection, imports the snapshot, then takes queries
    from a shared list until none is left. Converted batches pass to the consumer through
    a bounded queue, so at most ``2 x workers`` batches are in memory whatever the table
    size. A consumer that stops early (exception, cancel, generator closed) stops the
    workers, cancels their running statements and closes their connections.
    """

    def __init__(self, connect: Callable[[], Any], setup: Sequence[str], queries: Sequence[str],
                 workers: int, convert: Callable[[pa.RecordBatch], pa.RecordBatch],
                 batch_bytes: int = 4 << 20):
        self._connect, self._setup, self._convert = connect, list(setup), convert
        # The driver cuts a batch once it holds about this many bytes (its default, 16 MiB,
        # delays the first batch and multiplies the memory held per worker).
        self._options = {"adbc.postgresql.batch_size_hint_bytes": str(batch_bytes)}
        self.queries = list(queries)
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        for item in enumerate(self.queries):
            self._todo.put(item)
        self._out: queue.Queue = queue.Queue(maxsize=workers)
        self._stop = threading.Event()
        self._cursors: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"kalla-pg-{i}", daemon=True)
                         for i in range(workers)]

    def read(self) -> Iterator[tuple[str, int, Any]]:
        """Yield ("batch", partition, batch) and ("done", partition, rows) events."""
        for thread in self._threads:
            thread.start()
        running = len(self._threads)
        try:
            while running:
                kind, index, payload = self._out.get()
                if kind == "exit":
                    running -= 1
                elif kind == "error":
                    raise payload
                else:
                    yield kind, index, payload
        finally:
            self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the workers; a statement still streaming is cancelled, not drained."""
        if self._stop.is_set():
            return
        self._stop.set()
        with self._lock:
            cursors = list(self._cursors.values())
        for cursor in cursors:
            _cancel(cursor)
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            # Keep draining: a worker may be blocked on a full queue. A worker stuck in the
            # driver past the deadline is a daemon thread and dies with the process.
            while thread.is_alive() and time.monotonic() < deadline:
                self._drain()
                thread.join(0.05)

    def _drain(self) -> None:
        try:
            while True:
                self._out.get_nowait()
        except queue.Empty:
            pass

    def _work(self) -> None:
        phase = "connect"
        try:
            with self._connect() as conn, conn.cursor() as cursor:
                for statement in self._setup:
                    cursor.execute(statement)
                phase = "read"
                self._register(cursor)
                self._read_all(cursor)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            self._put(("error", -1, PartitionFailed(phase, exc)))
        finally:
            with self._lock:
                self._cursors.pop(threading.get_ident(), None)
            self._put(("exit", -1, None))

    def _register(self, cursor) -> None:
        with self._lock:
            self._cursors[threading.get_ident()] = cursor

    def _read_all(self, cursor) -> None:
        while not self._stop.is_set():
            try:
                index, query = self._todo.get_nowait()
            except queue.Empty:
                return
            cursor.adbc_statement.set_options(**self._options)
            cursor.execute(query)
            rows = 0
            with cursor.fetch_record_batch() as reader:
                for batch in reader:
                    if self._stop.is_set():
                        _cancel(cursor)      # else closing the reader drains the COPY
                        return
                    if batch.num_rows:
                        rows += batch.num_rows
                        self._put(("batch", index, self._convert(batch)))
            self._put(("done", index, rows))

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue


class PartitionProgress:
    """Fraction of a source read: finished partitions, plus rows of running partitions
    against the planner's row estimate (reltuples) when there is one."""

    def __init__(self, partitions: int, est_rows: float, report: Callable[[float], None]):
        self.partitions, self.report = partitions, report
        self.per_partition = est_rows / partitions if est_rows > 0 else 0.0
        self.read: dict[int, int] = {}
        self.finished: set[int] = set()
        self.last = 0.0

    def rows(self, index: int, count: int) -> None:
        self.read[index] = self.read.get(index, 0) + count
        self._emit(min_step=0.01)

    def done(self, index: int) -> None:
        self.finished.add(index)
        self._emit(min_step=0.0)

    def finish(self) -> None:
        self.report(1.0)

    def _emit(self, min_step: float) -> None:
        partial = sum(min(0.99, n / self.per_partition) for i, n in self.read.items()
                      if i not in self.finished) if self.per_partition else 0.0
        fraction = min(0.99, (len(self.finished) + partial) / self.partitions)
        if fraction > self.last + min_step:      # never backwards, never a flood
            self.last = fraction
            self.report(fraction)
