"""SQL cannot be smuggled in: filter column names and values reach PostgreSQL as identifiers
and literals, never as SQL text; match_sql may only read the job's own registered sources.
Everything runs as real jobs through a real `kalla serve` against a real PostgreSQL."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from security.hostile import no_partial_files, scratch_is_empty, wait_until

pytestmark = pytest.mark.postgres

CANARY_ROWS = 3
# Each value is stored once in the table; a filter `note = value` must find exactly it.
HOSTILE_VALUES = [
    "x' OR '1'='1", "x'; DROP TABLE {canary}; --", "'); DELETE FROM {canary}; --",
    "$$; DROP TABLE {canary}; $$", "$tag$ DROP TABLE {canary} $tag$", "\\'; DROP TABLE {canary}; --",
    "E'\\x27' OR 1=1", "U&'\\0027' OR 1=1", "/* */ OR 1=1 /*", "-- ", ";", "'", "\\", "\"",
    "%' OR '1'='1", "\uff07 OR 1=1", "\u02bc OR 1=1", "\\\\'' OR ''='", "\x7f", "ʻ; SELECT pg_sleep(5); --",
]
WEIRD_COLUMN = "na\"me'); DROP TABLE {canary}; --"
WEIRD_TABLE = "evil'; DROP TABLE {canary}; --"


@pytest.fixture(scope="module")
def tables(pg):
    """The canary (must survive) and a table whose name, a column and values are SQL."""
    canary = pg.qualified("canary")
    pg.execute(f"CREATE TABLE {canary} (id int PRIMARY KEY, v text)")
    pg.execute(f"INSERT INTO {canary} SELECT g, 'c' || g FROM generate_series(1, {CANARY_ROWS}) g")
    values = [v.format(canary=canary) for v in HOSTILE_VALUES]
    column = WEIRD_COLUMN.format(canary=canary)
    table = WEIRD_TABLE.format(canary=canary)
    pg.execute(f'CREATE TABLE {pg.schema}."{table}" (id int PRIMARY KEY, note text, '
               f'"{column.replace(chr(34), chr(34) * 2)}" text)')
    for i, value in enumerate(values, start=1):
        pg.execute(f'INSERT INTO {pg.schema}."{table}" VALUES (%s, %s, %s)', [i, value, value])
    quoted = '"' + table.replace('"', '""') + '"'
    return {"canary": canary, "values": values, "column": column,
            "table": f'"{pg.schema}".{quoted}', "rows": len(values)}


@pytest.fixture(scope="module")
def harness(harness_factory):
    return harness_factory({"KALLA_WORKERS": "2"}, name="sql")


def assert_intact(pg, tables) -> None:
    assert pg.execute(f"SELECT count(*) FROM {tables['canary']}")[0][0] == CANARY_ROWS
    assert pg.execute(f"SELECT count(*) FROM {tables['table']}")[0][0] == tables["rows"]


def pg_job(harness, pg, tables, filters: list) -> dict:
    """left: the hostile table, filtered, read as the superuser; right: the canary."""
    admin = dict(user="postgres", password=None)
    return harness.jobs.make(
        match_sql="SELECT l.id AS l__id, r.id AS r__id FROM l LEFT JOIN r ON l.id = r.id",
        sources=[{"alias": "l", "uri": pg.uri(tables["table"], **admin), "filters": filters},
                 {"alias": "r", "uri": pg.uri(tables["canary"], **admin)}],
        primary_keys={"l": ["id"], "r": ["id"]})


def run_all(harness, jobs: list[dict]) -> list[dict]:
    for job in jobs:
        resp = harness.server.submit(job)
        assert resp.status == 200, resp.text
    return [harness.listener.terminal(job["run_id"], timeout=90) for job in jobs]


# ---------------------------------------------------------------------- filters into PostgreSQL


@pytest.mark.parametrize("column", ["note", "weird"])
def test_filter_values_are_literals(harness, pg, tables, column):
    """`eq` on each hostile value finds exactly the one row holding it, through a column
    that is plain or whose name is itself an injection attempt."""
    name = tables["column"] if column == "weird" else "note"
    jobs = [pg_job(harness, pg, tables, [{"column": name, "op": "eq", "value": value}])
            for value in tables["values"]]
    for value, final in zip(tables["values"], run_all(harness, jobs)):
        assert "error" not in final, (value, final)
        assert final["source_rows"]["l"] == 1, (value, final["source_rows"])
    assert_intact(pg, tables)


def test_in_between_like_and_neq_are_literals_too(harness, pg, tables):
    values, rows = tables["values"], tables["rows"]
    cases = [
        ([{"column": "note", "op": "in", "value": values[:3]}], 3),
        ([{"column": "note", "op": "in", "value": ["' OR 1=1 --", values[4]]}], 1),
        ([{"column": "note", "op": "neq", "value": values[0]}], rows - 1),
        ([{"column": "note", "op": "between", "value": ["' OR 1=1", "' OR 1=1"]}], 0),
        ([{"column": "note", "op": "like", "value": "x'%"}], 2),           # a pattern, by design
        ([{"column": "note", "op": "like", "value": "%' OR '1'='1"}], 2),
        ([{"column": "note", "op": "gt", "value": "$$"}, {"column": "id", "op": "lte", "value": "3"}],
         None),
    ]
    finals = run_all(harness, [pg_job(harness, pg, tables, f) for f, _ in cases])
    expected_gt = pg.execute(f"SELECT count(*) FROM {tables['table']} WHERE note > '$$' AND id <= 3")[0][0]
    for (filters, expected), final in zip(cases, finals):
        assert "error" not in final, (filters, final)
        assert final["source_rows"]["l"] == (expected_gt if expected is None else expected), \
            (filters, final["source_rows"])
    assert_intact(pg, tables)


@pytest.mark.parametrize("column", [
    "note\" = note OR 1=1 --", "note; DROP TABLE {canary}", "id) OR (1=1", "\"id\"", "NOTE",
    "note\x00", "ｎｏｔｅ",
])
def test_filter_columns_must_name_a_real_column(harness, pg, tables, column):
    column = column.format(canary=tables["canary"])
    job = pg_job(harness, pg, tables, [{"column": column, "op": "eq", "value": "x"}])
    resp = harness.server.submit(job)
    if resp.status == 400:                 # refused at submit (e.g. a NUL character)
        assert "column" in resp.text
    else:
        final = harness.listener.terminal(job["run_id"])
        assert "has no column" in final.get("error", ""), final
        assert final["stage"] == "staging"
    assert_intact(pg, tables)


def test_a_nul_in_a_filter_value_fails_cleanly(harness, pg, tables):
    job = pg_job(harness, pg, tables, [{"column": "note", "op": "eq", "value": "a\x00b"}])
    resp = harness.server.submit(job)
    if resp.status == 200:
        final = harness.listener.terminal(job["run_id"])
        assert "error" in final and final["stage"] == "staging", final
    else:
        assert resp.status == 400 and "value" in resp.text
    assert_intact(pg, tables)
    harness.assert_serving()


def test_table_parameter_is_a_name_not_sql(harness, pg, tables):
    bad = [f"{tables['canary']}; DROP TABLE {tables['canary']}",
           f"{tables['canary']} WHERE 1=1; --", f"(SELECT * FROM {tables['canary']}) x",
           "pg_catalog.pg_authid", f"{tables['canary']}' OR '1'='1"]
    jobs = []
    for table in bad:
        job = pg_job(harness, pg, tables, [])
        job["sources"][1]["uri"] = pg.uri(table, user="postgres", password=None)
        jobs.append(job)
    for table, final in zip(bad, run_all(harness, jobs)):
        if table == "pg_catalog.pg_authid":      # a real table: the superuser may read it
            continue
        assert "error" in final and final["stage"] == "staging", (table, final)
    assert_intact(pg, tables)


# ---------------------------------------------------------------------- match_sql


REFUSED = [
    "CREATE TABLE t AS SELECT * FROM l",
    "CREATE EXTERNAL TABLE p STORED AS CSV LOCATION '/etc/passwd'",
    "CREATE VIEW v AS SELECT * FROM l",
    "COPY (SELECT * FROM l) TO '{out}/stolen.csv'",
    "COPY l TO '{out}/stolen.parquet' STORED AS PARQUET",
    "INSERT INTO l SELECT * FROM l",
    "DROP TABLE r",
    "SET datafusion.execution.batch_size = 1",
    "SET datafusion.runtime.memory_limit = '100G'",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'file:///etc/passwd'",
    "SELECT * FROM '{data}/left.csv'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM parquet_metadata('{data}/x.parquet')",
    "SELECT * FROM information_schema.tables",
    "SHOW TABLES",
    "EXPLAIN ANALYZE SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref",
    "PREPARE p AS SELECT * FROM l",
    "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref; DROP TABLE l",
    "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref; COPY l TO '{out}/stolen2.csv'",
]


def refused_job(harness, sql: str, data: Path, rules: bool = False) -> dict:
    text = sql.format(out=harness.out_root, data=data)
    if rules:
        return harness.jobs.make(match_sql=None, rules=[
            {"name": "exact", "match_sql": "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref"},
            {"name": "sneaky", "match_sql": text}])
    return harness.jobs.make(match_sql=text)


@pytest.mark.parametrize("rules", [False, True], ids=["match_sql", "rules"])
def test_match_sql_can_only_read(harness, data_root, rules):
    jobs = [refused_job(harness, sql, data_root, rules) for sql in REFUSED]
    for job in jobs:
        if job.get("match_sql") is None:
            del job["match_sql"]
    finals = run_all(harness, jobs)
    for sql, job, final in zip(REFUSED, jobs, finals):
        assert "error" in final, (sql, final)
        assert "refused" in final["error"] or "not found" in final["error"], (sql, final["error"])
        assert final["stage"] in ("staging", "matching"), final
        assert not no_partial_files(harness.out_root / job["output_path"]), (sql, job)
    assert not list(harness.out_root.glob("stolen*")), list(harness.out_root.glob("stolen*"))
    assert wait_until(lambda: scratch_is_empty(harness.server))


def test_a_job_cannot_reach_another_jobs_tables_or_scratch(harness, data_root):
    """Job A runs (its aliases and its staged files exist); job B names them."""
    running = harness.jobs.make("slow")
    running["sources"][0]["alias"], running["sources"][1]["alias"] = "alpha_src", "beta_src"
    running["match_sql"] = ("SELECT a.id, b.pid FROM alpha_src a JOIN beta_src b "
                            "ON a.g = b.g")
    running["primary_keys"] = {"alpha_src": ["id"], "beta_src": ["pid"]}
    assert harness.server.submit(running).status == 200
    harness.server.wait_running(running["run_id"], stage="matching")
    work = harness.server.root / "work"
    scratch = [p for p in work.iterdir() if p.name.startswith(f"kalla-{running['run_id']}")]
    assert scratch, os.listdir(work)
    staged = next(scratch[0].glob("staged-*.parquet"), scratch[0] / "staged-alpha_src.parquet")
    probes = ["SELECT * FROM alpha_src", "SELECT l.id FROM l JOIN beta_src b ON l.id = b.pid",
              f"SELECT * FROM '{staged}'", f"SELECT * FROM '{scratch[0]}/'"]
    finals = run_all(harness, [harness.jobs.make(match_sql=sql) for sql in probes])
    for sql, final in zip(probes, finals):
        assert "error" in final and "match_sql was refused" in final["error"], (sql, final)
        assert "not found" in final["error"]
    harness.server.request("DELETE", f"/api/jobs/{running['run_id']}")
    harness.listener.terminal(running["run_id"])


def test_the_service_still_serves_after_all_that(harness, pg, tables):
    assert_intact(pg, tables)
    harness.assert_serving()
    uid = str(uuid.uuid4())
    assert harness.server.get(f"/api/jobs/{uid}").status == 404
