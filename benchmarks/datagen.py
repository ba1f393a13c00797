"""Seeded reconciliation data: invoices and payments as Parquet.

Of the invoices, 60% are paid with the exact amount, 15% with a difference within ±0.02,
5% in two parts (a 1:N split), the rest not at all; orphan payments (no invoice) add 10%
of the payment count. Amounts are decimal128(12, 2).
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

AMOUNT = pa.decimal128(12, 2)


def _decimal(cents: np.ndarray) -> pa.Array:
    """int64 cents -> decimal128(12, 2) exactly: the cents are the unscaled 128-bit values."""
    words = np.empty((len(cents), 2), dtype=np.int64)
    words[:, 0] = cents
    words[:, 1] = cents >> 63          # sign extension into the high word
    return pa.Array.from_buffers(AMOUNT, len(cents), [None, pa.py_buffer(words.tobytes())])


def generate(directory: str, invoices: int, seed: int = 42) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    inv_ids = np.arange(1, invoices + 1, dtype=np.int64)
    cents = rng.integers(1_000, 5_000_000, invoices)
    kind = rng.random(invoices)
    exact, near, split = kind < 0.60, (kind >= 0.60) & (kind < 0.75), (kind >= 0.75) & (kind < 0.80)
    delta = rng.integers(-2, 3, invoices)
    refs = np.concatenate([inv_ids[exact], inv_ids[near], inv_ids[split], inv_ids[split]])
    part = (cents[split] * rng.uniform(0.2, 0.8, split.sum())).astype(np.int64)
    paid = np.concatenate([cents[exact], cents[near] + delta[near], part, cents[split] - part])
    orphans = int(len(refs) / 9)                 # orphans are 10% of all payments
    refs = np.concatenate([refs, invoices + 1 + np.arange(orphans)])
    paid = np.concatenate([paid, rng.integers(1_000, 5_000_000, orphans)])
    order = rng.permutation(len(refs))
    refs, paid = refs[order], paid[order]
    inv_path = os.path.join(directory, "invoices.parquet")
    pay_path = os.path.join(directory, "payments.parquet")
    pq.write_table(pa.table({
        "invoice_id": inv_ids, "customer_id": rng.integers(1, 50_000, invoices),
        "amount": _decimal(cents),
        "due_date": pa.array(rng.integers(19_700, 20_100, invoices), pa.int32()).cast(pa.date32()),
    }), inv_path)
    pq.write_table(pa.table({
        "payment_id": np.arange(1, len(refs) + 1, dtype=np.int64), "reference_number": refs,
        "paid_amount": _decimal(paid),
    }), pay_path)
    return inv_path, pay_path


def expected_counts(directory: str) -> dict:
    """Independent expectation for the 1:1 job, in numpy over the generated files."""
    inv = pq.read_table(os.path.join(directory, "invoices.parquet"), columns=["invoice_id", "amount"])
    pay = pq.read_table(os.path.join(directory, "payments.parquet"))
    n = inv.num_rows                         # invoice ids are 1..n
    inv_cents = _cents(inv["amount"])
    refs = pay["reference_number"].to_numpy()
    known = refs <= n
    diff = np.abs(inv_cents[np.where(known, refs - 1, 0)] - _cents(pay["paid_amount"]))
    hit = known & (diff <= 2)
    matched_invoices = np.unique(refs[hit]).size
    return {"matched": int(hit.sum()), "unmatched_left": n - matched_invoices,
            "unmatched_right": int((~hit).sum())}


def _cents(column) -> np.ndarray:
    words = np.frombuffer(column.combine_chunks().buffers()[1], dtype=np.int64)
    return words[0::2].copy()
