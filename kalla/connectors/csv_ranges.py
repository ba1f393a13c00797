"""Record boundaries of a CSV object cut into byte ranges, and what its head tells us.

Pure functions (no I/O): the S3 connector injects ``fetch(offset, nbytes)``, the tests
fetch from local bytes, so every boundary rule is checked exhaustively without a server.

The rule (docs/s3.md): an object is split only when no quoted field holds a line break.
Then every ``\\n`` ends a record, so a record begins at ``data_start`` (just past the header)
or right after a ``\\n``. A range ``[start, end)`` owns the records that *begin* inside it:
it skips to the first record start at or after ``start`` and reads past ``end`` up to the
first record start at or after ``end`` - which is exactly where the next range begins, so
every record is read once. ``\\r\\n`` needs nothing special (the ``\\r`` stays with its record
and the CSV parser drops it); a missing final newline just means the last range ends at
the object's size. Whether the rule holds is decided from the head (``inspect_head``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from .csvformat import csv_options as base_csv_options   # one definition of how Kalla reads CSV: same bytes, same table

TAIL_BYTES = 64 * 1024      # first read past a range's end to finish its last record
NEWLINE = b"\n"
_NEWLINE = re.compile(NEWLINE)

# Bytes handed to pyarrow's CSV reader are Arrow-allocated ``pa.Buffer``s, never Python
# bytes: the threaded reader drops its last reference to the input on a pool thread after
# read_csv returns, and releasing a Python-owned buffer there takes the GIL - at interpreter
# exit that thread is killed inside a C++ destructor and the process aborts.
Fetch = Callable[[int, int], pa.Buffer]


def find_newline(buf: pa.Buffer, start: int, end: int | None = None) -> int:
    """Index of the first newline in ``buf[start:end]``, or -1 (searched without a copy).

    >>> find_newline(pa.py_buffer(b"ab\\ncd\\n"), 3)
    5
    """
    found = _NEWLINE.search(memoryview(buf), start, len(buf) if end is None else end)
    return found.start() if found else -1


def concat(first: pa.Buffer, second: pa.Buffer) -> pa.Buffer:
    """One Arrow-allocated buffer holding ``first`` then ``second``."""
    out = pa.allocate_buffer(len(first) + len(second))
    view = memoryview(out)
    view[:len(first)] = memoryview(first)
    view[len(first):] = memoryview(second)
    return out


def plan_ranges(start: int, end: int, range_bytes: int) -> list[tuple[int, int]]:
    """Cut ``[start, end)`` into consecutive ranges of ``range_bytes`` (the last may be shorter).

    >>> plan_ranges(10, 35, 10)
    [(10, 20), (20, 30), (30, 35)]
    >>> plan_ranges(7, 7, 10)
    []
    """
    if range_bytes < 1:
        raise ValueError("range_bytes must be 1 or more")
    return [(s, min(s + range_bytes, end)) for s in range(start, end, range_bytes)]


def read_span(fetch: Fetch, start: int, end: int, size: int, data_start: int,
              tail: int = TAIL_BYTES) -> tuple[int, pa.Buffer]:
    """Return ``(offset, bytes)`` of the whole records that begin in ``[start, end)``.

    The first fetch covers one byte before ``start`` (a record begins at ``x`` when byte
    ``x - 1`` is a newline) through ``tail`` bytes past ``end``; only a record longer than
    that costs further fetches, each twice as long as the one before.

    >>> data = b"h\\nab\\ncd\\nef"
    >>> fetch = lambda offset, n: pa.py_buffer(data[offset:offset + n])
    >>> [bytes(read_span(fetch, s, e, len(data), 2, tail=1)[1]) for s, e in [(2, 6), (6, 11)]]
    [b'ab\\ncd\\n', b'ef']
    """
    lo = start if start <= data_start else start - 1
    buf = fetch(lo, min(end + tail, size) - lo)
    if start <= data_start:
        first = data_start
    else:
        newline = find_newline(buf, 0, end - 1 - lo)
        if newline < 0:                       # no record begins inside this range
            return end, buf.slice(0, 0)
        first = lo + newline + 1
    if end >= size:
        return first, buf.slice(first - lo)
    buf, last = _finish_record(fetch, buf, lo, end, size, max(tail, 1))
    return first, buf.slice(first - lo, last - first)


def _finish_record(fetch: Fetch, buf: pa.Buffer, lo: int, end: int, size: int,
                   grow: int) -> tuple[pa.Buffer, int]:
    """Extend ``buf`` until it holds the first record start at or after ``end``."""
    searched = end - 1 - lo
    while True:
        newline = find_newline(buf, searched)
        if newline >= 0:
            return buf, lo + newline + 1
        if lo + len(buf) >= size:
            return buf, size                  # the object's last record has no final newline
        searched = len(buf)
        more = fetch(lo + len(buf), min(grow, size - lo - len(buf)))
        if not more:
            raise EOFError(f"object ended at byte {lo + len(buf)}, expected {size} bytes")
        buf = concat(buf, more)
        grow *= 2


# ---------------------------------------------------------------------------- the head

@dataclass(frozen=True)
class CsvHead:
    """What the first bytes of a CSV object decide for the whole object."""
    schema: pa.Schema        # one schema for every range (all-empty columns read as text)
    data_start: int          # byte offset just past the header record
    sample_end: int          # the head's whole records end here: the ranges start here
    rows: pa.Table           # those records, parsed (the first range's data, already read)
    splittable: bool         # False: a line break inside a quoted field, or a bare CR
    reason: str = ""         # why not splittable, for the log


def csv_options(schema: pa.Schema | None = None, newlines_in_values: bool = True):
    """Parse and convert options shared with local CSV sources."""
    parse, convert = base_csv_options(dict(zip(schema.names, schema.types)) if schema else None)
    parse.newlines_in_values = newlines_in_values
    return parse, convert


def inspect_head(head: pa.Buffer | bytes, complete: bool) -> CsvHead:
    """Infer the schema from ``head`` and decide whether the object may be split.

    ``complete`` says ``head`` is the whole object. Otherwise the sample ends at the head's
    last newline; should that newline sit inside a quoted field (the parse then fails), it
    ends at the last newline with an even number of quotes before it instead.
    """
    buf = head if isinstance(head, pa.Buffer) else pa.py_buffer(head)
    data = buf.to_pybytes()                   # searched here; pyarrow parses ``buf`` itself
    if not data.strip():
        raise ValueError("the object is empty; a CSV source needs a header row")
    if complete:
        end = len(data)
        if NEWLINE not in data:               # a lone header, unterminated
            buf, data = concat(buf, pa.py_buffer(NEWLINE)), data + NEWLINE
    else:
        end = data.rfind(NEWLINE) + 1
    if not end:
        raise ValueError(f"the header row is longer than the first {len(data)} bytes")
    try:
        rows = _sample(buf.slice(0, len(data) if complete else end))
    except pa.ArrowInvalid as exc:
        if complete:
            raise
        end = _quote_balanced_cut(data)
        try:
            rows = _sample(buf.slice(0, end))
        except pa.ArrowInvalid:
            raise ValueError(f"no complete record in the first {len(data)} bytes ({exc})") from None
    schema = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                        for f in rows.schema])
    reason = _unsplittable(data[:len(data) if complete else end], rows)
    newline = data.find(NEWLINE)
    data_start = min(newline + 1, end)
    return CsvHead(schema, data_start, end, rows.cast(schema), not reason, reason)


def _quote_balanced_cut(head: bytes) -> int:
    """Offset just past the last newline preceded by an even number of quote characters.

    >>> _quote_balanced_cut(b'a,b\\n1,"x\\ny\\nz')
    4
    """
    end, quotes = len(head), head.count(b'"')
    newline = head.rfind(NEWLINE)
    while newline >= 0:
        quotes -= head.count(b'"', newline, end)
        end = newline
        if quotes % 2 == 0:
            return newline + 1
        newline = head.rfind(NEWLINE, 0, newline)
    return 0


def _sample(data: pa.Buffer) -> pa.Table:
    """The records of ``data`` with inferred types (unified across pyarrow's blocks)."""
    parse, convert = csv_options()
    return pacsv.read_csv(pa.BufferReader(data), read_options=pacsv.ReadOptions(use_threads=True),
                          parse_options=parse, convert_options=convert)


def _unsplittable(sample: bytes, rows: pa.Table) -> str:
    """Why the sample forbids splitting at newlines ('' when it does not)."""
    bare_cr = sample.count(b"\r")
    if bare_cr and bare_cr != sample.count(b"\r\n"):
        # pyarrow also ends records at a bare CR; a file of CR-only lines has no '\n' to cut at
        return "the object uses bare CR line breaks"
    if any("\n" in name or "\r" in name for name in rows.schema.names):
        return "a header name contains a line break"
    if sample.endswith(NEWLINE) and sample.count(NEWLINE) == rows.num_rows + 1:
        return ""           # one newline per record and the header: none inside a value
    for name, column in zip(rows.schema.names, rows.columns):
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            if any(pc.any(pc.match_substring(column, ch)).as_py() for ch in ("\n", "\r")):
                return f"column {name!r} has a quoted value with a line break"
    return ""


def parse_span(span: pa.Buffer, schema: pa.Schema) -> pa.Table:
    """Parse the records of one range (no header) into a table of exactly ``schema``."""
    parse, convert = csv_options(schema, newlines_in_values=False)
    read = pacsv.ReadOptions(column_names=schema.names, use_threads=True)
    return pacsv.read_csv(pa.BufferReader(span), read_options=read,
                          parse_options=parse, convert_options=convert)
