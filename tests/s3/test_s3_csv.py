"""CSV objects on a real S3-compatible server (moto), compared with pyarrow reading the same
bytes locally. Small head/range/tail sizes make a few-KB object cross many range edges."""
from __future__ import annotations

import gzip
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from kalla.connectors.csv_ranges import csv_options
from kalla.connectors.local import RestartRead
from kalla.connectors.s3 import S3Connector
from kalla.errors import SourceError
from kalla.filters import bind_filters
from kalla.jobs import FilterSpec, SourceSpec

pytestmark = pytest.mark.s3

SMALL = {"head_bytes": 2048, "range_bytes": 1500, "tail_bytes": 7}


@pytest.fixture
def settings(settings):
    return settings.replace(partitions=4, batch_rows=256)


def connect(uri: str, settings, **sizes) -> S3Connector:
    return S3Connector(SourceSpec("ledger", uri, "s3"), settings, **sizes)


def read_all(conn: S3Connector, filters=(), restarts: int = 5):
    """Read like the staging stage does: start over when the connector widens a column."""
    for _ in range(restarts):
        progress: list[float] = []
        try:
            batches = list(conn.batches(bind_filters("ledger", conn.schema(), filters),
                                        progress.append))
        except RestartRead:
            continue
        return batches, progress
    raise AssertionError("the schema never settled")


def table_of(batches, schema) -> pa.Table:
    return pa.Table.from_batches(batches, schema=schema)


def local_read(data: bytes, schema: pa.Schema) -> pa.Table:
    """pyarrow reading the same bytes in one piece, with Kalla's CSV conventions."""
    parse, convert = csv_options(schema)
    plain = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return pacsv.read_csv(pa.BufferReader(plain), parse_options=parse, convert_options=convert)


def records(table: pa.Table) -> Counter:
    return Counter(tuple(row.values()) for row in table.to_pylist())


def ledger(rows: int, *, newline=b"\n", final_newline=True, memo=lambda i: b"ok") -> bytes:
    lines = [b"id,ref,amount,posted,memo"]
    for i in range(rows):
        lines.append(b'%d,INV-%05d,%d.%02d,2024-01-%02d,%s'
                     % (i, i, i * 7 % 1000, i % 100, i % 28 + 1, memo(i)))
    return newline.join(lines) + (newline if final_newline else b"")


