"""The matching stage: one fresh DataFusion context, match_sql streamed to matched.parquet.

A job with ``rules`` runs them as ordered passes (kalla/passes.py) in the same context.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Callable

import pyarrow as pa

from .engines import engine_name
from .engine import BARRIER_COLUMN, make_context, plan_match, register_parquet
from .errors import KallaError, MatchError
from .outputs import BackgroundWriter, row_group_bytes

# Share of the job's memory budget given to DataFusion's pool; the rest covers Arrow
# buffers outside the pool, the Parquet writer and the Polars anti-joins.
POOL_SHARE = 0.6
# A hash join keeps its build side in memory (DataFusion's hash join cannot spill). Parquet
# on disk expands several-fold in memory; below this ratio the build side fits the pool.
HASH_JOIN_EXPANSION = 4
# DataFusion's batch size when the budget fits hash joins. Its default, 8192, made the 10M
# match 0.4 s slower (matching stage 1.85-2.8 s vs 1.42-1.66 s at 32768, 3 runs each; 65536
# was no faster; at 1M 0.25 s vs 0.21 s). Spilling sort-merge joins keep 8192: under a
# 60 MB pool, 32768-row batches left the external sort no room to merge its spills.
HASH_JOIN_BATCH_ROWS = 32768


def choose_join(staged: dict[str, list[str]], pool_bytes: int, strategy: str = "auto") -> bool:
    """True for hash joins: everything but the largest input fits the pool when expanded."""
    if strategy != "auto":
        return strategy == "hash"
    sizes = sorted(sum(os.path.getsize(f) for f in files) for files in staged.values())
    build = sum(sizes[:-1])
    return build * HASH_JOIN_EXPANSION <= pool_bytes


def run_match(job) -> None:
    # "matching has started": the service learns the stage (a worker that dies from here on
    # is reported in the right stage) and the caller sees progress move on from staging.
    job.report({"stage": "matching", "progress": 0.0, "matched_count": 0})
    if engine_name(job.settings) == "ballista":
        from .engines.ballista import run_match as run_on_ballista
        return run_on_ballista(job)
    ctx = match_context(job)
    if job.spec.rules:
        from .passes import run_rules     # passes.py builds on this module
        run_rules(job, ctx)
        return
    df = plan_match(ctx, job.spec.match_sql)
    # The size of the match is unknown until it ends; matched rows against the smaller
    # source is the estimate reported (capped below 1.0 until the stream is done).
    expected = max(1, min(job.source_rows.values(), default=1))
    with execution_errors("match_sql"), \
            BackgroundWriter(job.outputs.partial("matched"), output_schema(df),
                             row_group_bytes=row_group_bytes(job.memory_bytes)) as out:
        job.matched_count = stream_batches(
            job, df, out.write_batch,
            lambda rows: {"stage": "matching", "progress": round(min(0.99, rows / expected), 4),
                          "matched_count": rows})
    job.report({"stage": "matching", "progress": 1.0, "matched_count": job.matched_count})


def match_context(job):
    """A fresh context for this job: memory pool, join strategy, functions, staged sources."""
    pool = int(job.memory_bytes * POOL_SHARE)
    hash_join = choose_join(job.staged, pool, job.settings.join_strategy)
    job.join_strategy = "hash" if hash_join else "sort-merge (spilling)"
    ctx = make_context(memory_bytes=pool, spill_dir=os.path.join(job.scratch, "spill"),
                       hash_join=hash_join, batch_rows=HASH_JOIN_BATCH_ROWS if hash_join else 8192)
    for alias, files in job.staged.items():
        register_parquet(ctx, alias, files[0])
    return ctx


def output_schema(df) -> pa.Schema:
    """The schema of a planned match as written: without the barrier column."""
    schema = df.schema()
    return schema.remove(schema.get_field_index(BARRIER_COLUMN))


def stream_batches(job, df, write: Callable[[pa.RecordBatch], None],
                   progress_event: Callable[[int], dict]) -> int:
    """Run a planned match batch by batch into ``write`` (barrier dropped); return its rows.

    ``progress_event(rows)`` makes the throttled progress events; the caller reports the
    final one. Callers wrap this in execution_errors.
    """
    schema = output_schema(df)
    rows, last = 0, time.monotonic()
    for batch in df.execute_stream():
        job.check_cancelled()
        rb = batch.to_pyarrow()
        rb = rb.drop_columns([BARRIER_COLUMN])
        if rb.num_rows:
            if rb.schema != schema:
                rb = pa.RecordBatch.from_arrays(rb.columns, schema=schema)
            write(rb)
            rows += rb.num_rows
        if time.monotonic() - last >= job.settings.progress_interval:
            last = time.monotonic()
            job.report(progress_event(rows))
    return rows


@contextmanager
def execution_errors(what: str):
    """DataFusion execution errors (resources, casts, bad data) and write errors as MatchError."""
    try:
        yield
    except KallaError:
        raise
    except Exception as exc:
        text = _first_line(exc)
        if "Resources exhausted" in text:
            text += (" (the job needs more memory than KALLA_WORKER_MEMORY allows: raise it, or "
                     "set KALLA_JOIN_STRATEGY=sort-merge so joins spill to disk)")
        raise MatchError(f"{what} failed while running: {text}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().replace("DataFusion error: ", "")
    return text.splitlines()[0] if text else type(exc).__name__
