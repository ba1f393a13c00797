"""How Kalla reads CSV, shared by the local and the S3 connectors: same bytes, same table."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.csv as pacsv

# pyarrow infers CSV column types from the first block only; a large first block makes a
# later surprise rare, and `_widen` handles the rest by restarting with a wider type.
INFER_BLOCK_BYTES = 16 << 20
READ_BLOCK_BYTES = 8 << 20
CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): .*CSV conversion error to (\w+)")
WIDER = {"int8": pa.int64(), "int16": pa.int64(), "int32": pa.int64(), "int64": pa.float64(),
          "uint64": pa.float64(), "float": pa.float64(), "double": pa.string(),
          "bool": pa.string(), "date32": pa.timestamp("us"), "timestamp": pa.string(),
          "null": pa.string()}


def csv_options(column_types=None, column_names=None):
    # Quoted fields follow RFC 4180: '"' quotes, '""' escapes a quote, and a quoted field may
    # hold commas and newlines (newlines_in_values) - where a file is read as one stream,
    # so record boundaries are never guessed. An empty field is NULL, as in DuckDB and
    # Polars (pyarrow cannot keep a quoted "" apart from NULL once newlines_in_values is on).
    parse = pacsv.ParseOptions(delimiter=",", quote_char='"', double_quote=True,
                               newlines_in_values=True)
    convert = pacsv.ConvertOptions(column_types=column_types or {}, strings_can_be_null=True,
                                   quoted_strings_can_be_null=True)
    return parse, convert


class RestartRead(Exception):
    """Raised by a connector whose inferred schema changed mid-read: read again from the start."""
