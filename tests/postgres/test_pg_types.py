"""Every PostgreSQL type Kalla promises, read into Arrow exactly (NULLs everywhere)."""
from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa
import pytest

from kalla.errors import SourceError

D = decimal.Decimal
UTC = dt.timezone.utc

SCHEMA = pa.schema([
    ("id", pa.int32()), ("n", pa.decimal128(12, 2)), ("nu", pa.decimal128(38, 18)),
    ("nbig", pa.string()), ("i2", pa.int16()), ("i4", pa.int32()), ("i8", pa.int64()),
    ("r", pa.float32()), ("d", pa.float64()), ("b", pa.bool_()), ("tx", pa.string()),
    ("vc", pa.string()), ("ch", pa.string()), ("ci", pa.string()), ("en", pa.string()),
    ("dt", pa.date32()), ("ts", pa.timestamp("us")), ("tz", pa.timestamp("us", tz="UTC")),
    ("tm", pa.time64("us")), ("iv", pa.string()), ("u", pa.string()), ("js", pa.string()),
    ("jb", pa.string()), ("by", pa.binary()), ("ai", pa.list_(pa.int32())),
    ("at", pa.list_(pa.string())), ("an", pa.list_(pa.decimal128(5, 1))), ("ad", pa.string()),
    ("dom", pa.decimal128(10, 2)), ("mo", pa.string()), ("ip", pa.string()),
])

ROW1 = {
    "id": 1, "n": D("12345.67"), "nu": D("1.234567890123000000"),
    "nbig": "12345678901234567890123456789.0123456789", "i2": -32768, "i4": 2147483647,
    "i8": 9223372036854775807, "r": 1.5, "d": 2.25, "b": True, "tx": 'héllo, "w"', "vc": "v",
    "ch": "ab ", "ci": "CiT", "en": "happy", "dt": dt.date(2024, 2, 29),
    "ts": dt.datetime(2024, 1, 1, 12, 34, 56, 123456),
    "tz": dt.datetime(2024, 1, 1, 10, 34, 56, 123456, tzinfo=UTC),
    "tm": dt.time(23, 59, 59, 999999), "iv": "P1Y2M3DT4H5M6.5S",
    "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "js": '{"a": [1, 2]}', "jb": '{"b": null}',
    "by": b"\x00\xff\x10", "ai": [1, None, 3], "at": ["x,y", None, ""], "an": [D("1.5"), None],
    "ad": '["2024-01-01","infinity"]', "dom": D("10.50"), "ip": "10.0.0.1/8",
}
ROW3 = {
    "n": D("-0.01"), "nu": D("-0.000000000000000001"), "nbig": "0.0000000000", "d": float("-inf"),
    "b": False, "tx": "", "vc": "", "ch": "   ", "ci": "", "en": "sad",
    "dt": dt.date(9999, 12, 31), "ts": dt.datetime(1, 1, 1),
    "tz": dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "tm": dt.time(0, 0),
    "iv": "P-1M", "u": "00000000-0000-0000-0000-000000000000", "js": "null", "jb": "[]",
    "by": b"", "ai": [], "at": [], "an": [], "ad": "[]", "ip": "::1/128",
}


def test_schema_maps_every_type(types_rows):
    schema, table = types_rows
    assert schema == SCHEMA
    assert table.schema == SCHEMA


def test_values_round_trip(types_rows, pg):
    _, table = types_rows
    row1 = table.slice(0, 1).to_pylist()[0]
    money = pg.execute("SELECT 12.5::money::text")[0][0]
    assert row1 == {**ROW1, "mo": money}
    row3 = table.slice(2, 1).to_pylist()[0]
    assert {k: row3[k] for k in ROW3} == ROW3
    assert row3["r"] != row3["r"]                            # real NaN stays NaN


def test_nulls_everywhere(types_rows):
    _, table = types_rows
    row2 = table.slice(1, 1).to_pylist()[0]
    assert row2 == {**{name: None for name in SCHEMA.names}, "id": 2}


def test_dates_outside_pythons_range_keep_their_value(types_rows, pg):
    """BC dates and years past 9999 are exact Arrow values (as days / microseconds)."""
    _, table = types_rows
    row4 = table.slice(3, 1)
    days = pg.execute("SELECT DATE '0044-03-15 BC' - DATE '1970-01-01'")[0][0]
    assert row4.column("dt").cast(pa.int32()).to_pylist() == [days]
    micros = pg.execute("SELECT (extract(epoch FROM TIMESTAMP '10000-01-01') * 1e6)::int8")[0][0]
    assert row4.column("ts").cast(pa.int64()).to_pylist() == [micros]
    assert row4.column("tx").to_pylist() == ["line\nbreak\\N"]
    assert row4.column("vc").to_pylist() == ["NULL"]


@pytest.mark.parametrize("declared, value, shown", [
    ("numeric(10,2)", "'NaN'", "NaN"),
    ("numeric", "1e-20", "0.00000000000000000001"),
    ("numeric", "1e25", "10000000000000000000000000"),
    ("numeric", "'Infinity'", "Infinity"),
])
def test_numbers_no_decimal_holds_stop_the_read(pg, make_connector, declared, value, shown):
    table = pg.qualified(f"badnum_{abs(hash((declared, value)))}")
    pg.execute(f"CREATE TABLE {table} (id int, x {declared})")
    pg.execute(f"INSERT INTO {table} VALUES (1, 1), (2, {value})")
    connector = make_connector(pg.uri(table))
    connector.schema()
    with pytest.raises(SourceError) as info:
        list(connector.batches([], lambda f: None))
    assert f"column 'x' ({declared}) holds '{shown}'" in str(info.value)
    assert "source 'pg_src'" in str(info.value)
