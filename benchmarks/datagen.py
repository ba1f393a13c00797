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


def generate_batches(directory: str, invoices: int, seed: int = 7) -> tuple[str, str, dict]:
    """M:1 batch payments: invoices grouped in batches of 1-5 (``batch_ref``); one payment
    per batch for 90 % of the batches - 80 % with the batch's exact total, 10 % off by
    0.05-10.00 (no match) - and orphan payments naming no batch (5 %).

    Returns the two paths and the independent expectation for the M:1 job (tolerance 0.02).
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    sizes = rng.integers(1, 6, invoices)            # more than enough batches
    ends = np.cumsum(sizes)
    sizes = sizes[:np.searchsorted(ends, invoices) + 1]
    sizes[-1] -= int(sizes.sum() - invoices)
    batches = len(sizes)
    batch_of = np.repeat(np.arange(1, batches + 1, dtype=np.int64), sizes)
    cents = rng.integers(1_000, 2_000_000, invoices)
    totals = np.bincount(batch_of, weights=cents, minlength=batches + 1)[1:].astype(np.int64)
    kind = rng.random(batches)
    exact, wrong = kind < 0.80, (kind >= 0.80) & (kind < 0.90)
    paid_batches = np.flatnonzero(exact | wrong) + 1
    off = rng.integers(5, 1_001, batches) * rng.choice([-1, 1], batches)
    paid = np.where(exact, totals, totals + off)[paid_batches - 1]
    orphans = int(len(paid_batches) * 0.05)
    refs = np.concatenate([paid_batches, batches + 1 + np.arange(orphans)])
    paid = np.concatenate([paid, rng.integers(1_000, 2_000_000, orphans)])
    order = rng.permutation(len(refs))
    refs, paid = refs[order], paid[order]
    inv_path = os.path.join(directory, "invoices.parquet")
    pay_path = os.path.join(directory, "payments.parquet")
    pq.write_table(pa.table({"invoice_id": np.arange(1, invoices + 1, dtype=np.int64),
                             "batch_ref": batch_of, "amount": _decimal(cents)}), inv_path)
    pq.write_table(pa.table({"payment_id": np.arange(1, len(refs) + 1, dtype=np.int64),
                             "batch_ref": refs, "amount": _decimal(paid)}), pay_path)
    settled = np.zeros(batches + 1, bool)
    settled[np.flatnonzero(exact) + 1] = True
    matched = int(sizes[exact].sum())               # one row per invoice of a settled batch
    return inv_path, pay_path, {"matched": matched, "unmatched_left": invoices - matched,
                                "unmatched_right": len(refs) - int(exact.sum())}


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
