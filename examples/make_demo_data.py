"""Write the demo's example invoices (CSV) and payments (Parquet) and its job file.

Usage: python examples/make_demo_data.py DIR
"""
from __future__ import annotations

import decimal
import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def make(directory: str, invoices: int = 1000, seed: int = 7) -> str:
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    inv_rows, pay_rows = [], []
    for i in range(1, invoices + 1):
        amount = decimal.Decimal(rng.randint(1000, 500000)) / 100
        inv_rows.append({"invoice_id": f"INV-{i:05d}", "customer": f"C{rng.randint(1, 80):03d}",
                         "amount": str(amount), "due_date": f"2024-{rng.randint(1, 12):02d}-15"})
        kind = rng.random()
        if kind < 0.70:      # paid exactly
            pay_rows.append((f"INV-{i:05d}", amount))
        elif kind < 0.85:    # paid with a rounding difference within 0.02
            pay_rows.append((f"INV-{i:05d}", amount + decimal.Decimal(rng.choice([-2, -1, 1, 2])) / 100))
        elif kind < 0.92:    # paid with a real difference: should not match
            pay_rows.append((f"INV-{i:05d}", amount - decimal.Decimal("5.00")))
        # else: unpaid
    for j in range(int(invoices * 0.05)):     # payments with no invoice
        pay_rows.append((f"INV-9{j:04d}", decimal.Decimal(rng.randint(1000, 50000)) / 100))
    rng.shuffle(pay_rows)
    inv_path = os.path.join(directory, "invoices.csv")
    pacsv.write_csv(pa.Table.from_pylist(inv_rows), inv_path)
    payments = pa.table({
        "payment_id": [f"PAY-{k:06d}" for k in range(1, len(pay_rows) + 1)],
        "reference_number": [ref for ref, _ in pay_rows],
        "paid_amount": pa.array([amt for _, amt in pay_rows], pa.decimal128(12, 2)),
    })
    pay_path = os.path.join(directory, "payments.parquet")
    pq.write_table(payments, pay_path)
    job = {
        "match_sql": ("SELECT i.invoice_id, p.payment_id, i.amount, p.paid_amount "
                      "FROM invoices i JOIN payments p ON i.invoice_id = p.reference_number "
                      "AND tolerance_match(i.amount, p.paid_amount, 0.02)"),
        "sources": [{"alias": "invoices", "uri": os.path.abspath(inv_path)},
                    {"alias": "payments", "uri": os.path.abspath(pay_path)}],
        "output_path": os.path.abspath(os.path.join(directory, "output")),
        "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]},
    }
    job_path = os.path.join(directory, "job.json")
    with open(job_path, "w") as fh:
        json.dump(job, fh, indent=2)
    return job_path


if __name__ == "__main__":
    print(make(sys.argv[1] if len(sys.argv) > 1 else "examples/demo"))
