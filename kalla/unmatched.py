"""Records that matched nothing: Polars anti-joins on each side's primary key.

The anti-join streams whole source rows through Polars' streaming engine and each batch is
cast back to the source's exact Arrow schema before it is written (Polars would otherwise
turn string into large_string and time64[us] into time64[ns]). Should a column type not
survive Polars, the fallback sends only the key columns (with a row number) through Polars
and copies the full rows with pyarrow. Either way memory holds a batch, not the source.
A key containing NULL never matches (``nulls_equal=False``): such rows are unmatched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .outputs import writer_options

ROW = "__kalla_row"
BATCH_ROWS = 65536
log = logging.getLogger("kalla.unmatched")


@dataclass
class UnmatchedResult:
    rows: int
    null_key_rows: int


def unmatched_row_numbers(source_files: Sequence[str], keys: Sequence[str], matched_path: str,
                          matched_columns: Sequence[str]) -> tuple[np.ndarray, int]:
    """Sorted row numbers (over source_files in order) whose key is in no matched row."""
    source = pl.scan_parquet(list(source_files)).select(list(keys)).with_row_index(ROW)
    matched = _matched_keys(keys, matched_path, matched_columns, source.collect_schema())
    # maintain_order keeps row numbers ascending, so no sort is needed afterwards
    anti = source.join(matched, on=list(keys), how="anti", nulls_equal=False, maintain_order="left")
    null_keys = source.filter(pl.any_horizontal([pl.col(k).is_null() for k in keys])).select(pl.len())
    rows, nulls = pl.collect_all([anti.select(ROW), null_keys], engine="streaming")
    numbers = rows[ROW].to_numpy()
    if numbers.size > 1 and not bool(np.all(numbers[:-1] <= numbers[1:])):
        numbers = np.sort(numbers)     # write_rows bisects; never trust an order we didn't check
    return numbers, int(nulls.item())


def write_rows(source_files: Sequence[str], rows: np.ndarray, out_path: str,
               batch_rows: int = 65536, scratch: bool = False) -> int:
    """Copy the given row numbers of the source files into out_path; return rows written.

    Reads batch by batch (memory: one batch), and only the row groups that hold at least
    one wanted row - where everything matched, nothing is read.
    """
    schema = pq.read_schema(source_files[0]) if source_files else pa.schema([])
    written, offset = 0, 0
    with pq.ParquetWriter(out_path, schema, **writer_options(schema, scratch)) as writer:
        for path in source_files:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(rows, [offset, offset + size])
                if hi > lo:
                    mask = np.zeros(size, dtype=bool)
                    mask[rows[lo:hi] - offset] = True
                    written += _copy_group(parquet, group, mask, schema, writer, batch_rows)
                offset += size
    return written


def _copy_group(parquet, group: int, mask: np.ndarray, schema, writer, batch_rows: int) -> int:
    start = written = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], use_threads=True):
        keep = mask[start:start + batch.num_rows]
        start += batch.num_rows
        if keep.any():
            picked = batch.filter(pa.array(keep))
            if picked.schema != schema:
                picked = pa.RecordBatch.from_arrays(picked.columns, schema=schema)
            writer.write_batch(picked)
            written += picked.num_rows
    return written


def _matched_keys(keys, matched_path, matched_columns, dtypes) -> pl.LazyFrame:
    return (pl.scan_parquet(matched_path)
            .select([pl.col(m).cast(dtypes[k], strict=False).alias(k)
                     for m, k in zip(matched_columns, keys)])
            .drop_nulls()
            .unique())


def stream_unmatched(source_files: Sequence[str], keys: Sequence[str], matched_path: str,
                     matched_columns: Sequence[str], out_path: str,
                     scratch: bool = False) -> UnmatchedResult:
    """Full rows through Polars' streaming anti-join, cast back to the source schema."""
    schema = pq.read_schema(source_files[0])
    source = pl.scan_parquet(list(source_files))
    dtypes = source.collect_schema()
    anti = source.join(_matched_keys(keys, matched_path, matched_columns, dtypes), on=list(keys),
                       how="anti", nulls_equal=False, maintain_order="left")
    written = 0
    with pq.ParquetWriter(out_path, schema, **writer_options(schema, scratch)) as writer:
        for frame in anti.collect_batches(chunk_size=BATCH_ROWS, maintain_order=True):
            table = frame.to_arrow().cast(schema)
            writer.write_table(table)
            written += table.num_rows
    nulls = (source.select(list(keys)).filter(pl.any_horizontal([pl.col(k).is_null() for k in keys]))
             .select(pl.len()).collect(engine="streaming").item())
    return UnmatchedResult(written, int(nulls))


def write_leftovers(leftovers, source_files: Sequence[str], keys: Sequence[str], out_path: str,
                    scratch: bool = False) -> UnmatchedResult:
    """Stream a rules job's leftovers (a DataFusion DataFrame: the source minus every pass's
    keys, kalla/passes.py) into out_path under the source's exact schema.

    The passes already narrowed each side to the records no rule took, so this reads the
    small leftovers rather than anti-joining the whole source again. Records whose key has
    a NULL are never removed by an anti-join: they are here, and counted.
    """
    schema = pq.read_schema(source_files[0])
    written = nulls = 0
    with pq.ParquetWriter(out_path, schema, **writer_options(schema, scratch)) as writer:
        for batch in leftovers.execute_stream():
            rb = batch.to_pyarrow()
            if not rb.num_rows:
                continue
            if rb.schema != schema:
                rb = pa.RecordBatch.from_arrays(
                    [c if c.type == f.type else c.cast(f.type) for c, f in zip(rb.columns, schema)],
                    schema=schema)
            writer.write_batch(rb)
            written += rb.num_rows
            null_key = pc.is_null(rb.column(keys[0]))
            for key in keys[1:]:
                null_key = pc.or_(null_key, pc.is_null(rb.column(key)))
            nulls += pc.sum(null_key).as_py() or 0
    return UnmatchedResult(written, nulls)


def derive_unmatched(source_files: Sequence[str], keys: Sequence[str], matched_path: str,
                     matched_columns: Sequence[str], out_path: str,
                     scratch: bool = False) -> UnmatchedResult:
    """Write the unmatched rows to out_path (plain and uncompressed when it is scratch)."""
    try:
        return stream_unmatched(source_files, keys, matched_path, matched_columns, out_path, scratch)
    except (pl.exceptions.PolarsError, pa.ArrowException, ValueError, TypeError) as exc:
        log.info("unmatched rows via key row numbers (%s: %s)", type(exc).__name__, exc)
    rows, null_keys = unmatched_row_numbers(source_files, keys, matched_path, matched_columns)
    return UnmatchedResult(write_rows(source_files, rows, out_path, scratch=scratch), null_keys)