VARIANTS = {
    "crlf": ledger(600, newline=b"\r\n"),
    "no_final_newline": ledger(600, final_newline=False),
    "crlf_no_final_newline": ledger(600, newline=b"\r\n", final_newline=False),
    "quoted_comma": ledger(600, memo=lambda i: b'"net 30, paid %d"' % i),
    "escaped_quote": ledger(600, memo=lambda i: b'"the ""%d"" invoice, again"' % i),
    "empty_and_quoted_empty": ledger(600, memo=lambda i: [b"", b'""', b'","'][i % 3]),
    "quoted_newline": ledger(600, memo=lambda i: b'"line one\nline %d"' % i if i % 5 else b"x"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_csv_variant_reads_exactly_the_records_of_a_local_read(bucket, settings, name):
    data = VARIANTS[name]
    conn = connect(bucket.put(f"{name}.csv", data), settings, **SMALL)
    batches, progress = read_all(conn)
    schema = conn.schema()
    assert schema.names == ["id", "ref", "amount", "posted", "memo"]
    assert records(table_of(batches, schema)) == records(local_read(data, schema))
    assert sum(b.num_rows for b in batches) == 600
    assert progress[-1] == 1.0 and progress == sorted(progress)


def test_gzip_object_is_read_as_one_stream(bucket, settings):
    plain = VARIANTS["quoted_comma"]
    data = gzip.compress(plain)
    conn = connect(bucket.put("ledger.csv.gz", data), settings, **SMALL)
    batches, progress = read_all(conn)
    assert records(table_of(batches, conn.schema())) == records(local_read(plain, conn.schema()))
    assert progress[-1] == 1.0


def test_a_quoted_newline_in_the_head_switches_to_one_stream(bucket, settings):
    conn = connect(bucket.put("q.csv", VARIANTS["quoted_newline"]), settings, **SMALL)
    conn.schema()
    assert not conn.reader.split
    tasks, _, _ = conn.reader.plan([])
    assert tasks == ["stream"]
    whole = connect(bucket.put("q.csv", VARIANTS["quoted_newline"]), settings)
    whole.schema()
    assert whole.reader.plan([])[0] == ["head"]      # the head holds it all: no second read


def test_a_range_edge_inside_a_late_quoted_newline_fails_loudly_unless_declared(bucket, settings):
    """The head had no quoted line break, so the object is split at newlines; a range edge
    that lands in a later quoted line break must fail the read, never corrupt it."""
    data = ledger(600, memo=lambda i: b'"late\nline"' if i == 400 else b"x")
    uri = bucket.put("late.csv", data)
    edge = data.index(b'"late\n') + len(b'"late')       # the quoted newline's offset
    conn = connect(uri, settings, head_bytes=2048, tail_bytes=7)
    conn.range_bytes = edge - conn.reader.inspect().sample_end   # ranges start past the head
    with pytest.raises(SourceError, match="newlines_in_values=true"):
        read_all(conn)
    declared = connect(uri + "?newlines_in_values=true", settings, **SMALL)
    batches, _ = read_all(declared)
    schema = declared.schema()
    assert records(table_of(batches, schema)) == records(local_read(data, schema))


def test_a_late_quoted_newline_inside_one_range_is_read_correctly(bucket, settings):
    data = ledger(600, memo=lambda i: b'"late\nline"' if i == 400 else b"x")
    conn = connect(bucket.put("late-inside.csv", data), settings, head_bytes=2048,
                   range_bytes=len(data))
    batches, _ = read_all(conn)
    assert records(table_of(batches, conn.schema())) == records(local_read(data, conn.schema()))


@pytest.mark.parametrize("range_bytes", [1, 7, 64])
def test_many_small_ranges_cut_lines_at_every_kind_of_offset(bucket, settings, range_bytes):
    """Range size 1 puts a boundary at every byte: at line starts, just before a newline,
    mid-field and inside quotes; 7 and 64 mix them. Each range is its own GET."""
    rows = [b'%d,"r,%d","say ""%d""",%d.5' % (i, i, i, i) for i in range(14)]
    data = b"id,ref,memo,amount\r\n" + b"\r\n".join(rows)          # no final newline
    conn = connect(bucket.put("stress.csv", data), settings,
                   head_bytes=48, range_bytes=range_bytes, tail_bytes=1)
    batches, _ = read_all(conn)
    assert records(table_of(batches, conn.schema())) == records(local_read(data, conn.schema()))
    assert sum(b.num_rows for b in batches) == 14


def test_all_partitions_share_the_schema_inferred_from_the_head(bucket, settings):
    """Realistic drift: memo is empty in the head and text later; refs become plain digits
    later. Parsed alone, a later range would type those columns differently."""
    def memo(i):
        return b"" if i < 100 else b"adjusted by ops"
    lines = [b"id,ref,amount,memo"] + [
        b"%d,%s,%d.25,%s" % (i, b"INV-%d" % i if i < 100 else b"%d" % (90000 + i), i, memo(i))
        for i in range(1500)]
    data = b"\n".join(lines) + b"\n"
    conn = connect(bucket.put("drift.csv", data), settings, head_bytes=2048, range_bytes=4096)
    schema = conn.schema()
    assert schema.types == [pa.int64(), pa.string(), pa.float64(), pa.string()]
    batches, _ = read_all(conn)
    assert len(batches) > 5 and all(b.schema == schema for b in batches)
    assert records(table_of(batches, schema)) == records(local_read(data, schema))


def test_a_later_value_that_does_not_fit_widens_the_column_and_restarts(bucket, settings):
    lines = [b"id,amount"] + [b"%d,%s" % (i, b"%d" % i if i < 300 else b"%d.75" % i)
                              for i in range(600)]
    data = b"\n".join(lines) + b"\n"
    conn = connect(bucket.put("widen.csv", data), settings, **SMALL)
    assert conn.schema().field("amount").type == pa.int64()
    with pytest.raises(RestartRead):
        list(conn.batches([], lambda f: None))
    assert conn.schema().field("amount").type == pa.float64()
    batches, _ = read_all(conn)
    assert records(table_of(batches, conn.schema())) == records(local_read(data, conn.schema()))


def test_filters_apply_to_csv_objects(bucket, settings):
    data = VARIANTS["crlf"]
    conn = connect(bucket.put("f.csv", data), settings, **SMALL)
    filters = [FilterSpec("amount", "gte", 500), FilterSpec("posted", "between",
                                                             ("2024-01-05", "2024-01-09"))]
    batches, _ = read_all(conn, filters)
    got = records(table_of(batches, conn.schema()))
    want = [r for r in local_read(data, conn.schema()).to_pylist()
            if r["amount"] >= 500 and "2024-01-05" <= str(r["posted"]) <= "2024-01-09"]
    assert got == Counter(tuple(r.values()) for r in want) and got


def test_batches_are_bounded_and_progress_is_a_byte_fraction(bucket, settings):
    data = ledger(3000)
    conn = connect(bucket.put("big.csv", data), settings, head_bytes=8192, range_bytes=16384)
    batches, progress = read_all(conn)
    assert max(b.num_rows for b in batches) <= settings.batch_rows
    assert sum(b.num_rows for b in batches) == 3000
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert any(0.05 < p < 0.95 for p in progress)


def test_closing_the_stream_early_stops_the_partition_threads(bucket, settings):
    conn = connect(bucket.put("early.csv", ledger(3000)), settings, head_bytes=4096,
                   range_bytes=2048)
    conn.schema()
    stream = conn.batches([], lambda f: None)
    next(stream)
    assert partition_threads()
    stream.close()
    conn.close()
    assert not partition_threads()


def partition_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("kalla-fanin")]


def test_the_head_is_the_first_partition_and_a_small_object_costs_one_get(bucket, settings):
    conn = connect(bucket.put("small.csv", VARIANTS["crlf"]), settings)
    conn.schema()
    tasks, _, _ = conn.reader.plan([])
    assert tasks == ["head"]                 # the whole object came with the schema
    batches, _ = read_all(conn)
    assert sum(b.num_rows for b in batches) == 600


def test_an_empty_object_is_a_clear_error(bucket, settings):
    conn = connect(bucket.put("empty.csv", b""), settings)
    with pytest.raises(SourceError, match="ledger.*empty"):
        conn.schema()


def test_a_header_only_object_has_columns_and_no_rows(bucket, settings):
    conn = connect(bucket.put("header.csv", b"id,ref\n"), settings)
    assert conn.schema().names == ["id", "ref"]
    batches, progress = read_all(conn)
    assert batches == [] and progress[-1] == 1.0
