"""Whole reconciliation jobs reading PostgreSQL: run_job and bin/kalla-run."""
from __future__ import annotations

import csv
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from support import KALLA_RUN

from kalla.errors import KallaError, SourceError
from kalla.jobs import parse_job
from kalla.pipeline import run_job

MATCH_SQL = ("SELECT l.invoice_id, r.payment_id FROM left_src l JOIN right_src r "
             "ON l.invoice_id = r.reference_number AND tolerance_match(l.amount, r.paid_amount, 0.02)")
# 1000 invoices; 900 payments: 880 name an invoice, of which every 50th is 5.00 off.
MATCHED, UNMATCHED_LEFT, UNMATCHED_RIGHT = 880 - 17, 1000 - 863, 900 - 863


@pytest.fixture(scope="module")
def ledgers(pg):
    """invoices in the session schema; payments in a quoted schema with a quoted name."""
    invoices = pg.qualified("invoices")
    quoted_schema = f"{pg.schema} Fin"
    pg.extra_schemas.append(quoted_schema)
    payments = f'"{quoted_schema}"."Payments 2024"'
    pg.execute(f'CREATE SCHEMA "{quoted_schema}"')
    pg.execute(f'GRANT USAGE ON SCHEMA "{quoted_schema}" TO {pg.reader}')
    pg.execute(f"""CREATE TABLE {invoices} AS SELECT 'INV-' || lpad(i::text, 4, '0') AS invoice_id,
        (i * 1.01)::numeric(12,2) AS amount, DATE '2024-01-01' + i % 60 AS issued
        FROM generate_series(1, 1000) i""")
    pg.execute(f"""CREATE TABLE {payments} AS SELECT j AS payment_id,
        CASE WHEN j <= 880 THEN 'INV-' || lpad(j::text, 4, '0') ELSE 'UNKNOWN-' || j END
            AS reference_number,
        (j * 1.01 + CASE WHEN j % 10 = 0 THEN 0.01 ELSE 0 END
                  + CASE WHEN j % 50 = 0 THEN 5 ELSE 0 END)::numeric(12,2) AS paid_amount,
        TIMESTAMPTZ '2024-02-01 00:00:00+00' + j * INTERVAL '1 minute' AS paid_at
        FROM generate_series(1, 900) j""")
    pg.execute(f"GRANT SELECT ON {payments} TO {pg.reader}")
    return invoices, payments


def job_dict(left_uri: str, right_uri: str, output: str, left_filters=None) -> dict:
    return {"match_sql": MATCH_SQL, "output_path": output,
            "sources": [{"alias": "left_src", "uri": left_uri, "filters": left_filters or []},
                        {"alias": "right_src", "uri": right_uri}],
            "primary_keys": {"left_src": ["invoice_id"], "right_src": ["payment_id"]}}


def check_counts(result: dict, matched: int, left: int, right: int) -> None:
    assert (result["matched_count"], result["unmatched_left_count"],
            result["unmatched_right_count"]) == (matched, left, right)
    for name, key in (("matched", "matched_count"), ("unmatched_left", "unmatched_left_count"),
                      ("unmatched_right", "unmatched_right_count")):
        assert pq.ParquetFile(result["output_paths"][name]).metadata.num_rows == result[key]


def test_postgres_x_postgres(pg, ledgers, tmp_path, settings):
    invoices, payments = ledgers
    spec = parse_job(job_dict(pg.uri(invoices), pg.uri(payments), str(tmp_path / "out")),
                     batch=True)
    events = []
    result = run_job(spec, settings.replace(partitions=3), events.append)
    check_counts(result, MATCHED, UNMATCHED_LEFT, UNMATCHED_RIGHT)
    assert result["source_rows"] == {"left_src": 1000, "right_src": 900}
    unmatched_right = pq.read_table(result["output_paths"]["unmatched_right"])
    assert unmatched_right.schema.field("paid_amount").type == pa.decimal128(12, 2)
    assert unmatched_right.schema.field("paid_at").type == pa.timestamp("us", tz="UTC")
    for alias in ("left_src", "right_src"):
        staged = [e["progress"] for e in events if e.get("source") == alias]
        assert staged and staged[-1] == 1.0 and staged == sorted(staged)


