"""PostgreSQL column types -> Arrow types, and the SQL that reads each column.

The partition reader (ADBC, binary COPY) decodes most types natively. Where its decoding
is not what Kalla promises, the column is read through an SQL expression (``col::text``,
an infinity clamp) or converted after the read (numeric text -> decimal128). The mapping:

=================================  ==============================================================
PostgreSQL                         Arrow
=================================  ==============================================================
smallint / integer / bigint        int16 / int32 / int64
real / double precision            float32 / float64
boolean                            bool
numeric(p,s), p <= 38              decimal128(p,s) (a NaN value stops the job: no decimal holds it)
numeric(p,s), p > 38               string (exact decimal text)
numeric (no typmod)                decimal128(38,18); a value that does not fit exactly (NaN,
                                   Infinity, > 20 integer or > 18 fractional digits) stops the
                                   job, naming the column: never rounded
text / varchar / char(n) / name /  string (char(n) keeps the blank padding PostgreSQL sends)
citext / enum / "char"
date                               date32; +-infinity -> 9999-12-31 / 0001-01-01
timestamp                          timestamp(us); +-infinity -> 9999-12-31 23:59:59.999999 / 0001-01-01
timestamptz                        timestamp(us, UTC); infinity clamped likewise
time                               time64(us)
interval                           string, ISO 8601 (``P1Y2M3DT4H5M6.5S``): Parquet has no
                                   month-day-nano interval, and text is exact
uuid / json / jsonb                string
bytea                              binary
int/float/bool/text/numeric arrays list<element> (a multi-dimensional value arrives flattened)
other arrays                       string: the JSON text of ``array_to_json``
anything else (money, inet, ...)   string: the value cast to text (``col::text``)
=================================  ==============================================================
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql

from ..errors import SourceError

# Domains resolve to their base type in the catalog query below (one level; a domain over a
# domain falls through to text, which is always exact).
COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS declared,
       bt.typname, bt.typtype,
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END AS typmod,
       et.typname AS elem
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_type et ON et.oid = bt.typelem AND bt.typcategory = 'A'
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# Types the ADBC driver decodes from binary COPY into exactly the Arrow type we promise.
NATIVE = {
    "int2": pa.int16(), "int4": pa.int32(), "int8": pa.int64(),
    "float4": pa.float32(), "float8": pa.float64(), "bool": pa.bool_(),
    "text": pa.string(), "varchar": pa.string(), "bpchar": pa.string(),
    "bytea": pa.binary(), "time": pa.time64("us"),
}
CLAMPED = {"date": pa.date32(), "timestamp": pa.timestamp("us"),
           "timestamptz": pa.timestamp("us", tz="UTC")}
# Python's datetime range: the clamped values still sort after/before every real date and
# convert to Python objects (pyarrow, Polars); Arrow itself could hold PostgreSQL's extremes.
CLAMP_BOUNDS = {
    "date": ("DATE '9999-12-31'", "DATE '0001-01-01'"),
    "timestamp": ("TIMESTAMP '9999-12-31 23:59:59.999999'", "TIMESTAMP '0001-01-01 00:00:00'"),
    "timestamptz": ("TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'",
                    "TIMESTAMPTZ '0001-01-01 00:00:00+00'"),
}
UNCONSTRAINED_NUMERIC = pa.decimal128(38, 18)
LIST_ELEMENTS = {name: typ for name, typ in NATIVE.items() if name not in ("bytea", "time")}


@dataclass(frozen=True)
class PgColumn:
    """One column: its Arrow type, how it is selected, how a filter refers to it."""
    name: str
    declared: str             # format_type(), for messages
    arrow: pa.DataType
    read_as: str              # "native" | "text" | "clamp" | "decimal" | "json_array"

    def select_sql(self) -> sql.Composable:
        col = sql.Identifier(self.name)
        if self.read_as == "text" or self.read_as == "decimal" and not pa.types.is_list(self.arrow):
            # numeric as text: the server's numeric_out costs less than the driver's decoding
            # of binary numeric, which took a third of the client's CPU time per row.
            expr = sql.SQL("{}::text").format(col)
        elif self.read_as == "json_array":
            expr = sql.SQL("array_to_json({})::text").format(col)
        elif self.read_as == "clamp":
            high, low = CLAMP_BOUNDS[_clamp_kind(self.arrow)]
            expr = sql.SQL("CASE WHEN {c} = 'infinity' THEN {hi} WHEN {c} = '-infinity' "
                           "THEN {lo} ELSE {c} END").format(c=col, hi=sql.SQL(high),
                                                            lo=sql.SQL(low))
        else:
            return col
        return sql.SQL("{} AS {}").format(expr, col)

    def filter_sql(self) -> sql.Composable:
        """The expression a pushed-down filter compares: the column itself where PostgreSQL's
        comparison means the same as Arrow's (so indexes apply), its text where Kalla reads
        text (uuid, enum, interval...), so that a filter means the same on every source."""
        col = sql.Identifier(self.name)
        if self.read_as == "text":
            return sql.SQL("{}::text").format(col)
        if self.read_as == "json_array":
            return sql.SQL("array_to_json({})::text").format(col)
        return col


def _clamp_kind(typ: pa.DataType) -> str:
    if pa.types.is_date(typ):
        return "date"
    return "timestamptz" if typ.tz else "timestamp"


def numeric_type(typmod: int) -> pa.DataType:
    """Arrow type of ``numeric`` with a catalog typmod (-1: unconstrained).

    >>> numeric_type(-1), numeric_type((12 << 16) + 2 + 4), numeric_type((60 << 16) + 4)
    (Decimal128Type(decimal128(38, 18)), Decimal128Type(decimal128(12, 2)), DataType(string))
    """
    if typmod < 4:
        return UNCONSTRAINED_NUMERIC
    precision = ((typmod - 4) >> 16) & 0xFFFF
    scale = (typmod - 4) & 0x7FF
    if scale & 0x400:                 # PostgreSQL 15 allows a negative scale: numeric(5,-2)
        scale -= 0x800
    if scale < 0:
        precision, scale = precision - scale, 0
    precision = max(precision, scale)  # and a scale above the precision: numeric(2,5)
    return pa.decimal128(precision, scale) if precision <= 38 else pa.string()


def column_from_catalog(row: tuple) -> PgColumn:
    """Map one row of COLUMNS_SQL to a PgColumn."""
    name, declared, typname, typtype, typmod, elem = row
    if typname in NATIVE:
        return PgColumn(name, declared, NATIVE[typname], "native")
    if typname in CLAMPED:
        return PgColumn(name, declared, CLAMPED[typname], "clamp")
    if typname == "numeric":
        arrow = numeric_type(typmod)
        return PgColumn(name, declared, arrow, "text" if pa.types.is_string(arrow) else "decimal")
    if elem is not None:
        return _array_column(name, declared, elem, typmod)
    return PgColumn(name, declared, pa.string(), "text")


def _array_column(name: str, declared: str, elem: str, typmod: int) -> PgColumn:
    if elem in LIST_ELEMENTS:
        return PgColumn(name, declared, pa.list_(LIST_ELEMENTS[elem]), "native")
    if elem == "numeric" and pa.types.is_decimal(numeric_type(typmod)):
        return PgColumn(name, declared, pa.list_(numeric_type(typmod)), "decimal")
    return PgColumn(name, declared, pa.string(), "json_array")


def arrow_schema(columns: list[PgColumn]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow) for c in columns])


def convert_batch(batch: pa.RecordBatch, columns: list[PgColumn], schema: pa.Schema,
                  label: str) -> pa.RecordBatch:
    """Turn a batch as the driver decoded it into one of exactly ``schema``."""
    arrays = [_convert(batch.column(i), col, label) for i, col in enumerate(columns)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _convert(arr: pa.Array, col: PgColumn, label: str) -> pa.Array:
    arr = _storage(arr)
    if arr.type == col.arrow:
        return arr
    if col.read_as == "decimal":
        return _to_decimal(arr, col, label)
    try:
        return arr.cast(col.arrow)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SourceError(f"{label}: column {col.name!r} ({col.declared}) arrived as "
                          f"{arr.type}, not {col.arrow}: {exc}") from None


def _storage(arr: pa.Array) -> pa.Array:
    """Drop the driver's extension wrappers (numeric, json arrive as extension-typed text)."""
    if isinstance(arr.type, pa.BaseExtensionType):
        arr = arr.storage
    if pa.types.is_list(arr.type) and isinstance(arr.type.value_type, pa.BaseExtensionType):
        arr = pa.ListArray.from_arrays(arr.offsets, _storage(arr.values), mask=arr.is_null())
    return arr


def _to_decimal(arr: pa.Array, col: PgColumn, label: str) -> pa.Array:
    # The driver sends numeric as its exact decimal text; Arrow's cast refuses any value it
    # would have to round or overflow (safe=True), so a read value is never approximated.
    try:
        return pc.cast(arr, col.arrow, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        bad = _first_bad_decimal(arr, col.arrow)
        raise SourceError(
            f"{label}: column {col.name!r} ({col.declared}) holds {bad!r}, which {col.arrow} "
            "cannot hold exactly; declare the column numeric(p,s) with p <= 38 or read it "
            "through a view that casts it (e.g. round(col, 6)::numeric(38,6))") from None


def _first_bad_decimal(arr: pa.Array, typ: pa.DataType) -> str:
    values = arr.values if pa.types.is_list(arr.type) else arr
    if pa.types.is_list(typ):
        typ = typ.value_type
    for value in values.to_pylist():   # error path only: find the value to name it
        try:
            pc.cast(pa.array([value], pa.string()), typ, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return value
    return "?"
