"""The byte-range record-boundary rule on local bytes: every range size, every offset."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from kalla.connectors.csv_ranges import (csv_options, inspect_head, parse_span, plan_ranges,
                                         read_span)

HEADER = b"id,name,amount,memo\n"
LINES = [
    b'1,plain,10.5,\n',
    b'2,"with, comma",20,x\n',
    b'3,"say ""hi"", ok",30.25,"a ""q"""\n',
    b'4,,40,"quoted, ""both"""\n',
    b'5,"",5e1,last\n',
    b'6,x,60,y\n',
]

VARIANTS = {
    "lf": HEADER + b"".join(LINES),
    "crlf": (HEADER + b"".join(LINES)).replace(b"\n", b"\r\n"),
    "no_final_newline": HEADER + b"".join(LINES)[:-1],
    "crlf_no_final_newline": (HEADER + b"".join(LINES)).replace(b"\n", b"\r\n")[:-2],
    "blank_lines": HEADER + LINES[0] + b"\n" + LINES[1] + b"\n\n" + b"".join(LINES[2:]),
    "header_only": HEADER,
    "header_without_newline": HEADER[:-1],
    "long_record": HEADER + LINES[0] + b'7,"' + b"z, " * 40 + b'",70,long\n' + LINES[5],
}


def local_fetch(data: bytes, calls: list | None = None):
    def fetch(offset: int, nbytes: int) -> bytes:
        assert nbytes > 0 and 0 <= offset < len(data), (offset, nbytes)
        if calls is not None:
            calls.append((offset, nbytes))
        return pa.py_buffer(data[offset:offset + nbytes])
    return fetch


def spans(data: bytes, range_bytes: int, tail: int) -> list[tuple[int, bytes]]:
    head = inspect_head(data, complete=True)
    fetch = local_fetch(data)
    return [(first, bytes(span)) for s, e in plan_ranges(head.data_start, len(data), range_bytes)
            for first, span in [read_span(fetch, s, e, len(data), head.data_start, tail)]]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_spans_cover_every_record_exactly_once_for_every_range_size(name):
    data = VARIANTS[name]
    data_start = inspect_head(data, complete=True).data_start
    for range_bytes in range(1, len(data) - data_start + 2):
        for tail in (1, 2, 5, 64):
            cut = spans(data, range_bytes, tail)
            assert b"".join(span for _, span in cut) == data[data_start:], (range_bytes, tail)
            for first, span in cut:
                if span:       # each non-empty span begins at a record start
                    assert first == data_start or data[first - 1:first] == b"\n"


def test_each_boundary_kind_is_exercised():
    """Range sizes 1..n put a boundary at every offset; name the kinds for the record."""
    data = VARIANTS["crlf"]
    kinds = {offset_kind(data, i) for i in range(len(HEADER), len(data))}
    assert {"line start", "before newline", "mid field", "inside quotes"} <= kinds


def offset_kind(data: bytes, offset: int) -> str:
    if data[offset - 1:offset] == b"\n":
        return "line start"
    if data[offset:offset + 1] in (b"\n", b"\r"):
        return "before newline"
    line_start = data.rfind(b"\n", 0, offset) + 1
    return "inside quotes" if data.count(b'"', line_start, offset) % 2 else "mid field"


@pytest.mark.parametrize("name", ["lf", "crlf", "no_final_newline", "blank_lines", "long_record"])
def test_parsed_spans_equal_one_local_read(name):
    data = VARIANTS[name]
    head = inspect_head(data, complete=True)
    parse, convert = csv_options(head.schema)          # Kalla's CSV conventions (NULLs)
    expected = pacsv.read_csv(pa.BufferReader(data), parse_options=parse,
                              convert_options=convert).to_pylist()
    for range_bytes in (1, 3, 17, 64, 10_000):
        rows = [row for _, span in spans(data, range_bytes, 4) if span
                for row in parse_span(span, head.schema).to_pylist()]
        assert rows == expected


def test_reading_past_the_end_grows_geometrically():
    data = VARIANTS["long_record"]
    head = inspect_head(data, complete=True)
    start = data.index(b'7,"') - 1          # a range ending inside the 120-byte record
    calls: list = []
    read_span(local_fetch(data, calls), head.data_start, start + 2, len(data), head.data_start,
              tail=1)
    sizes = [n for _, n in calls[1:]]         # then 1, 2, 4, ... bytes (the last capped at EOF)
    assert sizes[:3] == [1, 2, 4] and all(b == 2 * a for a, b in zip(sizes, sizes[1:-1]))
    assert len(calls) < 10


def test_a_range_inside_one_record_owns_nothing():
    data = VARIANTS["long_record"]
    inside = data.index(b'7,"') + 10
    first, span = read_span(local_fetch(data), inside, inside + 5, len(data), 20, tail=2)
    assert bytes(span) == b""


# ---------------------------------------------------------------------------- the head

def test_head_infers_one_schema_and_the_header_end():
    data = VARIANTS["crlf"]
    head = inspect_head(data, complete=True)
    assert head.schema.names == ["id", "name", "amount", "memo"]
    assert head.schema.types == [pa.int64(), pa.string(), pa.float64(), pa.string()]
    assert head.data_start == len(HEADER) + 1 and head.splittable


def test_an_all_empty_column_in_the_head_is_read_as_text():
    head = inspect_head(b"id,memo\n1,\n2,\n", complete=True)
    assert head.schema.field("memo").type == pa.string()


def test_a_quoted_newline_in_the_head_forbids_splitting():
    head = inspect_head(b'id,memo\n1,"two\nlines"\n2,x\n', complete=True)
    assert not head.splittable and "memo" in head.reason


def test_a_bare_cr_forbids_splitting():
    assert not inspect_head(b"id,v\r1,a\r2,b\r", complete=True).splittable


QUOTED_NEWLINES = b'id,memo,n\n' + b'1,"a\nb",1\n2,"c,d",2\n' * 6


@pytest.mark.parametrize("data, first_record_end", [
    (VARIANTS["crlf"], len(HEADER) + 1 + len(LINES[0]) + 1),
    (QUOTED_NEWLINES, len(b'id,memo,n\n1,"a\nb",1\n')),
])
def test_a_head_cut_at_any_offset_never_infers_from_the_cut_record(data, first_record_end):
    full = inspect_head(data, complete=True)
    for cut in range(first_record_end, len(data)):
        head = inspect_head(data[:cut], complete=False)
        assert head.schema.names == full.schema.names
        assert head.data_start == full.data_start
        if not full.splittable and b'"a\n' in data[:cut]:
            assert not head.splittable, cut
        for got, want in zip(head.schema.types, full.schema.types):
            assert got == want or got == pa.string(), (cut, head.schema)


@pytest.mark.parametrize("data", [b"", b"\n\n", b"id,name"])
def test_a_head_without_records_or_header_is_refused(data):
    with pytest.raises(ValueError):
        inspect_head(data, complete=False)
