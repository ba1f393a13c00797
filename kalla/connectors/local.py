"""Local CSV and Parquet sources, streamed as Arrow record batches."""
from __future__ import annotations

import glob
import os
from typing import Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from ..errors import SourceError
from ..filters import BoundFilter, arrow_expression
from .csvformat import (CONVERSION_ERROR, INFER_BLOCK_BYTES, READ_BLOCK_BYTES, WIDER,  # noqa: F401
                        RestartRead, csv_options)
from .base import Connector

class CsvConnector(Connector):
    """A local ``*.csv`` (or ``*.csv.gz``) file with a header row."""

    kind = "csv"

    def __init__(self, source, settings):
        super().__init__(source, settings)
        self.path = source.local_path
        self._schema: pa.Schema | None = None

    def _open(self, schema: pa.Schema | None = None, block_size: int = READ_BLOCK_BYTES):
        """Return (reader, raw file); the raw file's position measures progress."""
        parse, convert = csv_options(dict(zip(schema.names, schema.types)) if schema else None)
        read = pacsv.ReadOptions(block_size=block_size, use_threads=True)
        raw = None
        try:
            raw = pa.OSFile(self.path)
            stream = pa.CompressedInputStream(raw, "gzip") if self.path.lower().endswith(".gz") else raw
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse,
                                    convert_options=convert)
            return reader, raw
        except (pa.ArrowInvalid, OSError) as exc:
            if raw is not None:
                raw.close()
            if schema is not None and isinstance(exc, pa.ArrowInvalid):
                raise self._widen(exc) from None
            raise SourceError(f"{self.label}: cannot read CSV {self.path}: {exc}") from None

    def schema(self) -> pa.Schema:
        if self._schema is None:
            reader, raw = self._open(block_size=INFER_BLOCK_BYTES)
            self._schema = reader.schema
            raw.close()
            if len(set(self._schema.names)) != len(self._schema.names):
                raise SourceError(f"{self.label}: CSV header names a column twice: {self._schema.names}")
        return self._schema

    def batches(self, filters: Sequence[BoundFilter],
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        # One schema for the whole file: if a later block does not fit the inferred type,
        # widen that column and tell the caller to start over (staging discards its file).
        yield from self.filtered(self._stream(progress), filters)

    def _stream(self, progress) -> Iterator[pa.RecordBatch]:
        reader, raw = self._open(self.schema())
        size = max(os.path.getsize(self.path), 1)
        try:
            for batch in reader:
                yield batch
                progress(min(0.99, raw.tell() / size))
        except pa.ArrowInvalid as exc:
            raise self._widen(exc) from None
        finally:
            raw.close()
        progress(1.0)

    def _widen(self, exc: pa.ArrowInvalid) -> Exception:
        m = CONVERSION_ERROR.search(str(exc))
        if not m:
            return SourceError(f"{self.label}: malformed CSV {self.path}: {exc}")
        index = int(m.group(1))
        field = self._schema.field(index)
        wider = WIDER.get(str(field.type).split("[")[0], pa.string())
        self._schema = self._schema.set(index, pa.field(field.name, wider))
        return RestartRead(f"column {field.name!r} widened from {field.type} to {wider}")


class ParquetConnector(Connector):
    """A local Parquet file, a directory of Parquet files, or a glob of them."""

    kind = "parquet"
    pushes_down_filters = True

    def __init__(self, source, settings):
        super().__init__(source, settings)
        self.path = source.local_path
        self._dataset: ds.Dataset | None = None

    @property
    def files(self) -> list[str]:
        if glob.has_magic(self.path):
            return sorted(glob.glob(self.path))
        if os.path.isdir(self.path):
            return sorted(glob.glob(os.path.join(self.path, "**", "*.parquet"), recursive=True))
        return [self.path]

    @property
    def dataset(self) -> ds.Dataset:
        if self._dataset is None:
            files = self.files
            if not files:
                raise SourceError(f"{self.label}: no Parquet files at {self.path}")
            try:
                self._dataset = ds.dataset(files, format="parquet")
            except (pa.ArrowInvalid, OSError) as exc:
                raise SourceError(f"{self.label}: cannot read Parquet {self.path}: {exc}") from None
        return self._dataset

    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def count_rows(self) -> int:
        return self.dataset.count_rows()

    def batches(self, filters: Sequence[BoundFilter],
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        # Scan row group by row group: each one's row count is in the footer, so progress
        # is a real fraction of the source even when filters drop most rows.
        try:
            groups = [rg for frag in self.dataset.get_fragments() for rg in frag.split_by_row_group()]
            sizes = {_group_key(rg): rg.row_groups[0].num_rows for rg in groups}
            total = max(sum(sizes.values()), 1)
            dataset = ds.FileSystemDataset(groups, self.dataset.schema, self.dataset.format,
                                           self.dataset.filesystem)
            scanner = dataset.scanner(filter=arrow_expression(filters),
                                      batch_size=self.settings.batch_rows, use_threads=True)
            done, current = 0, None
            for tagged in scanner.scan_batches():
                key = _group_key(tagged.fragment)
                if current is not None and key != current:
                    done += sizes.get(current, 0)
                    progress(min(0.99, done / total))
                current = key
                if tagged.record_batch.num_rows:
                    yield tagged.record_batch
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"{self.label}: cannot read Parquet {self.path}: {exc}") from None
        progress(1.0)


def _group_key(fragment) -> tuple:
    return fragment.path, tuple(rg.id for rg in fragment.row_groups)
