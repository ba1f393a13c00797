"""The 1:N split-payment and M:1 batch-payment jobs at 1M, Kalla against DuckDB in the same
run (part of make bench).

* 1:N - an invoice matches the payments that reference it when their sum is within 0.02 of
  its amount: the 5 % of invoices the generator pays in two parts, plus every invoice paid
  once (benchmarks/datagen.py: generate).
* M:1 - a payment settles a batch of 1-5 invoices (``batch_ref``) when it is within 0.02 of
  the batch's total (datagen.generate_batches).

Both tools' three counts must be equal, and for M:1 equal to the generator's expectation.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import datagen  # noqa: E402
from run import counts, kalla_cmd, measure  # noqa: E402

SPLIT_SQL = ("SELECT i.invoice_id, p.payment_id FROM invoices i "
             "JOIN (SELECT reference_number, SUM(paid_amount) AS total FROM payments "
             "GROUP BY reference_number) t ON i.invoice_id = t.reference_number "
             "AND {within}(i.amount, t.total, 0.02) "
             "JOIN payments p ON p.reference_number = i.invoice_id")
BATCH_SQL = ("SELECT i.invoice_id, s.payment_id FROM invoices i "
             "JOIN (SELECT p.payment_id, p.batch_ref FROM payments p "
             "JOIN (SELECT batch_ref, SUM(amount) AS total FROM invoices GROUP BY batch_ref) g "
             "ON g.batch_ref = p.batch_ref AND {within}(g.total, p.amount, 0.02)) s "
             "ON s.batch_ref = i.batch_ref")

# DuckDB: the same match (abs(a - b) <= t for tolerance_match), the same anti-joins and writes
DUCKDB = """
import duckdb, sys
inv, pay, out, sql = sys.argv[1:5]
con = duckdb.connect()
con.execute(f"CREATE MACRO within(a, b, t) AS abs(a - b) <= t")
con.execute(f"CREATE VIEW invoices AS SELECT * FROM read_parquet('{inv}')")
con.execute(f"CREATE VIEW payments AS SELECT * FROM read_parquet('{pay}')")
con.execute(f"CREATE TEMP TABLE matched AS {sql}")
con.execute(f"COPY matched TO '{out}/matched.parquet' (FORMAT parquet)")
con.execute(f"COPY (SELECT * FROM invoices WHERE invoice_id NOT IN (SELECT invoice_id FROM matched)) TO '{out}/unmatched_left.parquet' (FORMAT parquet)")
con.execute(f"COPY (SELECT * FROM payments WHERE payment_id NOT IN (SELECT payment_id FROM matched)) TO '{out}/unmatched_right.parquet' (FORMAT parquet)")
"""


def run_variant(name: str, data: str, sql: str, runs: int, expected: dict | None = None) -> dict:
    """Kalla and DuckDB, alternating, on data/{invoices,payments}.parquet; counts checked."""
    inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    times: dict[str, list[float]] = {"kalla": [], "duckdb": []}
    found = {}
    for _ in range(runs):
        for tool in times:
            with tempfile.TemporaryDirectory(dir=data) as work:
                out = os.path.join(work, "out")
                os.makedirs(out)
                if tool == "kalla":
                    cmd = kalla_cmd(inv, pay, out, work, sql.format(within="tolerance_match"))
                else:
                    cmd = [sys.executable, "-c", DUCKDB, inv, pay, out, sql.format(within="within")]
                times[tool].append(measure(cmd, env)["seconds"])
                found[tool] = counts(out)
    if found["kalla"] != found["duckdb"] or (expected and found["kalla"] != expected):
        raise RuntimeError(f"{name}: counts differ: {found}, expected {expected}")
    medians = {tool: statistics.median(t) for tool, t in times.items()}
    print(f"\n{name} at {pq.read_metadata(inv).num_rows:,} invoices x "
          f"{pq.read_metadata(pay).num_rows:,} payments: matched {found['kalla']['matched']:,}")
    for tool, t in times.items():
        print(f"  {tool:<8} median {medians[tool]:.2f} s ({min(t):.2f}-{max(t):.2f})"
              f"  {medians[tool] / medians['duckdb']:.2f}x")
    return {"counts": found["kalla"], "median_s": medians, "runs": runs,
            "min_s": {k: min(v) for k, v in times.items()}, "max_s": {k: max(v) for k, v in times.items()}}


def run_split(data: str, runs: int) -> dict:
    return run_variant("1:N split payments", data, SPLIT_SQL, runs)


def run_batches(data_root: str, invoices: int, runs: int) -> dict:
    data = os.path.join(data_root, f"batch{invoices}")
    expected = datagen.generate_batches(data, invoices)[2]   # seeded: the same files every time
    return run_variant("M:1 batch payments", data, BATCH_SQL, runs, expected)


if __name__ == "__main__":
    root = os.path.join(HERE, "data")
    run_split(os.path.join(root, "n1000000"), 2)
    run_batches(root, 1_000_000, 2)
