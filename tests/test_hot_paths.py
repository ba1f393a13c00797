"""pytest-benchmark micro-benchmarks of the hot paths (they run, briefly, in `make test`;
`pytest tests/test_hot_paths.py --benchmark-only` gives the timing table). Each also checks
its result, so a benchmark that measures the wrong thing fails."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.connectors import csv_ranges, pg_partitions
from kalla.keys import resolve_key_columns
from kalla.outputs import BackgroundWriter, writer_options
from kalla.unmatched import derive_unmatched

pytestmark = pytest.mark.benchmark(group="hot paths", min_rounds=3, max_time=0.5)


def test_pg_range_planning(benchmark):
    ranges = benchmark(pg_partitions.plan_ranges, 10_000_000, 8)
    assert len(ranges) == 8 and ranges[-1].stop is None


def test_s3_range_planning(benchmark):
    ranges = benchmark(csv_ranges.plan_ranges, 8 << 20, 5 << 30, 32 << 20)
    assert ranges[0][0] == 8 << 20 and ranges[-1][1] == 5 << 30


def test_key_resolution(benchmark):
    names = [f"col{i}" for i in range(200)] + ["left_src__id", "right_src.id", "region"]
    keys = {"left_src": ["id", "region"], "right_src": ["id"]}
    found = benchmark(resolve_key_columns, names, ["left_src", "right_src"], keys)
    assert found == {"left_src": ["left_src__id", "region"], "right_src": ["right_src.id"]}


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    base = tmp_path_factory.mktemp("hot")
    n = 200_000
    rng = np.random.default_rng(5)
    source = base / "source.parquet"
    pq.write_table(pa.table({"id": np.arange(n), "amount": rng.uniform(0, 1e4, n),
                             "memo": pa.array([f"m{i % 997}" for i in range(n)])}), source)
    matched = base / "matched.parquet"
    pq.write_table(pa.table({"id": rng.permutation(n)[: n * 3 // 4]}), matched)
    return base, str(source), str(matched), n


def test_anti_join(benchmark, sides):
    base, source, matched, n = sides
    result = benchmark.pedantic(derive_unmatched, args=([source], ["id"], matched, ["id"],
                                                        str(base / "unmatched.parquet")), rounds=3)
    assert result.rows == n - n * 3 // 4 and result.null_key_rows == 0


@pytest.mark.parametrize("writer", ["plain", "background"])
def test_parquet_writers(benchmark, sides, writer):
    base, source, _, n = sides
    batches = pq.read_table(source).to_batches(max_chunksize=8192)
    out = str(base / f"{writer}.parquet")

    def write():
        schema = batches[0].schema
        sink = (BackgroundWriter(out, schema) if writer == "background"
                else pq.ParquetWriter(out, schema, **writer_options(schema)))
        with sink:
            for batch in batches:
                sink.write_batch(batch)

    benchmark.pedantic(write, rounds=3)
    assert pq.ParquetFile(out).metadata.num_rows == n
