"""Parquet on S3: one object, every object under a prefix, or a glob - read by row group.

Footers are read first (on the partition threads) to split each object into row groups,
skipping those whose statistics rule out the filters; the row groups are then scanned in
parallel with the filters pushed into pyarrow's scanner.
"""
from __future__ import annotations

import fnmatch
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from ..errors import SourceError
from ..filters import BoundFilter, arrow_expression
from .fanin import fan_in

_MAGIC = "*?["


class S3Parquet:
    def __init__(self, connector):
        self.conn = connector
        self.location = connector.location
        self._files: list[pafs.FileInfo] | None = None
        self._dataset: ds.FileSystemDataset | None = None

    @property
    def files(self) -> list[pafs.FileInfo]:
        if self._files is None:
            self._files = self._list()
            if not self._files:
                raise SourceError(f"{self.conn.label}: no Parquet objects match "
                                  f"s3://{self.location.path}")
        return self._files

    def _list(self) -> list[pafs.FileInfo]:
        fs, loc = self.conn.fs, self.location
        if loc.format == "parquet":
            info = fs.get_file_info(loc.path)
            if info.type != pafs.FileType.File:
                raise self.conn.missing()
            return [info]
        pattern = loc.key if loc.format == "glob" else None
        base = _literal_prefix(loc.key) if pattern else loc.key.rstrip("/")
        try:
            found = fs.get_file_info(pafs.FileSelector(f"{loc.bucket}/{base}".rstrip("/"),
                                                       recursive=True))
        except FileNotFoundError:
            raise self.conn.missing("objects under") from None
        prefix = f"{loc.bucket}/"
        return sorted((f for f in found if f.type == pafs.FileType.File and _visible(f.path)
                       and (pattern is None or _glob_match(f.path[len(prefix):], pattern))),
                      key=lambda f: f.path)

    @property
    def dataset(self) -> ds.FileSystemDataset:
        if self._dataset is None:
            fmt = ds.ParquetFileFormat(default_fragment_scan_options=ds.ParquetFragmentScanOptions(
                pre_buffer=True))       # coalesces column-chunk reads: fewer, larger GETs
            self._dataset = ds.dataset([f.path for f in self.files], format=fmt,
                                       filesystem=self.conn.fs)
        return self._dataset

    def schema(self) -> pa.Schema:
        return self.dataset.schema

    def plan(self, filters: Sequence[BoundFilter]):
        expr = arrow_expression(filters)
        sizes = {f.path: f.size for f in self.files}
        groups = list(fan_in(self.dataset.get_fragments(),
                             lambda frag: _row_groups(frag, expr, sizes[frag.path]),
                             self.conn.threads))
        work = lambda group: self._scan(group, expr)   # noqa: E731
        return groups, work, sum(sizes.values())

    def _scan(self, group, expr) -> Iterator[tuple]:
        fragment, credit = group
        for batch in fragment.to_batches(schema=self.dataset.schema, filter=expr,
                                         batch_size=self.conn.settings.batch_rows,
                                         use_threads=True):
            if batch.num_rows:
                yield batch, 0
        yield None, credit

    def explain(self, exc: BaseException, text: str) -> BaseException:
        return SourceError(f"{self.conn.label}: cannot read Parquet: {text}")

    def close(self) -> None:
        self._dataset = None


def _row_groups(fragment, expr, file_size: int) -> Iterator[tuple]:
    """``(row-group fragment, share of the object's bytes)`` for the groups the filter keeps."""
    fragment.ensure_complete_metadata()
    meta = fragment.metadata
    stored = [sum(meta.row_group(i).column(c).total_compressed_size
                  for c in range(meta.num_columns)) for i in range(meta.num_row_groups)]
    total = max(sum(stored), 1)
    for group in fragment.split_by_row_group(filter=expr):
        index = group.row_groups[0].id
        yield group, file_size * stored[index] // total


def _literal_prefix(key: str) -> str:
    """The directories of a glob before its first wildcard.

    >>> _literal_prefix("data/2024-*/part-*.parquet")
    'data'
    """
    parts = key.split("/")
    literal = []
    for part in parts[:-1]:
        if any(c in part for c in _MAGIC):
            break
        literal.append(part)
    return "/".join(literal)


def _glob_match(key: str, pattern: str) -> bool:
    """Shell-style match, one path segment per segment (``*`` never crosses a ``/``).

    >>> _glob_match("d/x/a.parquet", "d/*.parquet"), _glob_match("d/a.parquet", "d/*.parquet")
    (False, True)
    """
    keys, pats = key.split("/"), pattern.split("/")
    return len(keys) == len(pats) and all(fnmatch.fnmatchcase(k, p) for k, p in zip(keys, pats))


def _visible(path: str) -> bool:
    # Spark, Hive and pyarrow write _SUCCESS, _metadata and .crc files beside the data
    name = path.rsplit("/", 1)[-1]
    return not name.startswith(("_", "."))
