"""The benchmark job done with Polars (lazy, streaming): match, two anti-joins, three writes.

Usage: polars_job.py INVOICES PAYMENTS OUTDIR
"""
import sys

import polars as pl

invoices, payments, out = sys.argv[1:4]
inv = pl.scan_parquet(invoices)
pay = pl.scan_parquet(payments)
matched = (inv.join(pay, left_on="invoice_id", right_on="reference_number", nulls_equal=False)
           .filter((pl.col("amount") - pl.col("paid_amount")).abs() <= pl.lit(0.02))
           .select("invoice_id", "payment_id", "amount", "paid_amount"))
matched.sink_parquet(f"{out}/matched.parquet")
keys = pl.scan_parquet(f"{out}/matched.parquet")
inv.join(keys.select("invoice_id"), on="invoice_id", how="anti", nulls_equal=False) \
   .sink_parquet(f"{out}/unmatched_left.parquet")
pay.join(keys.select("payment_id"), on="payment_id", how="anti", nulls_equal=False) \
   .sink_parquet(f"{out}/unmatched_right.parquet")
