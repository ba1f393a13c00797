"""make bench: Kalla end to end (bin/kalla-run, process start included) against DuckDB and
Polars doing the same job, in the same run, on the same generated data.

Prints a table (median wall time of N runs with min-max, peak RSS of the process tree,
ratio to DuckDB, Kalla's stage times, the read and write floors), checks every tool's
counts against an independent expectation, runs the 1:N and M:1 variants
(benchmarks/variants.py) and a memory-limited run, and writes benchmarks/results/latest.json.

Usage: run.py [--quick | --smoke] [--sizes 1000000,10000000] [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import datagen  # noqa: E402

MATCH_SQL = ("SELECT l.invoice_id, r.payment_id, l.amount, r.paid_amount FROM invoices l "
             "JOIN payments r ON l.invoice_id = r.reference_number "
             "AND tolerance_match(l.amount, r.paid_amount, 0.02)")


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; return wall seconds and the peak RSS summed over its process tree."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return {"seconds": wall, "peak_rss": peak, "stdout": out.decode()}


def run_kalla_job(job_path: str, env: dict) -> dict:
    """``bin/kalla-run --json`` one job file: measure()'s sample plus the CPU seconds of the
    run (steadier than wall time on a shared machine) and the parsed result."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sample = measure([os.path.join(ROOT, "bin", "kalla-run"), "--json", job_path], env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    sample["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sample["result"] = json.loads(sample["stdout"])
    return sample


def summarize_jobs(samples: list[dict]) -> dict:
    """Median and min-max wall time, median CPU, peak RSS and median stage times of
    run_kalla_job samples."""
    seconds = [s["seconds"] for s in samples]
    stages = {k: statistics.median(s["result"]["stage_seconds"][k] for s in samples)
              for k in samples[0]["result"]["stage_seconds"]}
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
            "median_cpu_s": statistics.median(s["cpu_s"] for s in samples),
            "peak_rss_mb": max(s["peak_rss"] for s in samples) / 2**20, "stages_median_s": stages}


def counts(outdir: str) -> dict:
    return {name: pq.ParquetFile(os.path.join(outdir, f"{name}.parquet")).metadata.num_rows
            for name in ("matched", "unmatched_left", "unmatched_right")}


def kalla_cmd(inv, pay, outdir, workdir, match_sql: str = MATCH_SQL) -> list[str]:
    job = {"match_sql": match_sql, "output_path": outdir,
           "sources": [{"alias": "invoices", "uri": inv}, {"alias": "payments", "uri": pay}],
           "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}}
    path = os.path.join(workdir, "job.json")
    with open(path, "w") as fh:
        json.dump(job, fh)
    return [os.path.join(ROOT, "bin", "kalla-run"), "--json", path]


TOOLS = {
    "kalla": lambda inv, pay, out, work, mem: kalla_cmd(inv, pay, out, work),
    "duckdb": lambda inv, pay, out, work, mem: [sys.executable, os.path.join(HERE, "peers", "duckdb_job.py"),
                                               inv, pay, out] + ([mem["duckdb"]] if mem else []),
    "polars": lambda inv, pay, out, work, mem: [sys.executable, os.path.join(HERE, "peers", "polars_job.py"),
                                               inv, pay, out],
}


def bench_size(n: int, runs: int, data_root: str, memory: dict | None, tools) -> dict:
    data = os.path.join(data_root, f"n{n}")
    if not os.path.exists(os.path.join(data, "payments.parquet")):
        datagen.generate(data, n)
    inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
    expected = datagen.expected_counts(data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    if memory:
        env["KALLA_WORKER_MEMORY"] = memory["kalla"]
    results, floor = {}, None
    for tool in tools:
        samples = []
        for run in range(runs):
            with tempfile.TemporaryDirectory(dir=data_root) as work:
                out = os.path.join(work, "out")
                os.makedirs(out)
                sample = measure(TOOLS[tool](inv, pay, out, work, memory), env)
                got = counts(out)
                want = {"matched": expected["matched"], "unmatched_left": expected["unmatched_left"],
                        "unmatched_right": expected["unmatched_right"]}
                if got != want:
                    raise RuntimeError(f"{tool} counts {got} != expected {want}")
                if tool == "kalla":
                    sample["stages"] = json.loads(sample["stdout"])["stage_seconds"]
                    if run == runs - 1 and not memory:
                        floor = floors(inv, pay, out)
                samples.append(sample)
        results[tool] = summarize(samples)
    return {"rows": n, "payments": pq.read_metadata(pay).num_rows, "expected": expected,
            "memory": memory, "tools": results, "floors": floor}


def floors(inv: str, pay: str, outdir: str, runs: int = 3) -> dict:
    """The I/O floors of the job: pyarrow reading both inputs, and writing the three outputs
    (Kalla's, with its writer options) in parallel from memory. Medians of ``runs``."""
    from concurrent.futures import ThreadPoolExecutor

    sys.path.insert(0, ROOT)
    from kalla.outputs import writer_options

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    read = statistics.median(timed(lambda: (pq.read_table(inv), pq.read_table(pay))) for _ in range(runs))
    tables = {name: pq.read_table(os.path.join(outdir, f"{name}.parquet"))
              for name in ("matched", "unmatched_left", "unmatched_right")}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(outdir)) as scratch:
        def write_all():
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(lambda item: pq.write_table(item[1], os.path.join(scratch, item[0]),
                                                          **writer_options(item[1].schema)),
                              tables.items()))
        write = statistics.median(timed(write_all) for _ in range(runs))
    return {"read_s": read, "write_s": write}


