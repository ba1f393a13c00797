"""The matching stage: one fresh DataFusion context, match_sql streamed to matched.parquet."""
from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from .engine import BARRIER_COLUMN, make_context, plan_match, register_parquet
from .errors import KallaError, MatchError

# Share of the job's memory budget given to DataFusion's pool; the rest covers Arrow
# buffers outside the pool, the Parquet writer and the Polars anti-joins.
POOL_SHARE = 0.6
# A hash join keeps its build side in memory (DataFusion's hash join cannot spill). Parquet
# on disk expands several-fold in memory; below this ratio the build side fits the pool.
HASH_JOIN_EXPANSION = 4


def choose_join(staged: dict[str, list[str]], pool_bytes: int, strategy: str = "auto") -> bool:
    """True for hash joins: everything but the largest input fits the pool when expanded."""
    if strategy != "auto":
        return strategy == "hash"
    sizes = sorted(sum(os.path.getsize(f) for f in files) for files in staged.values())
    build = sum(sizes[:-1])
    return build * HASH_JOIN_EXPANSION <= pool_bytes


def run_match(job) -> None:
    pool = int(job.memory_bytes * POOL_SHARE)
    hash_join = choose_join(job.staged, pool, job.settings.join_strategy)
    job.join_strategy = "hash" if hash_join else "sort-merge (spilling)"
    ctx = make_context(memory_bytes=pool, spill_dir=os.path.join(job.scratch, "spill"),
                       hash_join=hash_join, batch_rows=8192)
    for alias, files in job.staged.items():
        register_parquet(ctx, alias, files[0])
    df = plan_match(ctx, job.spec.match_sql)
    job.matched_count = _stream_to_parquet(job, df, job.outputs.partial("matched"))


def _stream_to_parquet(job, df, path: str) -> int:
    schema = df.schema()
    schema = schema.remove(schema.get_field_index(BARRIER_COLUMN))
    # The size of the match is unknown until it ends; matched rows against the smaller
    # source is the estimate reported (capped below 1.0 until the stream is done).
    expected = max(1, min(job.source_rows.values(), default=1))
    rows, last = 0, time.monotonic()
    try:
        with pq.ParquetWriter(path, schema, compression="snappy") as writer:
            for batch in df.execute_stream():
                job.check_cancelled()
                rb = batch.to_pyarrow()
                rb = rb.drop_columns([BARRIER_COLUMN])
                if rb.num_rows:
                    if rb.schema != schema:
                        rb = pa.RecordBatch.from_arrays(rb.columns, schema=schema)
                    writer.write_batch(rb)
                    rows += rb.num_rows
                if time.monotonic() - last >= job.settings.progress_interval:
                    last = time.monotonic()
                    job.report({"stage": "matching", "progress": round(min(0.99, rows / expected), 4),
                                "matched_count": rows})
    except KallaError:
        raise
    except Exception as exc:  # DataFusion execution errors (resources, casts, bad data)
        text = _first_line(exc)
        if "Resources exhausted" in text:
            text += (" (the job needs more memory than KALLA_WORKER_MEMORY allows: raise it, or "
                     "set KALLA_JOIN_STRATEGY=sort-merge so joins spill to disk)")
        raise MatchError(f"match_sql failed while running: {text}") from None
    job.report({"stage": "matching", "progress": 1.0, "matched_count": rows})
    return rows


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().replace("DataFusion error: ", "")
    return text.splitlines()[0] if text else type(exc).__name__
