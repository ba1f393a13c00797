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
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .outputs import writer_options

ROW = "__kalla_row"
BATCH_ROWS = 65536
# Resident memory of one Polars anti-join per matched row and key column, measured at 10M
# with 7.5M matched int64 keys: ~650 MB above the process's baseline for a join (composite
# keys), ~300 MB for the set-membership filter (single keys). The join's figure, rounded up.
ANTI_JOIN_BYTES_PER_KEY = 100
# Share of the job's memory budget the unmatched stage plans for: DataFusion's pool is idle
# by then, but what its allocator keeps from the match still counts in the process's RSS.
UNMATCHED_SHARE = 0.4
log = logging.getLogger("kalla.unmatched")


@dataclass
class UnmatchedResult:
    rows: int
    null_key_rows: int


def unmatched_row_numbers(source_files: Sequence[str], keys: Sequence[str], matched_path,
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
               batch_rows: int = 65536, scratch: bool = False, schema: pa.Schema | None = None) -> int:
    """Copy the given row numbers of the source files into out_path; return rows written.

    Reads batch by batch (memory: one batch), and only the row groups that hold at least
    one wanted row - where everything matched, nothing is read.
    """
    schema = schema or (pq.read_schema(source_files[0]) if source_files else pa.schema([]))
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
                picked = picked.cast(schema)
            writer.write_batch(picked)
            written += picked.num_rows
    return written


def _matched_keys(keys, matched_path, matched_columns, dtypes) -> pl.LazyFrame:
    """The matched key columns (one file, or a list of files: none means no keys)."""
    if isinstance(matched_path, (list, tuple)) and not matched_path:
        return pl.LazyFrame(schema={k: dtypes[k] for k in keys})
    # No .unique(): an anti-join's result does not depend on duplicate keys on its right,
    # and deduplicating 7.5M keys first doubled the anti-join's time (measured at 10M).
    return (pl.scan_parquet(matched_path)
            .select([pl.col(m).cast(dtypes[k], strict=False).alias(k)
                     for m, k in zip(matched_columns, keys)])
            .drop_nulls())


def _anti_join(source: pl.LazyFrame, keys: Sequence[str], matched: pl.LazyFrame) -> pl.LazyFrame:
    """The source's rows whose key is not among the matched keys, in the source's order.

    A single key column is tested against the set of matched keys (``is_in``): at 10M the
    same rows as a join with ``how="anti"``, in the same order, in 0.33-0.47 s instead of
    0.64-0.69 s per side and about half the memory. Composite keys take the join. A NULL key
    is never in the set: such rows stay (unmatched), as with ``nulls_equal=False``.
    """
    if len(keys) == 1:
        key = keys[0]
        found = matched.collect().to_series()       # the anti-join would hash these too
        return source.filter(~pl.col(key).is_in(found.implode()).fill_null(False))
    return source.join(matched, on=list(keys), how="anti", nulls_equal=False, maintain_order="left")


def stream_unmatched(source_files: Sequence[str], keys: Sequence[str], matched_path,
                     matched_columns: Sequence[str], out_path: str, scratch: bool = False,
                     schema: pa.Schema | None = None) -> UnmatchedResult:
    """Full rows through Polars' streaming anti-join, cast back to the source schema."""
    schema = schema or pq.read_schema(source_files[0])
    source = pl.scan_parquet(list(source_files))
    anti = _anti_join(source, keys, _matched_keys(keys, matched_path, matched_columns,
                                                  source.collect_schema()))
    if _polars_writes_schema(source, schema, out_path):
        # Polars writes the file itself (no batch crosses into Python): ~25 % faster at 10M
        anti.sink_parquet(out_path, compression="uncompressed" if scratch else "snappy",
                          maintain_order=True)
        written = pq.read_metadata(out_path).num_rows
    else:
        written = 0
        with pq.ParquetWriter(out_path, schema, **writer_options(schema, scratch)) as writer:
            for frame in anti.collect_batches(chunk_size=BATCH_ROWS, maintain_order=True):
                table = frame.to_arrow().cast(schema)
                writer.write_table(table)
                written += table.num_rows
    nulls = (source.select(list(keys)).filter(pl.any_horizontal([pl.col(k).is_null() for k in keys]))
             .select(pl.len()).collect(engine="streaming").item())
    return UnmatchedResult(written, int(nulls))


def _polars_writes_schema(source: pl.LazyFrame, schema: pa.Schema, out_path: str) -> bool:
    """True when a Parquet file written by Polars from ``source`` has exactly ``schema``.

    Polars turns some types into others (string -> large_string or string_view, time64[us]
    -> time64[ns], ...). Rather than keep a list, write the source's empty head and look.
    """
    probe = out_path + ".probe"
    try:
        source.head(0).sink_parquet(probe)
        return pq.read_schema(probe).equals(schema, check_metadata=False)
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError):
        return False
    finally:
        if os.path.exists(probe):
            os.remove(probe)


def fits_side_by_side(matched_rows: int, key_columns: int, budget_bytes: int) -> bool:
    """True when both sides' anti-joins at once fit the unmatched stage's share of the budget.

    Side by side was faster whenever it fits (at 10M, 0.62-0.67 s vs 0.70-0.71 s one after
    the other, for ~150 MB more); under a tight budget the sides take turns.

    >>> fits_side_by_side(750_000, 1, 8 * 1024**3), fits_side_by_side(750_000, 1, 64 * 1024**2)
    (True, False)
    >>> fits_side_by_side(7_500_000, 1, 8 * 1024**3), fits_side_by_side(7_500_000, 1, 1024**3)
    (True, False)
    """
    need = 2 * ANTI_JOIN_BYTES_PER_KEY * max(1, key_columns) * matched_rows
    return need <= budget_bytes * UNMATCHED_SHARE


def derive_unmatched(source_files: Sequence[str], keys: Sequence[str], matched_path,
                     matched_columns: Sequence[str], out_path: str, scratch: bool = False,
                     schema: pa.Schema | None = None) -> UnmatchedResult:
    """Write the rows of source_files whose key is in no matched row to out_path.

    matched_path is matched.parquet, or a list of key files (a rules job: kalla/passes.py
    leaves each side's leftovers and the key files of the passes after them). ``schema`` is
    the source's schema when source_files are a copy of it; the output is always written
    under it (plain and uncompressed when it is scratch, rewritten at once by explain).
    """
    try:
        return stream_unmatched(source_files, keys, matched_path, matched_columns, out_path, scratch, schema)
    except (pl.exceptions.PolarsError, pa.ArrowException, ValueError, TypeError) as exc:
        log.info("unmatched rows via key row numbers (%s: %s)", type(exc).__name__, exc)
    rows, null_keys = unmatched_row_numbers(source_files, keys, matched_path, matched_columns)
    return UnmatchedResult(write_rows(source_files, rows, out_path, scratch=scratch, schema=schema), null_keys)