def summarize(samples: list[dict]) -> dict:
    seconds = [s["seconds"] for s in samples]
    out = {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
           "peak_rss_mb": max(s["peak_rss"] for s in samples) / 2**20, "runs": len(samples)}
    if "stages" in samples[0]:
        out["stages_median_s"] = {k: statistics.median(s["stages"].get(k, 0) for s in samples)
                                  for k in samples[0]["stages"]}
    return out


def print_table(report: dict) -> None:
    for entry in report["results"]:
        label = f"{entry['rows']:,} invoices x {entry['payments']:,} payments"
        if entry["memory"]:
            label += f" (memory limit: kalla {entry['memory']['kalla']}, duckdb {entry['memory']['duckdb']})"
        print(f"\n{label}")
        base = entry["tools"].get("duckdb", {}).get("median_s")
        print(f"  {'tool':<8} {'median s':>9} {'min-max s':>15} {'peak RSS MB':>12} {'vs duckdb':>10}")
        for tool, r in entry["tools"].items():
            ratio = f"{r['median_s'] / base:.2f}x" if base else "-"
            print(f"  {tool:<8} {r['median_s']:>9.2f} {r['min_s']:>7.2f}-{r['max_s']:<7.2f} "
                  f"{r['peak_rss_mb']:>12.0f} {ratio:>10}")
        stages = entry["tools"].get("kalla", {}).get("stages_median_s")
        if stages:
            print("  kalla stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items()))
        floor = entry.get("floors")
        if floor and "kalla" in entry["tools"]:
            total = floor["read_s"] + floor["write_s"]
            print(f"  floors: read both inputs {floor['read_s']:.2f}s + write the three outputs in parallel "
                  f"{floor['write_s']:.2f}s = {total:.2f}s; kalla / floors "
                  f"{entry['tools']['kalla']['median_s'] / total:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1M only")
    parser.add_argument("--smoke", action="store_true", help="tiny data, one run (used by the tests)")
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    parser.add_argument("--tools", default="kalla,duckdb,polars")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [1_000_000]
    if args.smoke:
        sizes, args.runs = [20_000], 1
    tools = args.tools.split(",")
    os.makedirs(args.data, exist_ok=True)
    results = [bench_size(n, args.runs, args.data, None, tools) for n in sizes]
    from variants import run_batches, run_split
    split = run_split(os.path.join(args.data, f"n{min(sizes)}"), args.runs)
    batches = run_batches(args.data, min(sizes), args.runs)
    if not args.smoke:
        limited = {"kalla": "1GiB", "duckdb": "1GB"}
        results.append(bench_size(max(sizes), args.runs, args.data, limited,
                                  [t for t in tools if t != "polars"]))
    report = {"machine": {"cpus": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
                          "python": platform.python_version(), "platform": platform.platform()},
              "results": results, "split_payments": split, "batch_payments": batches}
    print_table(report)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "smoke.json" if args.smoke else "latest.json"), "w") as fh:
        json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
