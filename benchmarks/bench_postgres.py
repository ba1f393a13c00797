"""PostgreSQL ingest throughput: Kalla's connector vs ADBC and connectorx, same table, same run.

    .venv/bin/python benchmarks/bench_postgres.py [--rows 5000000] [--repeat 3] [--partitions 4]

Uses KALLA_TEST_PG_URL (default postgresql://postgres@127.0.0.1:5432/test). The table
``kalla_bench.ingest_<rows>`` is created once and kept (``--drop`` removes it). Every run is
a fresh subprocess, so its peak RSS is its own; contenders are interleaved across repeats
so that load from other processes spreads over all of them. connectorx is measured only
when it is installed (``pip install connectorx``; it is not a Kalla dependency).

Contenders, all ending with the whole table as Arrow data in the process:
  kalla      PostgresConnector.batches(), streaming: batches are counted, then dropped
  adbc       adbc_driver_postgresql fetch_arrow_table() on one connection (numeric as text)
  connectorx read_sql(partition_on="id", partition_num=N, return_type="arrow")
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = os.environ.get("KALLA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = "kalla_bench"

CREATE = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE UNLOGGED TABLE {table} AS
SELECT g::int8 AS id, 'INV-' || lpad(g::text, 9, '0') AS ref,
       round((random() * 100000)::numeric, 2)::numeric(12,2) AS amount,
       DATE '2020-01-01' + (g % 1500) AS booked,
       TIMESTAMPTZ '2020-01-01 00:00:00+00' + g * INTERVAL '1 second' AS created_at,
       random() AS score, g % 3 = 0 AS settled
FROM generate_series(1, {rows}) g;
ALTER TABLE {table} ADD PRIMARY KEY (id);
VACUUM ANALYZE {table};
"""


def table_name(rows: int) -> str:
    return f"{SCHEMA}.ingest_{rows}"


def ensure_table(rows: int) -> None:
    import psycopg
    table = table_name(rows)
    with psycopg.connect(URL, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", [table]).fetchone()[0]
        if exists and conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == rows:
            return
        print(f"creating {table} ({rows:,} rows)...", file=sys.stderr, flush=True)
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in CREATE.format(schema=SCHEMA, table=table, rows=rows).split(";"):
            if statement.strip():
                conn.execute(statement)


def read_kalla(rows: int, partitions: int) -> int:
    from kalla.config import load_settings
    from kalla.connectors import connector_for
    from kalla.jobs import SourceSpec
    settings = load_settings({"KALLA_PARTITIONS": str(partitions)})
    uri = f"{URL}{'&' if '?' in URL else '?'}table={table_name(rows)}"
    connector = connector_for(SourceSpec("bench", uri, "postgres"), settings)
    connector.schema()
    count = 0
    for batch in connector.batches([], lambda fraction: None):
        count += batch.num_rows
    connector.close()
    return count


def read_adbc(rows: int, partitions: int) -> int:
    import adbc_driver_postgresql.dbapi as adbc
    with adbc.connect(URL) as conn, conn.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table_name(rows)}")
        return cursor.fetch_arrow_table().num_rows


def read_connectorx(rows: int, partitions: int) -> int:
    import connectorx
    table = connectorx.read_sql(URL, f"SELECT * FROM {table_name(rows)}", partition_on="id",
                                partition_num=partitions, return_type="arrow")
    return table.num_rows


READERS = {"kalla": read_kalla, "adbc": read_adbc, "connectorx": read_connectorx}


def run_one(name: str, rows: int, partitions: int) -> None:
    """Child process: read the table once, print {rows, seconds, peak_rss_mib} as JSON."""
    sys.path.insert(0, ROOT)
    # Imports outside the timed region: each contender pays only for its read.
    import adbc_driver_postgresql.dbapi  # noqa: F401
    import pyarrow  # noqa: F401
    if name == "kalla":
        import kalla.connectors.postgres  # noqa: F401
    if name == "connectorx":
        import connectorx  # noqa: F401
    start = time.perf_counter()
    count = READERS[name](rows, partitions)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": count, "seconds": seconds, "peak_rss_mib": peak}))


def available(name: str) -> bool:
    module = {"kalla": "adbc_driver_postgresql", "adbc": "adbc_driver_postgresql",
              "connectorx": "connectorx"}[name]
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def measure(name: str, rows: int, partitions: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", name, "--rows", str(rows),
                          "--partitions", str(partitions)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rows"] != rows:
        raise SystemExit(f"{name} read {result['rows']} rows, expected {rows}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--only", nargs="*", choices=sorted(READERS))
    parser.add_argument("--one", choices=sorted(READERS), help=argparse.SUPPRESS)
    parser.add_argument("--drop", action="store_true", help="drop the benchmark schema and exit")
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args.rows, args.partitions)
    if args.drop:
        import psycopg
        with psycopg.connect(URL, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        return None
    ensure_table(args.rows)
    names = [n for n in (args.only or READERS) if available(n)]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for name in names:
            results[name].append(measure(name, args.rows, args.partitions))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    print(f"\n{args.rows:,} rows, {args.partitions} partitions (kalla, connectorx), "
          f"{args.repeat} runs each, {os.cpu_count()} cores\n")
    print(f"{'reader':<12}{'best rows/s':>14}{'median rows/s':>16}{'median s':>10}"
          f"{'peak RSS MiB':>14}")
    for name, runs in results.items():
        rates = [r["rows"] / r["seconds"] for r in runs]
        print(f"{name:<12}{max(rates):>14,.0f}{statistics.median(rates):>16,.0f}"
              f"{statistics.median(r['seconds'] for r in runs):>10.2f}"
              f"{max(r['peak_rss_mib'] for r in runs):>14,.0f}")


if __name__ == "__main__":
    main()
