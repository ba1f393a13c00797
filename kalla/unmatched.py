"""Records that matched nothing: Polars anti-joins on each side's primary key.

Only the key columns go through Polars (with a row number); the full rows are then
fetched with pyarrow, row group by row group, so every source column keeps its exact
Arrow type (decimals, dates, intervals, lists...) and memory holds one batch at a time.
A key containing NULL never matches (``nulls_equal=False``): such rows are unmatched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

ROW = "__kalla_row"


@dataclass
class UnmatchedResult:
    rows: int
    null_key_rows: int


def unmatched_row_numbers(source_files: Sequence[str], keys: Sequence[str], matched_path: str,
                          matched_columns: Sequence[str]) -> tuple[np.ndarray, int]:
    """Sorted row numbers (over source_files in order) whose key is in no matched row."""
    source = pl.scan_parquet(list(source_files)).select(list(keys)).with_row_index(ROW)
    dtypes = source.collect_schema()
    matched = (pl.scan_parquet(matched_path)
               .select([pl.col(m).cast(dtypes[k], strict=False).alias(k)
                        for m, k in zip(matched_columns, keys)])
               .drop_nulls()
               .unique())
    anti = source.join(matched, on=list(keys), how="anti", nulls_equal=False)
    null_keys = source.filter(pl.any_horizontal([pl.col(k).is_null() for k in keys])).select(pl.len())
    rows, nulls = pl.collect_all([anti.select(ROW).sort(ROW), null_keys], engine="streaming")
    return rows[ROW].to_numpy(), int(nulls.item())


def write_rows(source_files: Sequence[str], rows: np.ndarray, out_path: str,
               batch_rows: int = 65536) -> int:
    """Copy the given row numbers of the source files into out_path; return rows written."""
    schema = pq.read_schema(source_files[0]) if source_files else pa.schema([])
    written, offset = 0, 0
    with pq.ParquetWriter(out_path, schema) as writer:
        for path in source_files:
            parquet = pq.ParquetFile(path)
            for group in range(parquet.num_row_groups):
                size = parquet.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(rows, [offset, offset + size])
                if hi > lo:   # skip row groups where everything matched
                    table = parquet.read_row_group(group)
                    picked = table.take(pa.array(rows[lo:hi] - offset))
                    writer.write_table(picked.cast(schema), row_group_size=batch_rows * 16)
                    written += picked.num_rows
                offset += size
    return written


def derive_unmatched(source_files: Sequence[str], keys: Sequence[str], matched_path: str,
                     matched_columns: Sequence[str], out_path: str) -> UnmatchedResult:
    rows, null_keys = unmatched_row_numbers(source_files, keys, matched_path, matched_columns)
    return UnmatchedResult(write_rows(source_files, rows, out_path), null_keys)
