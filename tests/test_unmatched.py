"""The unmatched stage's anti-join: a set-membership filter for single-column keys must give
exactly the rows, in exactly the order, that Polars' join with how="anti" gives."""
from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.unmatched import _anti_join, _matched_keys, stream_unmatched

N = 2000


def values(kind: str, rng: random.Random) -> list:
    pick = {
        "int64": lambda i: i,
        "string": lambda i: f"INV-{i:05d}",
        "date": lambda i: dt.date(2020, 1, 1) + dt.timedelta(days=i),
        "decimal": lambda i: Decimal(i) / 100,
    }[kind]
    # NULLs and duplicated keys on purpose
    return [None if rng.random() < 0.05 else pick(rng.randrange(N // 2)) for _ in range(N)]


TYPES = {"int64": pa.int64(), "string": pa.string(), "date": pa.date32(), "decimal": pa.decimal128(10, 2)}


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_membership_filter_equals_the_anti_join(tmp_path, kind):
    rng = random.Random(kind)
    keys = values(kind, rng)
    source = pa.table({"k": pa.array(keys, TYPES[kind]), "row": list(range(N))})
    # matched keys: some of the source's, some that are nowhere, NULLs, duplicates
    matched_keys = [k for k in keys if rng.random() < 0.5] + values(kind, random.Random(1))[:50]
    pq.write_table(source, tmp_path / "s.parquet")
    pq.write_table(pa.table({"mk": pa.array(matched_keys, TYPES[kind])}), tmp_path / "m.parquet")
    scan = pl.scan_parquet(tmp_path / "s.parquet")
    matched = _matched_keys(["k"], str(tmp_path / "m.parquet"), ["mk"], scan.collect_schema())
    by_filter = _anti_join(scan, ["k"], matched).collect()
    by_join = scan.join(matched, on="k", how="anti", nulls_equal=False, maintain_order="left").collect()
    assert by_filter.equals(by_join)
    taken = {k for k in matched_keys if k is not None}
    assert by_filter["row"].to_list() == [i for i, k in enumerate(keys) if k is None or k not in taken]


def test_stream_unmatched_keeps_null_keys_and_counts_them(tmp_path):
    source = pa.table({"id": pa.array([1, None, 2, 3, None], pa.int64()), "v": list("abcde")})
    pq.write_table(source, tmp_path / "s.parquet")
    pq.write_table(pa.table({"id": pa.array([2, None, 9], pa.int64())}), tmp_path / "m.parquet")
    result = stream_unmatched([str(tmp_path / "s.parquet")], ["id"], str(tmp_path / "m.parquet"), ["id"],
                              str(tmp_path / "u.parquet"))
    assert (result.rows, result.null_key_rows) == (4, 2)
    assert pq.read_table(tmp_path / "u.parquet").column("v").to_pylist() == ["a", "b", "d", "e"]
