"""A real PostgreSQL for the connector tests; never a mock of the driver.

Server, in order: ``KALLA_TEST_PG_URL``; the local server at postgresql://postgres@127.0.0.1:5432/test;
else a throwaway cluster (initdb + pg_ctl from /usr/lib/postgresql/*/bin on a free port,
run as the ``postgres`` user when we are root, since initdb refuses root). With CI=true a
missing server fails the run instead of skipping it.

Every object lives in one schema per session (``kalla_t_<random>``) and roles named after
it; all are dropped at the end.
"""
from __future__ import annotations

import functools
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pyarrow as pa
import pytest
from psycopg import sql
from support import wait_until as poll_until

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
PASSWORD = "Pw-" + secrets.token_hex(8) + "/@:%x"   # URL-special characters on purpose


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/postgres/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.postgres)


def _unavailable(reason: str):
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests must run in CI: {reason}")
    pytest.skip(reason)


def reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_password(url: str, user: str, password: str | None, database: str | None = None) -> str:
    """``url`` with another user (and password, and database), same host and port."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    path = f"/{database}" if database else parts.path
    return urlunsplit((parts.scheme, f"{auth}@{host}", path, parts.query, ""))


class Cluster:
    """A throwaway PostgreSQL cluster: initdb into a temp dir, pg_ctl start on a free port."""

    def __init__(self, host_auth: str = "trust"):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[-3]))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb")
        self.bin = os.path.dirname(bins[-1])
        self.base = tempfile.mkdtemp(prefix="kalla-pg-")
        self.port = free_port()
        self.host_auth = host_auth
        self.superpass = secrets.token_hex(12)
        # initdb refuses to run as root (a PostgreSQL rule), so root runs it as "postgres".
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        subprocess.run([os.path.join(self.bin, args[0]), *args[1:]], check=True,
                       user=self.user, cwd=self.base, capture_output=True, timeout=120)

    def start(self) -> "Cluster":
        data, pwfile = os.path.join(self.base, "data"), os.path.join(self.base, "pw")
        with open(pwfile, "w") as f:
            f.write(self.superpass)
        if self.user:
            shutil.chown(pwfile, self.user)
        self._run("initdb", "-D", data, "-U", "postgres", "--auth-local=trust",
                  f"--auth-host={self.host_auth}", f"--pwfile={pwfile}", "-E", "UTF8",
                  "--no-locale")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off "
                   f"-c unix_socket_directories={self.base} -c max_connections=60")
        self._run("pg_ctl", "-D", data, "-o", options, "-l", os.path.join(self.base, "log"),
                  "-w", "start")
        return self

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.superpass}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", os.path.join(self.base, "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server():
    """Superuser URL of a running server."""
    explicit = os.environ.get("KALLA_TEST_PG_URL")
    if explicit:
        if not reachable(explicit):
            pytest.fail("KALLA_TEST_PG_URL is set but the server does not answer")
        yield explicit
        return
    if reachable(DEFAULT_URL):
        yield DEFAULT_URL
        return
    try:
        cluster = Cluster().start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"no PostgreSQL server and no throwaway cluster: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.stop()


@dataclass
class PgEnv:
    """The session's schema and roles on the test server, and helpers to use them."""
    admin_url: str
    schema: str
    reader: str = ""                 # a LOGIN role with PASSWORD, granted what tests give it
    password: str = PASSWORD
    extra_schemas: list[str] = field(default_factory=list)

    def execute(self, statement: str, params=None):
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else None

    def create_role(self, role: str, url: str | None = None) -> None:
        """A LOGIN role with PASSWORD (utility statements take no bind parameters)."""
        with psycopg.connect(url or self.admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(PASSWORD)))

    def uri(self, table: str, user: str | None = None, password: str | None = PASSWORD,
            database: str | None = None, server: str | None = None, **params: str) -> str:
        """A source URI for ``table`` (as written after ?table=) as ``user``, on the
        session's server or on ``server`` (an admin URL)."""
        base = with_password(server or self.admin_url, user or self.reader, password, database)
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in
                         {"table": table, **params}.items())
        return f"{base.split('?')[0]}?{query}"

    def qualified(self, name: str) -> str:
        return f"{self.schema}.{name}"


@pytest.fixture(scope="session")
def pg(pg_server):
    tag = secrets.token_hex(4)
    env = PgEnv(pg_server, f"kalla_t_{tag}", reader=f"kalla_t_{tag}_reader")
    try:
        env.execute(f"CREATE SCHEMA {env.schema}")
        env.create_role(env.reader)
        env.execute(f"GRANT USAGE ON SCHEMA {env.schema} TO {env.reader}")
        env.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA {env.schema} GRANT SELECT ON TABLES "
                    f"TO {env.reader}")
        yield env
    finally:
        for schema in [env.schema, *env.extra_schemas]:
            env.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        roles = [r[0] for r in env.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", [f"kalla_t_{tag}%"])]
        for role in roles:
            env.execute(f"DROP OWNED BY {role}")
            env.execute(f"DROP ROLE {role}")


@pytest.fixture(scope="session")
def password_server(pg):
    """(admin URL, role) on a server that checks passwords over TCP.

    The session's server is used when it does; a trust-auth server (like the local one
    here) cannot reject a wrong password, so a throwaway scram-sha-256 cluster is started.
    """
    wrong = with_password(pg.admin_url, pg.reader, "definitely-not-" + PASSWORD)
    if not reachable(wrong):
        yield pg.admin_url, pg.reader
        return
    try:
        cluster = Cluster(host_auth="scram-sha-256").start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"cannot start a password-checking cluster: {exc}")
    try:
        pg.create_role(pg.reader, cluster.url)
        yield cluster.url, pg.reader
    finally:
        cluster.stop()


