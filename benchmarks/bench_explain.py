"""The cost of explained breaks: the `make bench` job with and without ``explain: true``.

Both jobs run through bin/kalla-run (process start included), interleaved so they see the
same machine load; the output shows median and min-max wall time, median CPU time, peak RSS
and the ratio explain / plain. Every explained run's break reasons are checked against a
numpy model of the generated data (independent of Kalla's SQL):

    left  (invoices): no payment references it -> no_candidate, else rule_failed
    right (payments): its reference names no invoice -> no_candidate, else rule_failed

Usage: bench_explain.py [--rows 1000000] [--runs 5] [--memory 1GiB] [--data DIR] [--out FILE]
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


def model(directory: str) -> dict:
    """Expected break reasons per side, from the generated files alone."""
    expected = datagen.expected_counts(directory)
    n = pq.read_metadata(os.path.join(directory, "invoices.parquet")).num_rows
    refs = pq.read_table(os.path.join(directory, "payments.parquet"),
                         columns=["reference_number"]).column(0).to_numpy()
    known = (refs >= 1) & (refs <= n)
    referenced = np.zeros(n + 1, bool)
    referenced[refs[known]] = True
    no_candidate_left = int(n - referenced[1:].sum())
    no_candidate_right = int((~known).sum())
    return {"left": {"no_candidate": no_candidate_left,
                     "rule_failed": expected["unmatched_left"] - no_candidate_left},
            "right": {"no_candidate": no_candidate_right,
                      "rule_failed": expected["unmatched_right"] - no_candidate_right}}


def run_once(inv: str, pay: str, explain: bool, memory: str | None, expected: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    if memory:
        env["KALLA_WORKER_MEMORY"] = memory
    with tempfile.TemporaryDirectory() as work:
        job = {"match_sql": MATCH_SQL, "output_path": os.path.join(work, "out"), "explain": explain,
               "sources": [{"alias": "invoices", "uri": inv}, {"alias": "payments", "uri": pay}],
               "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}}
        path = os.path.join(work, "job.json")
        with open(path, "w") as fh:
            json.dump(job, fh)
        sample = run_kalla_job(path, env)
    result = sample["result"]
    if explain and result.get("break_reasons") != expected:
        raise RuntimeError(f"break reasons {result.get('break_reasons')} != model {expected}")
    return sample


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--memory", help="KALLA_WORKER_MEMORY for both jobs, e.g. 1GiB")
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    parser.add_argument("--out", default=os.path.join(HERE, "results", "explain.json"))
    args = parser.parse_args()
    data = os.path.join(args.data, f"n{args.rows}")
    if not os.path.exists(os.path.join(data, "payments.parquet")):
        datagen.generate(data, args.rows)
    inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
    expected = model(data)
    plain, explained = [], []
    for _ in range(args.runs):     # interleaved, so both jobs see the same machine load
        plain.append(run_once(inv, pay, False, args.memory, expected))
        explained.append(run_once(inv, pay, True, args.memory, expected))
    results = {"plain": summarize_jobs(plain), "explain": summarize_jobs(explained)}
    print(f"{args.rows:,} invoices x {pq.read_metadata(pay).num_rows:,} payments, {args.runs} runs each"
          + (f", KALLA_WORKER_MEMORY={args.memory}" if args.memory else ""))
    for name, r in results.items():
        print(f"  {name:<8} median {r['median_s']:.2f}s ({r['min_s']:.2f}-{r['max_s']:.2f}), "
              f"CPU {r['median_cpu_s']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB")
        print("           " + ", ".join(f"{k} {v:.2f}s" for k, v in r["stages_median_s"].items()))
    print(f"  break reasons {expected} (as the numpy model)")
    ratio = {"median": results["explain"]["median_s"] / results["plain"]["median_s"],
             "min": results["explain"]["min_s"] / results["plain"]["min_s"],
             "cpu": results["explain"]["median_cpu_s"] / results["plain"]["median_cpu_s"]}
    print(f"  explain / plain: {ratio['median']:.2f}x median wall, {ratio['min']:.2f}x best wall, "
          f"{ratio['cpu']:.2f}x CPU")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"rows": args.rows, "memory": args.memory, "expected": expected, **results,
                   "ratio": ratio}, fh, indent=2)


if __name__ == "__main__":
    main()
