"""Failures a user can act on: each names the source and says what is wrong, and the
password never appears anywhere in the error."""
from __future__ import annotations

import secrets
import socket
import threading
import traceback
from urllib.parse import quote, unquote

import pytest

from kalla.errors import SourceError, TransientSourceError

SECRET = "S3cr:et/@" + secrets.token_hex(6)


def failure(make_connector, uri: str, *, read: bool = False) -> SourceError:
    connector = make_connector(uri)
    with pytest.raises(SourceError) as info:
        connector.schema()
        if read:
            list(connector.batches([], lambda f: None))
    return info.value


def assert_no_secret(err: BaseException, *secret_values: str) -> None:
    text = "\n".join([str(err), repr(err), str(err.to_dict()),
                      "".join(traceback.format_exception(err))])
    for secret in secret_values:
        for form in {secret, quote(secret, safe=""), unquote(secret)}:
            assert form not in text


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host(make_connector):
    uri = f"postgresql://kalla:{quote(SECRET, safe='')}@127.0.0.1:{closed_port()}/db?table=t"
    err = failure(make_connector, uri)
    assert isinstance(err, TransientSourceError) and err.retryable
    assert err.stage == "staging"
    assert str(err).startswith("source 'pg_src': cannot connect to PostgreSQL at 127.0.0.1:")
    assert "Connection refused" in str(err) and "check the host and port" in str(err)
    assert_no_secret(err, SECRET)


def test_unknown_host_name(make_connector):
    uri = (f"postgresql://kalla:{quote(SECRET, safe='')}@no-such-host.invalid:5432/db"
           "?table=t&connect_timeout=3")
    err = failure(make_connector, uri)
    assert "cannot connect to PostgreSQL at no-such-host.invalid:5432" in str(err)
    assert_no_secret(err, SECRET)


def test_wrong_password(pg, password_server, make_connector):
    admin_url, role = password_server
    err = failure(make_connector, pg.uri("t", user=role, password=SECRET, server=admin_url))
    assert not err.retryable
    assert f"rejected the password of user '{role}'" in str(err)
    assert "check the user name and password in the URI" in str(err)
    assert_no_secret(err, SECRET)


def test_no_password_in_the_uri(pg, password_server, make_connector):
    admin_url, role = password_server
    err = failure(make_connector, pg.uri("t", user=role, password=None, server=admin_url))
    assert f"asks for the password of user '{role}', and the URI has none" in str(err)


def test_password_as_query_parameter_is_scrubbed_too(make_connector):
    uri = (f"postgresql://kalla@127.0.0.1:{closed_port()}/db?table=t"
           f"&password={quote(SECRET, safe='')}")
    err = failure(make_connector, uri)
    assert "cannot connect" in str(err)
    assert_no_secret(err, SECRET)


def test_logs_never_show_the_password(pg, make_connector, caplog):
    caplog.set_level("DEBUG")
    table = pg.qualified("logged")
    pg.execute(f"CREATE TABLE {table} AS SELECT 1 AS id")
    connector = make_connector(pg.uri(table))
    connector.schema()
    assert len(list(connector.batches([], lambda f: None))) == 1
    assert "reading " + table in caplog.text
    assert pg.password not in caplog.text and quote(pg.password, safe="") not in caplog.text


def test_missing_database(pg, make_connector):
    err = failure(make_connector, pg.uri("t", database="kalla_no_such_db"))
    assert "database 'kalla_no_such_db' does not exist" in str(err)
    assert_no_secret(err, pg.password)


@pytest.mark.parametrize("table, expected", [
    ("{schema}.nope", "table 'nope' does not exist in schema '{schema}'"),
    ("kalla_no_such_schema.t", "schema 'kalla_no_such_schema' does not exist"),
    ("nope_unqualified", "table 'nope_unqualified' does not exist in database"),
    ("a.b.c", "has 3 dotted parts; use TABLE or SCHEMA.TABLE"),
    ('"unterminated', "check ?table= in the URI"),
])
def test_missing_or_malformed_table(pg, make_connector, table, expected):
    err = failure(make_connector, pg.uri(table.format(schema=pg.schema)))
    assert expected.format(schema=pg.schema) in str(err)
    assert str(err).startswith("source 'pg_src': ")
    assert_no_secret(err, pg.password)


@pytest.fixture(scope="module")
def outsider(pg):
    """A role with USAGE on the schema but no SELECT on its tables."""
    role = f"{pg.reader[:-len('_reader')]}_outsider"
    pg.create_role(role)
    pg.execute(f"GRANT USAGE ON SCHEMA {pg.schema} TO {role}")
    table = pg.qualified("guarded")
    pg.execute(f"CREATE TABLE {table} (id int, secret text)")
    pg.execute(f"REVOKE SELECT ON {table} FROM {pg.reader}")
    return role, table


def test_missing_select_permission(pg, outsider, make_connector):
    role, table = outsider
    err = failure(make_connector, pg.uri(table, user=role))
    assert f"user '{role}' lacks SELECT permission on {table} (columns id, secret)" in str(err)
    schema, name = table.split(".")
    assert f'GRANT SELECT ON "{schema}"."{name}" TO "{role}"' in str(err)
    assert_no_secret(err, pg.password)


def test_column_level_permission_names_the_missing_columns(pg, outsider, make_connector):
    role, table = outsider
    pg.execute(f"GRANT SELECT (id) ON {table} TO {role}")
    err = failure(make_connector, pg.uri(table, user=role))
    assert "(columns secret)" in str(err)


def test_missing_schema_usage(pg, make_connector):
    role = f"{pg.reader[:-len('_reader')]}_nousage"
    pg.create_role(role)
    err = failure(make_connector, pg.uri(pg.qualified("guarded_x"), user=role))
    assert f"user '{role}' may not read" in str(err)
    assert "permission denied for schema" in str(err)


def test_statement_timeout_is_explained(pg, make_connector):
    table = pg.qualified("slow")
    pg.execute(f"CREATE VIEW {table} AS SELECT g, pg_sleep(0.5)::text AS s FROM generate_series(1, 4) g")
    err = failure(make_connector, pg.uri(table, options="-c statement_timeout=200"), read=True)
    assert "PostgreSQL cancelled the read" in str(err) and "statement_timeout" in str(err)


def test_connection_dropped_mid_read(pg, make_connector, wait_until):
    table = pg.qualified("dropme")
    # Wide rows: the server is still sending (blocked on the socket) when it is killed.
    pg.execute(f"CREATE TABLE {table} AS SELECT g AS id, repeat('x', 300) AS pad "
               "FROM generate_series(1, 200000) g")
    app = "kalla_drop_" + secrets.token_hex(3)
    connector = make_connector(pg.uri(table, application_name=app),
                               partitions=2, batch_rows=1000)
    connector.schema()
    stream = connector.batches([], lambda f: None)
    next(stream)
    killed = pg.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND state = 'active' AND query LIKE 'COPY%%'", [app])
    assert killed
    with pytest.raises(TransientSourceError) as info:
        for _ in stream:
            pass
    message = str(info.value)
    assert message.startswith("source 'pg_src': the connection to PostgreSQL at ")
    assert "was lost while reading" in message and "nothing was written" in message
    assert_no_secret(info.value, pg.password)
    assert wait_until(lambda: not [t for t in threading.enumerate()
                                   if t.name.startswith("kalla-pg-")])
    assert wait_until(lambda: pg.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                         "application_name = %s", [app])[0][0] == 0)
