"""A CSV object on S3: byte ranges read and parsed in parallel, or one stream when it must be.

The head of the object (its first ``HEAD_BYTES``) is fetched and parsed once: it gives the
header, the one schema every range is parsed with, and whether the object may be split at
line breaks (``csv_ranges.inspect_head``). Its parsed records are the first partition, so
a small object costs one GET and no record is parsed twice. ``.csv.gz`` objects, objects
whose head shows a line break inside a quoted field or bare CR line ends, and objects
declared with ``?newlines_in_values=true`` are read as one stream instead.
"""
from __future__ import annotations

import logging
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv

from ..errors import SourceError
from ..filters import BoundFilter, apply_filters
from .csv_ranges import (TAIL_BYTES, CsvHead, csv_options, inspect_head, parse_span,
                         plan_ranges, read_span)
from .csvformat import CONVERSION_ERROR, WIDER, RestartRead   # one widening policy for all CSV
from .s3 import STREAM_BLOCK_BYTES, range_size

STREAM_PARSE_BLOCK = 4 << 20    # CSV block handed to pyarrow's streaming parser
log = logging.getLogger(__name__)


class S3Csv:
    """The reader behind an ``S3Connector`` for a ``.csv`` or ``.csv.gz`` key."""

    def __init__(self, connector):
        self.conn = connector
        self.location = connector.location
        self.gzip = self.location.format == "csv.gz"
        self.tail = connector.tail_bytes or TAIL_BYTES
        self._file = None            # shared by the range threads: ReadAt is thread-safe
        self._size = 0
        self._info: CsvHead | None = None
        self._complete = False       # the head is the whole object: its rows are everything
        self._schema: pa.Schema | None = None

    # ------------------------------------------------------------------ the head

    def schema(self) -> pa.Schema:
        self.inspect()
        return self._schema

    @property
    def split(self) -> bool:
        info = self.inspect()
        return not self.gzip and info.splittable and not self.location.newlines_in_values

    def inspect(self) -> CsvHead:
        if self._info is None:
            head, self._complete = self._read_head()
            try:
                self._info = inspect_head(head, self._complete)
            except (ValueError, pa.ArrowInvalid) as exc:
                raise SourceError(f"{self.conn.label}: not a readable CSV with a header row: "
                                  f"{exc}") from None
            if self._schema is None:              # keep a column widened by a restart
                self._schema = self._info.schema
        return self._info

    def _open(self):
        if self._file is None:
            try:
                self._file = self.conn.fs.open_input_file(self.location.path)
            except FileNotFoundError:
                raise self.conn.missing() from None
            self._size = self._file.size()
        return self._file

    def _read_head(self) -> tuple[pa.Buffer, bool]:
        """The first bytes (decompressed for .gz) and whether they are the whole object."""
        self._open()
        limit = self.conn.head_bytes
        if not self.gzip:
            head = self._fetch(0, min(limit, self._size))
            return head, len(head) >= self._size
        raw = self.conn.fs.open_input_file(self.location.path)
        try:
            stream = pa.CompressedInputStream(
                pa.BufferedInputStream(raw, max(1, min(limit, self._size))), "gzip")
            head = stream.read_buffer(limit)
            return head, len(head) < limit or not stream.read(1)
        finally:
            raw.close()

    # ------------------------------------------------------------------ reading

    def plan(self, filters: Sequence[BoundFilter]):
        """``(tasks, work, total_bytes)`` for ``fan_in``: the head and ranges, or one stream."""
        schema = self.schema()
        info = self.inspect()
        if self._complete:                    # even with quoted line breaks, or gzip
            return ["head"], lambda _task: self._head_rows(schema, filters), \
                info.sample_end - info.data_start
        if not self.split:
            log.info("%s: read as one stream (%s)", self.conn.label, self._why_stream())
            return ["stream"], lambda _task: self._stream(schema, filters), self._size

        def work(task):
            return self._head_rows(schema, filters) if task == "head" else \
                self._range(task, schema, filters)
        ranges = self._ranges(info.sample_end)
        log.info("%s: %d bytes in the head and %d byte ranges on %d threads", self.conn.label,
                 info.sample_end, len(ranges), min(self.conn.threads, len(ranges) + 1))
        return ["head"] + ranges, work, self._size - info.data_start

    def _why_stream(self) -> str:
        if self.gzip:
            return "gzip-compressed"
        if self.location.newlines_in_values:
            return "declared newlines_in_values=true"
        return self._info.reason

    def _ranges(self, start: int) -> list[tuple[int, int]]:
        size = self._size
        if self.conn.range_bytes:
            return plan_ranges(start, size, self.conn.range_bytes)
        return plan_ranges(start, size, range_size(size - start, self.conn.threads))

    def _head_rows(self, schema: pa.Schema, filters) -> Iterator[tuple]:
        info = self._info
        for batch in self._pieces(info.rows.cast(schema), filters):   # cast: a widened column
            yield batch, 0
        yield None, info.sample_end - info.data_start

    def _fetch(self, offset: int, nbytes: int) -> pa.Buffer:
        # one ranged GET into an Arrow buffer; a segment stream reads with ReadAt, which is
        # safe to call from several threads on one file (read_at would copy into bytes)
        return self._file.get_stream(offset, nbytes).read_buffer(nbytes)

    def _range(self, span: tuple[int, int], schema: pa.Schema,
               filters: Sequence[BoundFilter]) -> Iterator[tuple]:
        start, end = span
        first, data = read_span(self._fetch, start, end, self._size, self._info.data_start,
                                self.tail)
        if len(data):
            try:
                table = parse_span(data, schema)
            except pa.ArrowInvalid as exc:
                raise pa.ArrowInvalid(f"{exc} (in the records at bytes {first}-"
                                      f"{first + len(data)})") from None
            for batch in self._pieces(table, filters):
                yield batch, 0
        yield None, end - start

    def _stream(self, schema: pa.Schema, filters: Sequence[BoundFilter]) -> Iterator[tuple]:
        raw = self.conn.fs.open_input_file(self.location.path)
        try:
            stream = pa.BufferedInputStream(raw, STREAM_BLOCK_BYTES)
            if self.gzip:
                stream = pa.CompressedInputStream(stream, "gzip")
            parse, convert = csv_options(schema, newlines_in_values=True)
            read = pacsv.ReadOptions(block_size=STREAM_PARSE_BLOCK, use_threads=True)
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse,
                                    convert_options=convert)
            credited = 0
            for batch in reader:
                for piece in self._pieces(batch, filters):
                    yield piece, 0
                position = raw.tell()               # compressed bytes consumed so far
                yield None, position - credited
                credited = position
            yield None, self._size - credited
        finally:
            raw.close()

    def _pieces(self, data, filters: Sequence[BoundFilter]) -> Iterator[pa.RecordBatch]:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        for batch in data.to_batches(max_chunksize=self.conn.settings.batch_rows):
            if filters:
                batch = apply_filters(batch, filters)
            if batch.num_rows:
                yield batch

    # ------------------------------------------------------------------ errors

    def explain(self, exc: BaseException, text: str) -> BaseException:
        """A CSV problem as the user should hear it (or RestartRead for a wider column)."""
        match = CONVERSION_ERROR.search(text)
        if match and self._schema is not None:
            index = int(match.group(1))
            field = self._schema.field(index)
            wider = WIDER.get(str(field.type).split("[")[0], pa.string())
            self._schema = self._schema.set(index, pa.field(field.name, wider))
            return RestartRead(f"column {field.name!r} widened from {field.type} to {wider}")
        if isinstance(exc, pa.ArrowInvalid) and self._info is not None and self.split:
            return SourceError(
                f"{self.conn.label}: malformed CSV: {text}. The object was read in byte ranges "
                "cut at line breaks because its head has no line break inside a quoted field; "
                "if later records do, add ?newlines_in_values=true to the URI to read it as "
                "one stream")
        return SourceError(f"{self.conn.label}: {text}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._info = None
