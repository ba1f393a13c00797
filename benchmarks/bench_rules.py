"""Three ordered rules against the single-pass job, on the same data (benchmarks/datagen.py).

    exact      ref = ref AND amount = paid
    tolerance  ref = ref AND tolerance_match(amount, paid, 0.02), one_to_one
    then       reference: normalize_ref(ref) = normalize_ref(ref) AND tolerance_pct(.., 0.001)
               (the issue's exact -> tolerance -> normalised reference), or with --third split:
               the remaining payments of an invoice add up to its amount (1:N)

Each job runs through bin/kalla-run (process start included), the two interleaved; the
output shows median and best wall time of N runs, median CPU time, peak RSS and the ratios
three-pass / single-pass. Every run's counts are checked against a numpy model of the same
rules (independent of Kalla's SQL).

Usage: bench_rules.py [--rows 1000000] [--runs 5] [--third reference|split]
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import datagen  # noqa: E402
from run import MATCH_SQL, run_kalla_job, summarize_jobs  # noqa: E402

SELECT = "SELECT l.invoice_id, r.payment_id, l.amount, r.paid_amount FROM invoices l JOIN payments r "
FIRST_TWO = [
    {"name": "exact", "match_sql": SELECT + "ON l.invoice_id = r.reference_number AND l.amount = r.paid_amount"},
    {"name": "tolerance", "one_to_one": True,
     "match_sql": SELECT + "ON l.invoice_id = r.reference_number AND tolerance_match(l.amount, r.paid_amount, 0.02)"},
]
THIRD = {
    "reference": {"name": "reference", "match_sql": SELECT +
                  "ON normalize_ref(l.invoice_id) = normalize_ref(r.reference_number) "
                  "AND tolerance_pct(l.amount, r.paid_amount, 0.001)"},
    "split": {"name": "split", "match_sql":
              "SELECT i.invoice_id, p.payment_id, i.amount, p.paid_amount FROM invoices i "
              "JOIN (SELECT reference_number, SUM(paid_amount) AS total FROM payments GROUP BY reference_number) t "
              "ON i.invoice_id = t.reference_number AND tolerance_match(i.amount, t.total, 0.02) "
              "JOIN payments p ON p.reference_number = i.invoice_id"},
}


def model(directory: str, third: str) -> dict:
    """The rules in numpy over the generated files: per-rule pair counts and unmatched counts."""
    inv = pq.read_table(os.path.join(directory, "invoices.parquet"), columns=["amount"])
    pay = pq.read_table(os.path.join(directory, "payments.parquet"))
    cents, n = datagen._cents(inv["amount"]), inv.num_rows
    refs, paid = pay["reference_number"].to_numpy(), datagen._cents(pay["paid_amount"])
    known = refs <= n
    invoice = np.where(known, refs, 0)               # 0: no such invoice
    owed = np.concatenate([[0], cents])[invoice]
    diff = np.where(known, np.abs(owed - paid), -1)
    used_inv, used_pay = np.zeros(n + 1, bool), np.zeros(len(refs), bool)
    counts = {}

    def take(name, pairs, one_to_one=False):
        pairs = pairs & known & ~used_pay & ~used_inv[invoice]
        if one_to_one:     # an invoice in two pairs is ambiguous (payments pair once anyway)
            pairs &= np.bincount(refs[pairs], minlength=n + 1)[invoice] == 1
        counts[name] = int(pairs.sum())
        used_pay[pairs] = True
        used_inv[refs[pairs]] = True

    take("exact", diff == 0)
    take("tolerance", (diff >= 0) & (diff <= 2), one_to_one=True)
    if third == "reference":   # integer references: normalised, they are equal exactly when equal
        take("reference", (diff >= 0) & (diff * 1000 <= np.maximum(owed, paid)))
    else:
        left = known & ~used_pay & ~used_inv[invoice]
        totals = np.bincount(refs[left], weights=paid[left], minlength=n + 1)
        settled = (np.bincount(refs[left], minlength=n + 1) > 0) & \
            (np.abs(totals - np.concatenate([[0], cents])) <= 2)
        take("split", settled[invoice])
    return {"rule_counts": counts, "unmatched_left": int(n - used_inv[1:].sum()),
            "unmatched_right": int((~used_pay).sum())}


def job_file(work: str, inv: str, pay: str, rules: list | None) -> str:
    job = {"output_path": os.path.join(work, "out"),
           "sources": [{"alias": "invoices", "uri": inv}, {"alias": "payments", "uri": pay}],
           "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}}
    job.update({"rules": rules} if rules else {"match_sql": MATCH_SQL})
    path = os.path.join(work, "job.json")
    with open(path, "w") as fh:
        json.dump(job, fh)
    return path


def run_once(inv: str, pay: str, rules: list | None, expected: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    with tempfile.TemporaryDirectory() as work:
        sample = run_kalla_job(job_file(work, inv, pay, rules), env)
    result = sample["result"]
    if expected and (result["rule_counts"] != expected["rule_counts"]
                     or result["unmatched_left_count"] != expected["unmatched_left"]
                     or result["unmatched_right_count"] != expected["unmatched_right"]):
        raise RuntimeError(f"three-pass counts {result} != model {expected}")
    return sample


def summarize(samples: list[dict]) -> dict:
    return {**summarize_jobs(samples), "matched": samples[0]["result"]["matched_count"],
            "rule_counts": samples[0]["result"].get("rule_counts")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    parser.add_argument("--third", choices=sorted(THIRD), default="reference")
    args = parser.parse_args()
    data = os.path.join(args.data, f"n{args.rows}")
    if not os.path.exists(os.path.join(data, "payments.parquet")):
        datagen.generate(data, args.rows)
    inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
    expected = model(data, args.third)
    rules = FIRST_TWO + [THIRD[args.third]]
    singles, threes = [], []
    for _ in range(args.runs):     # interleaved, so both jobs see the same machine load
        singles.append(run_once(inv, pay, None, None))
        threes.append(run_once(inv, pay, rules, expected))
    single, three = summarize(singles), summarize(threes)
    print(f"{args.rows:,} invoices x {pq.read_metadata(pay).num_rows:,} payments, {args.runs} runs each, "
          f"rules: {' -> '.join(r['name'] for r in rules)}")
    for name, r in (("single-pass", single), ("three-pass", three)):
        print(f"  {name:<12} median {r['median_s']:.2f}s ({r['min_s']:.2f}-{r['max_s']:.2f}), "
              f"CPU {r['median_cpu_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB, matched {r['matched']:,}")
        print("               " + ", ".join(f"{k} {v:.2f}s" for k, v in r["stages_median_s"].items()))
    print(f"  rule counts  {three['rule_counts']} (as the numpy model)")
    ratio = {"median": three["median_s"] / single["median_s"], "min": three["min_s"] / single["min_s"],
             "cpu": three["median_cpu_s"] / single["median_cpu_s"]}
    print(f"  three-pass / single-pass: {ratio['median']:.2f}x median wall, {ratio['min']:.2f}x best wall, "
          f"{ratio['cpu']:.2f}x CPU")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"rules-{args.third}.json"), "w") as fh:
        json.dump({"rows": args.rows, "rules": rules, "single_pass": single, "three_pass": three,
                   "ratio": ratio}, fh, indent=2)


if __name__ == "__main__":
    main()