@pytest.fixture
def make_connector(pg, settings):
    """Build a PostgresConnector for a URI; closes every one at the end of the test."""
    from kalla.connectors import connector_for
    from kalla.jobs import SourceSpec
    made = []

    def make(uri: str, partitions: int = 2, alias: str = "pg_src", **overrides):
        s = settings.replace(partitions=partitions, **overrides)
        connector = connector_for(SourceSpec(alias, uri, "postgres"), s)
        made.append(connector)
        return connector

    yield make
    for connector in made:
        connector.close()


@pytest.fixture
def wait_until():
    """wait_until(predicate, timeout=5.0) -> bool, polling."""
    return functools.partial(poll_until, timeout=5.0)


# ------------------------------------------------------------------ the types table

TYPES_COLUMNS = """
    id int, n numeric(12,2), nu numeric, nbig numeric(50,10), i2 smallint, i4 int, i8 bigint,
    r real, d double precision, b boolean, tx text, vc varchar(10), ch char(3), ci {citext},
    en {schema}.mood, dt date, ts timestamp, tz timestamptz, tm time, iv interval, u uuid,
    js json, jb jsonb, by bytea, ai int[], at text[], an numeric(5,1)[], ad date[],
    dom {schema}.money2, mo money, ip inet
"""
TYPES_ROWS = [
    """(1, 12345.67, 1.234567890123, 12345678901234567890123456789.0123456789, -32768,
        2147483647, 9223372036854775807, 1.5, 2.25, true, 'héllo, "w"', 'v', 'ab', 'CiT',
        'happy', '2024-02-29', '2024-01-01 12:34:56.123456', '2024-01-01 12:34:56.123456+02',
        '23:59:59.999999', '1 year 2 mons 3 days 04:05:06.5',
        'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11', '{"a": [1, 2]}', '{"b": null}', '\\x00ff10',
        '{1,NULL,3}', '{"x,y",NULL,""}', '{1.5,NULL}', '{2024-01-01,infinity}', 10.5, 12.5,
        '10.0.0.1/8')""",
    "(2" + ", NULL" * 30 + ")",
    """(3, -0.01, -1e-18, 0, 0, 0, 0, 'NaN', '-Infinity', false, '', '', '', '', 'sad',
        'infinity', '-infinity', 'infinity', '00:00', '-1 mons', '00000000-0000-0000-0000-000000000000',
        'null', '[]', '', '{}', '{}', '{}', '{}', 0, 0, '::1')""",
    """(4, 0, 0, 0, 0, 0, 0, 0, 0, true, E'line\\nbreak\\\\N', 'NULL', 'x', 'x', 'ok',
        '0044-03-15 BC', '10000-01-01 00:00', '1970-01-01 00:00:00+00', '00:00', '0',
        'ffffffff-ffff-ffff-ffff-ffffffffffff', '"s"', '1', '\\x', '{}', '{a}', '{1}', '{}',
        0, 0, '::1')""",
]


@pytest.fixture(scope="session")
def types_table(pg):
    """One table with every type Kalla maps (test_pg_types.py has the expectations)."""
    table = pg.qualified("types")
    found = pg.execute("SELECT extnamespace::regnamespace::text FROM pg_extension "
                       "WHERE extname = 'citext'")
    if not found:
        pg.execute(f"CREATE EXTENSION citext SCHEMA {pg.schema}")
    citext = f"{found[0][0] if found else pg.schema}.citext"
    pg.execute(f"CREATE TYPE {pg.schema}.mood AS ENUM ('sad', 'ok', 'happy')")
    pg.execute(f"CREATE DOMAIN {pg.schema}.money2 AS numeric(10,2)")
    pg.execute(f"CREATE TABLE {table} ({TYPES_COLUMNS.format(citext=citext, schema=pg.schema)})")
    pg.execute(f"INSERT INTO {table} VALUES {', '.join(TYPES_ROWS)}")
    return table


@pytest.fixture(scope="session")
def types_rows(types_table, pg):
    from kalla.config import load_settings
    from kalla.connectors import connector_for
    from kalla.jobs import SourceSpec
    connector = connector_for(SourceSpec("types", pg.uri(types_table), "postgres"),
                              load_settings({}))
    schema = connector.schema()
    table = pa.Table.from_batches(list(connector.batches([], lambda f: None)), schema=schema)
    connector.close()
    return schema, table.sort_by("id")
