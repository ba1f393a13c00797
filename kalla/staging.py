"""The staging stage: check every source cheaply, then stream each into scratch Parquet.

Staging bounds memory (one batch per source in flight) and gives the match a file it can
spill against. Local Parquet without filters is registered in place - copying it would
only cost time.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from .connectors import connector_for
from .connectors.local import ParquetConnector, RestartRead
from .engine import make_context, plan_match
from .errors import InvalidInput, MatchError, SourceError
from .outputs import RowGroups, row_group_bytes
from .filters import bind_filters
from .keys import resolve_key_columns

MAX_RESTARTS = 64
ROW_GROUP_ROWS = 1 << 20


def check_job(job) -> None:
    """Open every source, bind its filters, plan match_sql on empty tables, resolve keys."""
    ctx = make_context(memory_bytes=64 << 20, spill_dir=os.path.join(job.scratch, "spill"))
    for source in job.spec.sources:
        connector = connector_for(source, job.settings)
        job.connectors[source.alias] = connector
        schema = connector.schema()
        _check_expected_columns(source, schema)
        _check_key_columns(source, schema, job.spec.primary_keys.get(source.alias, ()))
        job.bound_filters[source.alias] = bind_filters(source.alias, schema, source.filters)
        ctx.register_record_batches(source.alias.lower(), [[pa.RecordBatch.from_pylist([], schema)]])
    sides = [job.spec.left.alias, job.spec.right.alias]
    rules = [(f"rules[{i}] ({rule.name!r}): ", rule.match_sql) for i, rule in enumerate(job.spec.rules)]
    for prefix, sql in rules or [("", job.spec.match_sql)]:
        try:
            names = plan_match(ctx, sql).schema().names[:-1]   # minus the barrier
            keys = resolve_key_columns(names, sides, job.spec.primary_keys)
        except MatchError as exc:
            raise MatchError(prefix + str(exc)) from None
        job.key_columns = job.key_columns or keys          # the first rule names the keys


def _check_expected_columns(source, schema: pa.Schema) -> None:
    if source.expected_columns:
        missing = [c for c in source.expected_columns if c not in schema.names]
        if missing:
            raise InvalidInput(f"sources.{source.alias}.schema",
                               f"the file bound to {source.alias!r} lacks columns {missing} "
                               f"that the recipe declares (it has {schema.names})")


def _check_key_columns(source, schema: pa.Schema, keys) -> None:
    missing = [k for k in keys if k not in schema.names]
    if missing:
        raise InvalidInput(f"primary_keys.{source.alias}",
                           f"source {source.alias!r} has no column(s) {missing}; "
                           f"its columns are {schema.names}")


def stage_sources(job) -> None:
    with ThreadPoolExecutor(max(1, min(len(job.spec.sources), 4))) as pool:
        futures = [pool.submit(_stage_one, job, s) for s in job.spec.sources]
        for future in futures:
            future.result()
    # report rows in the order the job lists its sources, whatever finished first
    job.source_rows = {s.alias: job.source_rows[s.alias] for s in job.spec.sources}


def _stage_one(job, source) -> None:
    connector = job.connectors[source.alias]
    filters = job.bound_filters[source.alias]
    progress = ProgressThrottle(job, source.alias)
    if isinstance(connector, ParquetConnector) and not filters and len(connector.files) == 1:
        job.staged[source.alias] = connector.files
        job.source_rows[source.alias] = connector.count_rows()
        progress(1.0)
        return
    path = os.path.join(job.scratch, f"staged-{source.alias}.parquet")
    for _ in range(MAX_RESTARTS):
        try:
            job.source_rows[source.alias] = _write_batches(job, connector, filters, progress, path)
            break
        except RestartRead:
            continue          # the connector widened a column type: read again from the start
    else:
        raise SourceError(f"source {source.alias!r}: could not settle on one schema")
    job.staged[source.alias] = [path]
    progress(1.0)


def _write_batches(job, connector, filters, progress, path) -> int:
    schema = connector.schema()
    rows = 0
    with RowGroups(pq.ParquetWriter(path, schema, compression="lz4"), rows=ROW_GROUP_ROWS,
                   nbytes=row_group_bytes(job.memory_bytes)) as writer:
        for batch in connector.batches(filters, progress):
            job.check_cancelled()
            if batch.schema != schema:
                batch = pa.Table.from_batches([batch]).cast(schema).to_batches()[0] if batch.num_rows else batch
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


class ProgressThrottle:
    """Staging progress for one source: at most one event per interval, and always 1.0."""

    def __init__(self, job, alias: str):
        self.job, self.alias = job, alias
        self.last_sent = 0.0
        self.finished = False

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if self.finished:
            return
        if fraction >= 1.0:
            self.finished = True
        elif now - self.last_sent < self.job.settings.progress_interval:
            return
        self.last_sent = now
        self.job.report({"stage": "staging", "run_id": self.job.spec.run_id,
                         "progress": round(min(max(fraction, 0.0), 1.0), 4),
                         "source": self.alias})
