"""The connector contract.

A connector reads one source. ``schema()`` is cheap (no full read) and is called first, so
filters and keys are checked before any heavy work. ``batches()`` streams the source as
Arrow record batches - never the whole source in memory - with the job's filters applied
(pushed down where the source can do it), reporting the fraction done through ``progress``.
Batch size has one name everywhere: ``settings.batch_rows``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import pyarrow as pa

from ..filters import BoundFilter, apply_filters


class Connector:
    kind = "abstract"
    #: True when ``batches`` applies the filters itself (e.g. in the SQL it sends).
    pushes_down_filters = False

    def __init__(self, source, settings):
        self.source = source
        self.settings = settings

    @property
    def label(self) -> str:
        """How errors name this source (never includes credentials)."""
        return f"source {self.source.alias!r}"

    def schema(self) -> pa.Schema:
        raise NotImplementedError

    def batches(self, filters: Sequence[BoundFilter],
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def filtered(self, batches: Iterator[pa.RecordBatch],
                 filters: Sequence[BoundFilter]) -> Iterator[pa.RecordBatch]:
        """Apply filters to a batch stream, for sources that cannot push them down."""
        if not filters:
            yield from batches
            return
        for batch in batches:
            batch = apply_filters(batch, filters)
            if batch.num_rows:
                yield batch

    def close(self) -> None:
        """Release connections; called once the source has been read (or failed)."""
