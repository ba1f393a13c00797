"""The 1:N split-payment job at 1M, Kalla against DuckDB in the same run (part of make bench).

An invoice matches the payments that reference it when their sum is within 0.02 of its
amount - the 5 % of invoices the generator pays in two parts, plus every invoice paid once.
Both tools must produce the same matched count (checked).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile

import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from run import kalla_cmd, measure  # noqa: E402

SPLIT_SQL = ("SELECT i.invoice_id, p.payment_id FROM invoices i "
             "JOIN (SELECT reference_number, SUM(paid_amount) AS total FROM payments "
             "GROUP BY reference_number) t ON i.invoice_id = t.reference_number "
             "AND tolerance_match(i.amount, t.total, 0.02) "
             "JOIN payments p ON p.reference_number = i.invoice_id")

DUCKDB = """
import duckdb, sys
inv, pay, out = sys.argv[1:4]
con = duckdb.connect()
con.execute(f"CREATE VIEW invoices AS SELECT * FROM read_parquet('{inv}')")
con.execute(f"CREATE VIEW payments AS SELECT * FROM read_parquet('{pay}')")
con.execute('''CREATE TEMP TABLE matched AS SELECT i.invoice_id, p.payment_id FROM invoices i
    JOIN (SELECT reference_number, SUM(paid_amount) AS total FROM payments GROUP BY reference_number) t
      ON i.invoice_id = t.reference_number AND abs(i.amount - t.total) <= 0.02
    JOIN payments p ON p.reference_number = i.invoice_id''')
con.execute(f"COPY matched TO '{out}/matched.parquet' (FORMAT parquet)")
con.execute(f"COPY (SELECT * FROM invoices WHERE invoice_id NOT IN (SELECT invoice_id FROM matched)) TO '{out}/unmatched_left.parquet' (FORMAT parquet)")
con.execute(f"COPY (SELECT * FROM payments WHERE payment_id NOT IN (SELECT payment_id FROM matched)) TO '{out}/unmatched_right.parquet' (FORMAT parquet)")
"""


def run_split(data: str, runs: int) -> dict:
    inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    times: dict[str, list[float]] = {"kalla": [], "duckdb": []}
    counts = {}
    for _ in range(runs):
        for tool in times:
            with tempfile.TemporaryDirectory(dir=data) as work:
                out = os.path.join(work, "out")
                os.makedirs(out)
                if tool == "kalla":
                    cmd = kalla_cmd(inv, pay, out, work, SPLIT_SQL)
                else:
                    cmd = [sys.executable, "-c", DUCKDB, inv, pay, out]
                times[tool].append(measure(cmd, env)["seconds"])
                counts[tool] = pq.ParquetFile(os.path.join(out, "matched.parquet")).metadata.num_rows
    if counts["kalla"] != counts["duckdb"]:
        raise RuntimeError(f"1:N matched counts differ: {counts}")
    medians = {tool: statistics.median(t) for tool, t in times.items()}
    print(f"\n1:N split payments at {os.path.basename(data)}: matched {counts['kalla']:,}")
    for tool, t in times.items():
        print(f"  {tool:<8} median {medians[tool]:.2f} s ({min(t):.2f}-{max(t):.2f})"
              f"  {medians[tool] / medians['duckdb']:.2f}x")
    return {"matched": counts["kalla"], "median_s": medians,
            "min_s": {k: min(v) for k, v in times.items()}, "max_s": {k: max(v) for k, v in times.items()}}
