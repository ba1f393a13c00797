"""Source connectors: one class per source kind, each yielding Arrow record batches.

Found by kind in a registry; optional drivers (psycopg, the S3 filesystem) are imported
only when a job uses them.
"""
from __future__ import annotations

import importlib

from .base import Connector

CONNECTORS = {
    "csv": "kalla.connectors.local:CsvConnector",
    "parquet": "kalla.connectors.local:ParquetConnector",
    "postgres": "kalla.connectors.postgres:PostgresConnector",
    "s3": "kalla.connectors.s3:S3Connector",
}


def connector_for(source, settings) -> Connector:
    module_name, _, class_name = CONNECTORS[source.kind].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(source, settings)


__all__ = ["Connector", "CONNECTORS", "connector_for"]
