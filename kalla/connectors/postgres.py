"""PostgreSQL sources: partitioned, consistent, typed, streaming reads.

``postgres://user:pass@host:port/db?table=NAME`` (NAME may be ``schema.table`` or quoted,
``"my schema"."Weird Name"``; every other query parameter goes to libpq unchanged).

How a read works:
1. ``schema()``: one psycopg connection resolves NAME with PostgreSQL's own rules
   (``to_regclass``: search_path, quoting, case folding), checks SELECT permission and maps
   the columns to Arrow (pg_types.py). Nothing is read.
2. ``batches()``: a coordinator connection opens a REPEATABLE READ transaction, takes an
   ACCESS SHARE lock (so no rewrite moves rows between pages mid-read), exports its
   snapshot and measures the relation. The table is split into ctid page ranges
   (pg_partitions.py); ``settings.partitions`` connections import the snapshot and stream
   the ranges in parallel, so every partition sees exactly the rows of one moment.

The reader is the ADBC PostgreSQL driver (binary COPY, decoded to Arrow in C++ with the
GIL released), chosen by measurement on 2M rows, 2 cores, server on the same machine:
ADBC 0.9M rows/s on one connection and 1.2-1.3M rows/s on 2-4 parallel ctid ranges;
psycopg ``COPY ... (FORMAT csv)`` into pyarrow's CSV reader 0.4M rows/s - psycopg hands
COPY data over one row per Python call, which caps it near 0.9M rows/s before any parsing
and holds the GIL, so partitions do not scale; connectorx (4 partitions) 0.8M rows/s.
On 5M rows the connector reads 1.4M rows/s with 4 partitions (ADBC alone 0.9M, connectorx
0.7M: benchmarks/bench_postgres.py). numeric is selected as text and cast to decimal128
exactly (pg_types.py). Needs PostgreSQL 12+ (pg_partition_tree); 14+ for ctid ranges.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg
import pyarrow as pa
from psycopg import sql

from ..errors import KallaError, SourceError, TransientSourceError
from ..filters import BoundFilter
from .base import Connector
from .pg_partitions import (RELATION_SQL, SIZE_SQL, PartitionFailed, PartitionProgress,
                            PartitionReader, partition_query, plan_ranges,
                            supports_ctid_ranges)
from .pg_types import COLUMNS_SQL, PgColumn, arrow_schema, column_from_catalog, convert_batch

log = logging.getLogger(__name__)

# Unless the URI says otherwise: libpq waits forever to connect to a host that drops packets,
# and the kernel's keepalive default (2 hours idle) would leave a read from a vanished
# server hanging that long; with these a dead peer is noticed within about a minute.
DEFAULT_PARAMS = (("connect_timeout", "10"), ("application_name", "kalla"),
                  ("keepalives_idle", "30"), ("keepalives_interval", "10"),
                  ("keepalives_count", "3"))
SNAPSHOT_ID = re.compile(r"[0-9A-F]+-[0-9A-F]+(?:-[0-9]+)?")
# Session settings of every partition connection: text output of interval in ISO 8601
# and of timestamptz in UTC (binary timestamptz is UTC whatever the TimeZone).
SESSION = ("SET TimeZone = 'UTC'", "SET IntervalStyle = 'iso_8601'",
           "SET DateStyle = 'ISO, YMD'", "SET extra_float_digits = 3")


@dataclass(frozen=True, repr=False)
class PgTarget:
    """A parsed source URI."""
    conninfo: str             # libpq URI: the source URI minus ?table, plus defaults
    table: str                # as written: schema-qualified and/or quoted
    user: str
    database: str
    server: str               # host[:port] as written, for messages
    secrets: tuple[str, ...]

    def __repr__(self) -> str:
        return f"PgTarget({self.server}/{self.database}, table={self.table!r})"

    def scrub(self, text: str) -> str:
        """Remove every form of the password from ``text``.

        >>> t = parse_target("postgres://u:p%40ss@h/db?table=t")
        >>> t.scrub("failed for postgres://u:p%40ss@h/db password=p@ss")
        'failed for postgres://u:***@h/db password=***'
        """
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        text = re.sub(r"(://[^/\s:@]*:)[^@\s]*@", r"\1***@", text)
        return re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1***", text, flags=re.I)


def parse_target(uri: str) -> PgTarget:
    """Split a source URI into the libpq URI and the table name.

    >>> t = parse_target('postgresql://kalla:pw@db:5433/fin?table=%22my%20s%22.t&sslmode=require')
    >>> t.table, t.user, t.database, t.server
    ('"my s".t', 'kalla', 'fin', 'db:5433')
    >>> t.conninfo.split("?")[1]   # doctest: +ELLIPSIS
    'sslmode=require&connect_timeout=10&application_name=kalla&keepalives_idle=30&...'
    """
    parts = urlsplit(uri)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    params = dict(pairs)
    rest = [(k, v) for k, v in pairs if k != "table"]
    rest += [(k, v) for k, v in DEFAULT_PARAMS if k not in params]
    conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path,
                           urlencode(rest, quote_via=quote), ""))
    userinfo, _, server = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    secrets = {password, unquote(password), params.get("password", ""),
               quote(params.get("password", ""), safe="")} - {""}
    user = unquote(user) or params.get("user", "(default user)")
    return PgTarget(conninfo, params.get("table", "").strip(), user,
                    unquote(parts.path.lstrip("/")) or params.get("dbname", user),
                    server or params.get("host", "localhost"), tuple(secrets))


# (SQLSTATEs, message patterns, error class, what to tell the user). First match wins. The
# patterns are for libpq's connection failures, which carry no SQLSTATE.
_RULES = (
    (("28P01",), ("password authentication failed",), SourceError,
     "PostgreSQL at {server} rejected the password of user {user!r}: "
     "check the user name and password in the URI"),
    ((), ("no password supplied",), SourceError,
     "PostgreSQL at {server} asks for the password of user {user!r}, and the URI has none: "
     "postgres://USER:PASSWORD@HOST/DB?table=..."),
    (("28000",), ("no pg_hba.conf entry", "authentication failed"), SourceError,
     "PostgreSQL at {server} refused the login of user {user!r} ({reason})"),
    (("3D000",), (r'database ".*" does not exist',), SourceError,
     "database {database!r} does not exist on {server}"),
    (("42501",), ("permission denied",), SourceError,
     "user {user!r} may not read {table}: {reason}; it needs GRANT SELECT on the table "
     "(and USAGE on its schema)"),
    (("42P01", "3F000", "42703", "42602", "0A000", "22023"), (), SourceError,
     "{reason} (database {database!r} on {server}); check ?table= in the URI"),
    (("57014",), ("canceling statement due to statement timeout",), SourceError,
     "PostgreSQL cancelled the read ({reason}); check statement_timeout for user {user!r}"),
    (("53300",), ("too many clients", "remaining connection slots"), TransientSourceError,
     "PostgreSQL at {server} has no free connection slots ({reason}); lower KALLA_PARTITIONS "
     "or raise max_connections"),
)
_DROPPED = ("server closed the connection", "terminating connection", "connection to server",
            "could not receive data", "could not send data", "no connection to the server",
            "ssl syscall error", "eof detected", "connection reset", "broken pipe",
            "canceling statement due to user request")
_PREFIX = re.compile(r"^(?:[A-Z_]+: )?(?:\[libpq\] )?(?:Failed to [a-z ]+: )?"
                     r"(?:connection failed: )?(?:Execution error \[\w+\]: )?")


def source_error(exc: BaseException, target: PgTarget, label: str, phase: str) -> SourceError:
    """Translate a driver exception into a SourceError a user can act on, without the password.

    ``phase`` is "connect" or "read": a broken connection means "unreachable" before the
    read and "lost" during it.
    """
    text = target.scrub(str(exc))
    state = getattr(exc, "sqlstate", None) or _sqlstate(text)
    fields = {"server": target.server, "user": target.user, "database": target.database,
              "table": target.table, "reason": _reason(text)}
    for states, patterns, cls, template in _RULES:
        if state in states or any(re.search(p, text) for p in patterns):
            return cls(f"{label}: {template.format(**fields)}")
    if phase == "connect" and (state is None or state.startswith("08")):
        return TransientSourceError(
            f"{label}: cannot connect to PostgreSQL at {target.server} ({fields['reason']}); "
            "check the host and port in the URI and that the server is running")
    if (state or "").startswith(("08", "57P")) or any(d in text.lower() for d in _DROPPED):
        return TransientSourceError(
            f"{label}: the connection to PostgreSQL at {target.server} was lost while reading "
            f"({fields['reason']}); nothing was written, running the job again may help")
    return SourceError(f"{label}: PostgreSQL error: {fields['reason']}")


def _sqlstate(text: str) -> str | None:
    match = re.search(r"SQLSTATE: ([0-9A-Z]{5})", text)
    return match.group(1) if match else None


def _reason(text: str) -> str:
    """The server's one-line reason, without driver prefixes, query echo or hints.

    >>> _reason('NOT_FOUND: Failed to prepare query: ERROR:  relation "x" does not exist\\nLINE 1')
    'relation "x" does not exist'
    >>> _reason('IO: [libpq] Failed to connect: connection to server at "h", port 1 failed: '
    ...         'Connection refused\\n\\tIs the server running?')
    'connection to server at "h", port 1 failed: Connection refused'
    """
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = _PREFIX.sub("", lines[0]) if lines else "unknown error"
    first = re.split(r"(?:ERROR|FATAL):\s+", first)[-1]
    return first.split(". SQLSTATE:")[0].strip() or "unknown error"


@dataclass(frozen=True)
class Relation:
    oid: int
    schema: str
    name: str
    relkind: str

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)

    @property
    def display(self) -> str:
        return f"{self.schema}.{self.name}"


class PostgresConnector(Connector):
    kind = "postgres"
    pushes_down_filters = True

    def __init__(self, source, settings):
        super().__init__(source, settings)
        self.target = parse_target(source.uri)
        self.relation: Relation | None = None
        self.columns: list[PgColumn] | None = None
        #: the SQL of each partition of the last read, parameters bound (for logs and tests)
        self.queries: list[str] = []
        self._reader: PartitionReader | None = None
        self._can_select = False

    def schema(self) -> pa.Schema:
        if self.columns is None:
            with self._connect() as conn:
                self.relation = self._resolve(conn)
                self._check_select(conn)
                rows = self._run(conn.execute, COLUMNS_SQL, [self.relation.oid]).fetchall()
            if not rows:
                raise SourceError(f"{self.label}: {self.relation.display} has no columns")
            self.columns = [column_from_catalog(row) for row in rows]
        return arrow_schema(self.columns)

    def batches(self, filters: Sequence[BoundFilter],
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        schema = self.schema()
        with self._connect() as coordinator:
            snapshot, pages, est_rows = self._export_snapshot(coordinator)
            ranges = (plan_ranges(pages, self.settings.partitions)
                      if supports_ctid_ranges(self.relation.relkind,
                                              coordinator.info.server_version) else [None])
            mogrify = psycopg.ClientCursor(coordinator).mogrify
            self.queries = [mogrify(*partition_query(self.relation.ident, self.columns,
                                                     filters, r)) for r in ranges]
            log.info("%s: reading %s in %d partition(s) (%d pages, ~%d rows) under snapshot %s",
                     self.label, self.relation.display, len(ranges), pages, est_rows, snapshot)
            log.debug("%s: partition queries: %s", self.label, self.queries)
            reader = PartitionReader(
                self._connect_adbc, self._setup(snapshot), self.queries,
                workers=min(self.settings.partitions, len(ranges)),
                convert=lambda b: convert_batch(b, self.columns, schema, self.label),
                batch_bytes=self._batch_bytes(pages, est_rows))
            self._reader = reader
            yield from self._stream(reader, est_rows, progress)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.target.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise source_error(exc, self.target, self.label, "connect") from None

    def _connect_adbc(self):
        # Imported here: only a job that reads PostgreSQL loads the driver.
        import adbc_driver_postgresql.dbapi as adbc
        return adbc.connect(self.target.conninfo, autocommit=True)

    def _run(self, method, *args):
        """Call a psycopg method, translating its errors."""
        try:
            return method(*args)
        except psycopg.Error as exc:
            raise source_error(exc, self.target, self.label, "read") from None

    def _setup(self, snapshot: str) -> list[str]:
        # BEGIN and SET TRANSACTION SNAPSHOT must come first: the snapshot is imported
        # before the transaction runs any query. The id is the server's, checked anyway.
        if not SNAPSHOT_ID.fullmatch(snapshot):
            raise SourceError(f"{self.label}: unexpected snapshot id from the server")
        return [*SESSION, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                f"SET TRANSACTION SNAPSHOT '{snapshot}'"]

    # -- catalog ------------------------------------------------------------------------

    def _resolve(self, conn: psycopg.Connection) -> Relation:
        table = self.target.table
        parts = self._run(conn.execute, "SELECT parse_ident(%s)", [table]).fetchone()[0]
        if len(parts) > 2:
            raise SourceError(f"{self.label}: ?table={table} has {len(parts)} dotted parts; "
                              "use TABLE or SCHEMA.TABLE (the database comes from the URI path)")
        row = self._run(conn.execute, RELATION_SQL, [table]).fetchone()
        if row is None:
            raise SourceError(f"{self.label}: {self._missing(conn, parts)}")
        self._can_select = row[4]
        return Relation(*row[:4])

    def _missing(self, conn: psycopg.Connection, parts: list[str]) -> str:
        where = f"database {self.target.database!r} on {self.target.server}"
        if len(parts) == 2:
            found = self._run(conn.execute, "SELECT 1 FROM pg_namespace WHERE nspname = %s",
                              [parts[0]])
            if found.fetchone() is None:
                return f"schema {parts[0]!r} does not exist in {where} (?table={self.target.table})"
            return f"table {parts[1]!r} does not exist in schema {parts[0]!r} of {where}"
        path = self._run(conn.execute, "SELECT current_schemas(false)").fetchone()[0]
        return (f"table {parts[0]!r} does not exist in {where} (searched schemas: "
                f"{', '.join(path) or 'none'}; name it SCHEMA.TABLE)")

    def _check_select(self, conn: psycopg.Connection) -> None:
        if self._can_select:
            return
        denied = [r[0] for r in self._run(conn.execute, """
            SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0
            AND NOT attisdropped AND NOT has_column_privilege(attrelid, attnum, 'SELECT')
            ORDER BY attnum""", [self.relation.oid]).fetchall()]
        if denied:
            raise SourceError(
                f"{self.label}: user {self.target.user!r} lacks SELECT permission on "
                f"{self.relation.display} (columns {', '.join(denied)}); grant it with "
                f"GRANT SELECT ON {self.relation.ident.as_string(conn)} TO "
                f"{sql.Identifier(self.target.user).as_string(conn)}")

    def _export_snapshot(self, conn: psycopg.Connection) -> tuple[str, int, float]:
        """Open the coordinator's transaction, lock, export the snapshot, measure."""
        self._run(conn.execute, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if self.relation.relkind in ("r", "p", "v"):
            # LOCK takes no snapshot, so it comes first: the snapshot then postdates any
            # rewrite (VACUUM FULL, CLUSTER, ALTER TABLE) that could move rows between pages,
            # and none can start until the read ends.
            self._run(conn.execute, sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(
                self.relation.ident))
        elif self.relation.relkind == "m":   # LOCK refuses materialized views; a query locks
            self._run(conn.execute, sql.SQL("SELECT FROM {} LIMIT 0").format(self.relation.ident))
        snapshot = self._run(conn.execute, "SELECT pg_export_snapshot()").fetchone()[0]
        pages, est_rows = self._run(conn.execute, SIZE_SQL, [self.relation.oid]).fetchone()
        return snapshot, int(pages or 0), float(est_rows or 0)

    def _batch_bytes(self, pages: int, est_rows: float) -> int:
        """Driver batch size in bytes for about ``batch_rows`` rows, from the heap's bytes
        per row (the Arrow size of a row is of the same order)."""
        row_bytes = pages * 8192 / est_rows if est_rows > 0 and pages else 64
        return int(min(16 << 20, max(1 << 20, self.settings.batch_rows * row_bytes)))

    # -- streaming ----------------------------------------------------------------------

    def _stream(self, reader: PartitionReader, est_rows: float,
                progress: Callable[[float], None]) -> Iterator[pa.RecordBatch]:
        tracker = PartitionProgress(len(reader.queries), est_rows, progress)
        step = self.settings.batch_rows
        try:
            for kind, index, payload in reader.read():
                if kind == "done":
                    tracker.done(index)
                    continue
                for offset in range(0, payload.num_rows, step):
                    yield payload.slice(offset, step)
                tracker.rows(index, payload.num_rows)
        except PartitionFailed as failed:
            if isinstance(failed.error, KallaError):     # e.g. a value no decimal holds
                raise failed.error from None
            raise source_error(failed.error, self.target, self.label, failed.phase) from None
        finally:
            reader.close()           # also when the consumer stopped early
        tracker.finish()
