"""Filters: bound to a source schema, then applied as Arrow expressions or pushed down.

``bind_filters`` checks each column against the source schema and converts each value to
the column's type (``"2024-01-31"`` on a date column, ``"100.5"`` on a decimal one), so
values are typed literals - never pasted text. A bad column or value fails the job
before any read, naming the source, column and value.
"""
from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from .errors import InvalidInput


@dataclass(frozen=True)
class BoundFilter:
    column: str
    op: str
    value: Any            # a Python value of the column's type (tuple for between / in)
    type: pa.DataType     # the column's Arrow type
    compare_as: pa.DataType | None = None   # cast the column first (int column vs 2.5)

    def describe(self) -> str:
        return f"{self.column} {self.op} {self.value!r}"


def bind_filters(source_alias: str, schema: pa.Schema, filters: Sequence) -> list[BoundFilter]:
    bound = []
    for i, f in enumerate(filters):
        where = f"sources[{source_alias}].filters[{i}]"
        index = schema.get_field_index(f.column)
        if index < 0:
            raise InvalidInput(f"{where}.column",
                               f"source {source_alias!r} has no column {f.column!r} "
                               f"(columns: {', '.join(schema.names)})")
        typ = schema.field(index).type
        try:
            bound.append(_bind_one(f, typ))
        except (ValueError, TypeError, ArithmeticError, pa.ArrowException) as exc:
            raise InvalidInput(f"{where}.value",
                               f"source {source_alias!r}, column {f.column!r} ({typ}): "
                               f"cannot use {f.value!r} here: {exc}") from None
    return bound


def _bind_one(f, typ: pa.DataType) -> BoundFilter:
    if f.op == "like":
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)
                or pa.types.is_string_view(typ)):
            raise ValueError("'like' works on text columns only")
        return BoundFilter(f.column, f.op, f.value, typ)
    if f.op in ("between", "in"):
        values = tuple(convert_value(v, typ) for v in f.value)
        compare_as = _float_fallback(f.value, typ)
        if compare_as is not None:
            values = tuple(float(v) for v in f.value)
        return BoundFilter(f.column, f.op, values, typ, compare_as)
    compare_as = _float_fallback((f.value,), typ)
    value = float(f.value) if compare_as is not None else convert_value(f.value, typ)
    return BoundFilter(f.column, f.op, value, typ, compare_as)


def _float_fallback(values, typ) -> pa.DataType | None:
    """An integer column compared with a fractional number is compared as float64."""
    if pa.types.is_integer(typ) and any(isinstance(v, float) and not v.is_integer() for v in values):
        return pa.float64()
    return None


def convert_value(value: Any, typ: pa.DataType) -> Any:
    """Convert a JSON filter value to a Python value of the Arrow type ``typ``.

    >>> convert_value("2024-01-31", pa.date32())
    datetime.date(2024, 1, 31)
    >>> convert_value("100.5", pa.decimal128(10, 2))
    Decimal('100.5')
    >>> convert_value(3.0, pa.int64())
    3
    """
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return value if isinstance(value, str) else _number_text(value)
    if pa.types.is_boolean(typ):
        text = str(value).strip().lower()
        if text in ("true", "t", "1", "yes"):
            return True
        if text in ("false", "f", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if pa.types.is_integer(typ):
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError("not an integer")
            return int(value)
        return int(str(value).strip())
    if pa.types.is_floating(typ):
        return float(value)
    if pa.types.is_decimal(typ):
        number = decimal.Decimal(str(value).strip())
        if not number.is_finite():
            raise ValueError("not a finite number")
        return number
    if pa.types.is_date(typ):
        return dt.date.fromisoformat(str(value).strip())
    if pa.types.is_timestamp(typ):
        stamp = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        if typ.tz and stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.timezone.utc)
        if not typ.tz and stamp.tzinfo is not None:
            stamp = stamp.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return stamp
    if pa.types.is_time(typ):
        return dt.time.fromisoformat(str(value).strip())
    raise ValueError(f"filters on {typ} columns are not supported")


def _number_text(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _literal(value: Any, typ: pa.DataType) -> pa.Scalar:
    if pa.types.is_decimal(typ):
        return pa.scalar(value)    # its own precision: comparisons widen, never round
    return pa.scalar(value, type=typ)


def arrow_expression(filters: Sequence[BoundFilter]) -> pc.Expression | None:
    """All filters AND-ed into one Arrow expression (None when there are none)."""
    expr = None
    for f in filters:
        one = _expression(f)
        expr = one if expr is None else expr & one
    return expr


def _expression(f: BoundFilter) -> pc.Expression:
    field = pc.field(f.column)
    typ = f.type
    if f.compare_as is not None:
        field = field.cast(f.compare_as)
        typ = f.compare_as
    if f.op == "like":
        return pc.match_like(field, f.value)
    if f.op == "between":
        low, high = (_literal(v, typ) for v in f.value)
        return (field >= low) & (field <= high)
    if f.op == "in":
        values = pa.array(f.value, type=typ if not pa.types.is_decimal(typ) else None)
        if pa.types.is_decimal(typ):
            values = values.cast(pa.decimal128(38, max(typ.scale, values.type.scale)))
            field = field.cast(values.type)
        return pc.is_in(field, value_set=values)
    literal = _literal(f.value, typ)
    return {"eq": field == literal, "neq": field != literal, "gt": field > literal,
            "gte": field >= literal, "lt": field < literal, "lte": field <= literal}[f.op]


def apply_filters(batch: pa.RecordBatch, filters: Sequence[BoundFilter]) -> pa.RecordBatch:
    """Keep the rows of ``batch`` where every filter is true (NULL counts as false, as in SQL)."""
    expr = arrow_expression(filters)
    return batch if expr is None else batch.filter(expr)