def test_postgres_x_local_csv_with_pushed_down_filter(pg, ledgers, tmp_path, settings):
    invoices, _ = ledgers
    payments_csv = tmp_path / "payments.csv"
    with open(payments_csv, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["payment_id", "reference_number", "paid_amount"])
        for j in range(1, 901):
            ref = f"INV-{j:04d}" if j <= 880 else f"UNKNOWN-{j}"
            amount = j * 101 + (1 if j % 10 == 0 else 0) + (500 if j % 50 == 0 else 0)
            out.writerow([j, ref, f"{amount // 100}.{amount % 100:02d}"])
    filters = [{"column": "issued", "op": "gte", "value": "2024-01-02"}]   # drops i % 60 == 0
    spec = parse_job(job_dict(pg.uri(invoices), str(payments_csv), str(tmp_path / "out"),
                              filters), batch=True)
    result = run_job(spec, settings, lambda e: None)
    dropped = [i for i in range(1, 1001) if i % 60 == 0]
    lost_matches = [i for i in dropped if i <= 880 and i % 50 != 0]
    matched = MATCHED - len(lost_matches)
    check_counts(result, matched, 1000 - len(dropped) - matched, 900 - matched)
    assert result["source_rows"]["left_src"] == 1000 - len(dropped)


def test_every_type_survives_into_the_output_files(pg, types_table, types_rows, tmp_path,
                                                    settings):
    """The Postgres types table joined to a CSV of ids: matched rows carry every column,
    unmatched_left carries the full source row (through Polars) - all types intact."""
    schema, expected = types_rows
    ids = tmp_path / "ids.csv"
    ids.write_text("rid\n1\n2\n3\n")
    job = {"match_sql": "SELECT l.*, r.rid FROM types_src l JOIN ids r ON l.id = r.rid",
           "output_path": str(tmp_path / "out"),
           "sources": [{"alias": "types_src", "uri": pg.uri(types_table)},
                       {"alias": "ids", "uri": str(ids)}],
           "primary_keys": {"types_src": ["id"], "ids": ["rid"]}}
    result = run_job(parse_job(job, batch=True), settings, lambda e: None)
    check_counts(result, 3, 1, 0)
    matched = pq.read_table(result["output_paths"]["matched"]).sort_by("id")
    unmatched = pq.read_table(result["output_paths"]["unmatched_left"])
    for got, want in ((matched.select(schema.names), expected.slice(0, 3)),
                      (unmatched.select(schema.names), expected.slice(3, 1))):
        for name in schema.names:
            column = got.column(name)
            if column.type != schema.field(name).type:     # a view type is still the type
                column = column.cast(schema.field(name).type)
            assert same(column.combine_chunks(), want.column(name).combine_chunks()), name


def same(a: pa.Array, b: pa.Array) -> bool:
    """Arrow equality where NaN equals NaN (a real NaN must survive as NaN)."""
    if pa.types.is_floating(a.type) and a.type == b.type:
        a, b = (pc.if_else(pc.is_nan(x), pa.scalar(-0.123, x.type), x) for x in (a, b))
    return a.equals(b)


def test_failed_source_fails_the_job_without_output(pg, ledgers, tmp_path, settings):
    invoices, _ = ledgers
    out = tmp_path / "out"
    spec = parse_job(job_dict(pg.uri(invoices), pg.uri(pg.qualified("no_such_table")),
                              str(out)), batch=True)
    with pytest.raises(SourceError) as info:
        run_job(spec, settings, lambda e: None)
    assert info.value.stage == "staging"
    assert "source 'right_src'" in str(info.value) and "does not exist" in str(info.value)
    assert not out.exists() or not os.listdir(out)


def kalla_run(job: dict, tmp_path, env) -> subprocess.CompletedProcess:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.run([KALLA_RUN, "--json", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_kalla_run_job_file(pg, ledgers, tmp_path, cli_env):
    invoices, payments = ledgers
    done = kalla_run(job_dict(pg.uri(invoices), pg.uri(payments), str(tmp_path / "out")),
                     tmp_path, cli_env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    check_counts(result, MATCHED, UNMATCHED_LEFT, UNMATCHED_RIGHT)


def test_kalla_run_wrong_password_fails_cleanly(pg, ledgers, password_server, tmp_path,
                                                 cli_env):
    invoices, _ = ledgers
    admin_url, role = password_server
    secret = "Wr0ng:pa/ss@word"
    bad = pg.uri("t", user=role, password=secret, server=admin_url)
    out = tmp_path / "out"
    done = kalla_run(job_dict(pg.uri(invoices), bad, str(out)), tmp_path, cli_env)
    assert done.returncode == 1
    assert f"rejected the password of user '{role}'" in done.stderr
    for text in (done.stderr, done.stdout):
        assert secret not in text and "Wr0ng" not in text
    assert not out.exists() or not os.listdir(out)


def test_error_reaches_the_caller_as_data(pg, tmp_path, settings):
    spec = parse_job(job_dict(pg.uri("x", database="kalla_no_such_db"), pg.uri("y"),
                              str(tmp_path / "out")), batch=True)
    with pytest.raises(KallaError) as info:
        run_job(spec, settings, lambda e: None)
    body = info.value.to_dict()
    assert body["stage"] == "staging" and pg.password not in json.dumps(body)
    assert "database 'kalla_no_such_db' does not exist" in body["message"]
