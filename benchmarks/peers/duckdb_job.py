"""The benchmark job done with DuckDB: 1:1 match within 0.02, two anti-joins, three Parquet writes.

Usage: duckdb_job.py INVOICES PAYMENTS OUTDIR [MEMORY_LIMIT]
"""
import sys

import duckdb

invoices, payments, out = sys.argv[1:4]
con = duckdb.connect()
if len(sys.argv) > 4:
    con.execute(f"SET memory_limit = '{sys.argv[4]}'")
con.execute(f"CREATE VIEW inv AS SELECT * FROM read_parquet('{invoices}')")
con.execute(f"CREATE VIEW pay AS SELECT * FROM read_parquet('{payments}')")
con.execute("""CREATE TEMP TABLE matched AS
    SELECT l.invoice_id, r.payment_id, l.amount, r.paid_amount
    FROM inv l JOIN pay r ON l.invoice_id = r.reference_number
    AND abs(l.amount - r.paid_amount) <= 0.02""")
con.execute(f"COPY matched TO '{out}/matched.parquet' (FORMAT parquet)")
con.execute(f"""COPY (SELECT * FROM inv WHERE invoice_id NOT IN (SELECT invoice_id FROM matched))
    TO '{out}/unmatched_left.parquet' (FORMAT parquet)""")
con.execute(f"""COPY (SELECT * FROM pay WHERE payment_id NOT IN (SELECT payment_id FROM matched))
    TO '{out}/unmatched_right.parquet' (FORMAT parquet)""")
