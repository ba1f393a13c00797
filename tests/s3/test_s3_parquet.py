"""Parquet on a real S3-compatible server: one object, a prefix, a glob; row groups; filters."""
from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.connectors.s3 import S3Connector
from kalla.errors import SourceError
from kalla.filters import bind_filters
from kalla.jobs import FilterSpec, SourceSpec

pytestmark = pytest.mark.s3


@pytest.fixture
def settings(settings):
    return settings.replace(partitions=3, batch_rows=100)


def payments(first: int, rows: int) -> pa.Table:
    ids = list(range(first, first + rows))
    return pa.table({"payment_id": [f"P{i:05d}" for i in ids],
                     "amount": pa.array([i * 1.5 for i in ids], pa.float64()),
                     "day": pa.array([i % 28 + 1 for i in ids], pa.int32())})


def parquet_bytes(table: pa.Table, row_group_size: int = 250) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=row_group_size)
    return sink.getvalue()


def read(uri: str, settings, filters=()):
    conn = S3Connector(SourceSpec("payments", uri, "s3"), settings)
    bound = bind_filters("payments", conn.schema(), filters)
    progress: list[float] = []
    batches = list(conn.batches(bound, progress.append))
    conn.close()
    return conn, batches, progress


def records(batches) -> Counter:
    return Counter(tuple(r.values()) for b in batches for r in b.to_pylist())


def test_one_parquet_object_is_read_by_row_group(bucket, settings):
    table = payments(0, 1000)
    conn, batches, progress = read(bucket.put("p/one.parquet", parquet_bytes(table)), settings)
    assert conn.schema() == table.schema
    assert records(batches) == records(table.to_batches())
    assert len(batches) >= 4 and max(b.num_rows for b in batches) <= settings.batch_rows
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) > 2


def test_a_prefix_reads_every_parquet_object_under_it(bucket, settings):
    parts = [payments(i * 300, 300) for i in range(3)]
    for i, part in enumerate(parts):
        bucket.put(f"exports/2024/part-{i}.parquet", parquet_bytes(part, 100))
    bucket.put("exports/2024/_SUCCESS", b"")                       # Spark's marker, skipped
    bucket.put("exports-other/ignored.parquet", parquet_bytes(payments(9000, 5)))
    for uri in (f"s3://{bucket.name}/exports/2024/", f"s3://{bucket.name}/exports"):
        _, batches, _ = read(uri, settings)
        assert records(batches) == records(b for p in parts for b in p.to_batches())


def test_a_glob_reads_the_matching_objects_only(bucket, settings):
    keep = payments(0, 200)
    bucket.put("g/a.parquet", parquet_bytes(keep))
    bucket.put("g/b.txt", b"not parquet")
    bucket.put("g/deeper/c.parquet", parquet_bytes(payments(500, 10)))
    _, batches, _ = read(f"s3://{bucket.name}/g/*.parquet", settings)
    assert records(batches) == records(keep.to_batches())


def test_filters_are_pushed_down_and_exact(bucket, settings):
    table = payments(0, 1000)
    uri = bucket.put("f/p.parquet", parquet_bytes(table))
    filters = [FilterSpec("amount", "gte", 600), FilterSpec("day", "in", [1, 2, 3])]
    conn, batches, progress = read(uri, settings, filters)
    want = [r for r in table.to_pylist() if r["amount"] >= 600 and r["day"] in (1, 2, 3)]
    assert conn.pushes_down_filters
    assert records(batches) == Counter(tuple(r.values()) for r in want) and want
    assert progress[-1] == 1.0


def test_row_groups_ruled_out_by_statistics_are_not_scanned(bucket, settings):
    uri = bucket.put("s/p.parquet", parquet_bytes(payments(0, 1000), row_group_size=100))
    conn = S3Connector(SourceSpec("payments", uri, "s3"), settings)
    bound = bind_filters("payments", conn.schema(), [FilterSpec("payment_id", "lt", "P00150")])
    groups, _, _ = conn.reader.plan(bound)
    assert len(groups) == 2                    # of ten row groups, only the first two may match
    assert records(conn.batches(bound, lambda f: None)) == records(
        payments(0, 150).to_batches())


def test_an_empty_prefix_is_a_clear_error(bucket, settings):
    bucket.put("there/_SUCCESS", b"")
    for key in ("nothing-here/", "there/", "there/*.parquet"):
        with pytest.raises(SourceError, match="payments.*(no objects under|no Parquet objects)"):
            read(f"s3://{bucket.name}/{key}", settings)


def test_a_non_parquet_object_is_a_source_error(bucket, settings):
    uri = bucket.put("bad/p.parquet", b"PAR1 this is not really parquet")
    with pytest.raises(SourceError, match="payments.*Parquet"):
        read(uri, settings)
