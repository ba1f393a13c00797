"""Local CSV and Parquet sources: streaming, quoting, one schema, progress, types kept."""
from __future__ import annotations

import datetime as dt
import decimal
import gzip

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.connectors import connector_for
from kalla.connectors import local
from kalla.filters import bind_filters
from kalla.jobs import FilterSpec, parse_job, parse_source
from kalla.pipeline import run_job


def read_all(path, settings, filters=()):
    source = parse_source({"alias": "s", "uri": str(path)}, "")
    connector = connector_for(source, settings)
    bound = bind_filters("s", connector.schema(), [FilterSpec(*f) for f in filters])
    progress = []
    batches = list(connector.batches(bound, progress.append))
    table = pa.Table.from_batches(batches, schema=connector.schema())
    return table, progress


QUOTED = ('id,name,memo\r\n'
          '1,"Smith, John","said ""hi"""\r\n'
          '2,"multi\nline",plain\r\n'
          '3,,""\r\n'
          '4,last,no final newline')


def test_csv_quoting_crlf_and_nulls(tmp_path, settings):
    path = tmp_path / "q.csv"
    path.write_bytes(QUOTED.encode())
    table, progress = read_all(path, settings)
    assert table.column("id").to_pylist() == [1, 2, 3, 4]
    assert table.column("name").to_pylist() == ["Smith, John", "multi\nline", None, "last"]
    assert table.column("memo").to_pylist() == ['said "hi"', "plain", None, "no final newline"]
    assert progress[-1] == 1.0


def test_csv_gzip(tmp_path, settings):
    path = tmp_path / "q.csv.gz"
    path.write_bytes(gzip.compress(QUOTED.encode()))
    table, _ = read_all(path, settings)
    assert table.num_rows == 4


def test_csv_one_schema_for_the_whole_file(tmp_path, settings, monkeypatch):
    # The type inferred from the first block (int) does not fit a later value (2.5):
    # the column is widened and the file read again, so every row gets one type.
    monkeypatch.setattr(local, "INFER_BLOCK_BYTES", 64)
    monkeypatch.setattr(local, "READ_BLOCK_BYTES", 64)
    lines = ["id,amount,code"] + [f"{i},{i},{i}" for i in range(200)] + ["200,2.5,X7"]
    path = tmp_path / "w.csv"
    path.write_text("\n".join(lines) + "\n")
    job = parse_job({"match_sql": "SELECT a.id AS a__id, b.id AS b__id FROM a JOIN b ON a.id = b.id",
                     "sources": [{"alias": "a", "uri": str(path)}, {"alias": "b", "uri": str(path)}],
                     "output_path": str(tmp_path / "out"), "primary_keys": {"a": ["id"], "b": ["id"]}},
                    batch=True)
    result = run_job(job, settings)
    assert result["matched_count"] == 201 and result["source_rows"] == {"a": 201, "b": 201}
    unmatched = pq.read_schema(result["output_paths"]["unmatched_left"])
    assert unmatched.field("amount").type == pa.float64()
    assert unmatched.field("code").type == pa.string()


def test_parquet_file_directory_and_glob(tmp_path, settings):
    directory = tmp_path / "parts"
    directory.mkdir()
    for part in range(3):
        pq.write_table(pa.table({"id": range(part * 10, part * 10 + 10)}), directory / f"p{part}.parquet")
    for uri in (directory / "p0.parquet", directory, f"{directory}/p*.parquet"):
        table, progress = read_all(uri, settings, [("id", "lt", 25)])
        expected = 10 if str(uri).endswith("p0.parquet") else 25
        assert table.num_rows == expected and progress[-1] == 1.0


def test_progress_is_a_real_fraction(tmp_path, settings):
    path = tmp_path / "rg.parquet"
    pq.write_table(pa.table({"id": range(10_000)}), path, row_group_size=1000)
    _, progress = read_all(path, settings, [("id", "gte", 9_000)])
    assert progress[:3] == [0.1, 0.2, 0.3] and progress[-1] == 1.0


TYPED = pa.table({
    "id": pa.array([1, 2, 3], pa.int32()),
    "amount": pa.array([decimal.Decimal("10.50"), None, decimal.Decimal("-3.25")], pa.decimal128(14, 2)),
    "booked": pa.array([dt.date(2024, 1, 31), dt.date(2024, 2, 1), None]),
    "at": pa.array([dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone.utc), None,
                    dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)], pa.timestamp("us", tz="UTC")),
    "flag": [True, None, False],
    "ratio": pa.array([0.5, 1.5, None], pa.float32()),
    "blob": pa.array([b"\x00\x01", None, b""], pa.binary()),
    "tags": pa.array([["a", "b"], [], None], pa.list_(pa.string())),
    "clock": pa.array([dt.time(8, 30), None, dt.time(23, 59, 59)], pa.time64("us")),
})


@pytest.mark.parametrize("filters", [[], [{"column": "id", "op": "gte", "value": 0}]],
                         ids=["registered-in-place", "staged"])
def test_unmatched_rows_keep_their_types(tmp_path, settings, filters):
    left = tmp_path / "typed.parquet"
    pq.write_table(TYPED, left)
    right = tmp_path / "none.parquet"
    pq.write_table(pa.table({"rid": pa.array([2], pa.int32())}), right)
    job = parse_job({"match_sql": "SELECT t.id, r.rid FROM t JOIN r ON t.id = r.rid",
                     "sources": [{"alias": "t", "uri": str(left), "filters": filters},
                                 {"alias": "r", "uri": str(right)}],
                     "output_path": str(tmp_path / "out"), "primary_keys": {"t": ["id"], "r": ["rid"]}},
                    batch=True)
    result = run_job(job, settings)
    unmatched = pq.read_table(result["output_paths"]["unmatched_left"])
    assert unmatched.schema.equals(TYPED.schema)
    assert unmatched.to_pylist() == [TYPED.slice(0, 1).to_pylist()[0], TYPED.slice(2, 1).to_pylist()[0]]
    assert result["unmatched_right_count"] == 0
