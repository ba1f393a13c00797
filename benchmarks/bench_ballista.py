"""Local DataFusion vs Apache Ballista (one scheduler, one executor) on the same job.

    .venv/bin/python benchmarks/bench_ballista.py [--sizes 1000000,10000000] [--runs 3]

The job is benchmarks/run.py's: invoices x payments on reference number, tolerance_match
0.02, decimal amounts (benchmarks/datagen.py). Both engines run in this process through
run_job, with the same settings, interleaved run by run; every run's counts are checked
against datagen.expected_counts. The cluster is tests/ballista/localcluster.py's (the
Debian 13 userland of scripts/ballista-env.sh on hosts older than glibc 2.39; needs root),
with the generated data in KALLA_SHARED_DIR, so no source is copied.

Prints a table and a fit of time = fixed + per-row cost for each engine (on each engine's
fastest run: on a shared machine other work only adds time), and from it the
size at which N executors would overtake local mode if the per-row cost split evenly
among them (an upper bound on what more executors can give). Writes
benchmarks/results/ballista.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tests", "ballista"), ROOT]
import datagen  # noqa: E402
from localcluster import LocalCluster, route_stages_through_engines, settings_with  # noqa: E402
from run import MATCH_SQL  # noqa: E402

ENGINES = ("local", "ballista")
EXECUTORS = (1, 2, 4, 8, 16, 32)


class ClusterSeconds(logging.Handler):
    """Collects the cluster's own timings that kalla.engines.ballista logs per run."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last: dict = {}

    def emit(self, record):
        if "cluster seconds" in record.getMessage():
            self.last = {**record.args[2], **{f"host {k}": v for k, v in record.args[3].items()}}


def job_for(inv: str, pay: str, out: str) -> dict:
    return {"match_sql": MATCH_SQL, "output_path": out,
            "sources": [{"alias": "invoices", "uri": inv}, {"alias": "payments", "uri": pay}],
            "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}}


def run_once(engine: str, settings_for, inv, pay, data_root, expected, seconds_log) -> dict:
    from kalla.jobs import parse_job
    from kalla.pipeline import run_job
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f"bench-{engine}-") as work:
        settings = settings_for(engine, work)
        started = time.perf_counter()
        result = run_job(parse_job(job_for(inv, pay, os.path.join(work, "out")), batch=True), settings)
        wall = time.perf_counter() - started
    got = {"matched": result["matched_count"], "unmatched_left": result["unmatched_left_count"],
           "unmatched_right": result["unmatched_right_count"]}
    if got != expected:
        raise RuntimeError(f"{engine}: counts {got} != expected {expected}")
    sample = {"seconds": wall, "stages": result["stage_seconds"]}
    if engine == "ballista":
        sample["cluster"] = seconds_log.last
    return sample


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares time = a + b * rows over (rows, seconds) points.

    >>> fit([(1, 3.0), (3, 7.0)])
    (1.0, 2.0)
    """
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def crossover(local: tuple[float, float], remote: tuple[float, float], executors: int,
              host_per_row: float = 0.0) -> float | None:
    """Rows beyond which ``executors`` executors beat local, if the cluster's per-row cost
    divides evenly among them - all of it but ``host_per_row``, the part spent on Kalla's
    host (copying the parts into the output files), which no executor takes over. None when
    they never do.

    >>> crossover((0.0, 1.0), (2.0, 4.0), 8)
    4.0
    >>> crossover((0.0, 1.0), (2.0, 4.0), 4) is None
    True
    >>> crossover((0.0, 1.0), (2.0, 4.0), 8, host_per_row=0.6) is None
    True
    """
    gain = local[1] - host_per_row - (remote[1] - host_per_row) / executors
    if gain <= 0:
        return None
    return max(0.0, (remote[0] - local[0]) / gain)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(HERE, "data"))
    parser.add_argument("--concurrent-tasks", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    data_root = os.path.realpath(args.data)
    os.makedirs(data_root, exist_ok=True)
    from kalla import pipeline
    from kalla.config import load_settings
    pipeline.STAGES = route_stages_through_engines(pipeline)
    seconds_log = ClusterSeconds()
    logging.getLogger("kalla.engines.ballista").addHandler(seconds_log)
    logging.getLogger("kalla.engines.ballista").setLevel(logging.INFO)

    results = []
    with LocalCluster(shared_dir=data_root, logs=os.path.join(data_root, "ballista-logs"),
                      concurrent_tasks=args.concurrent_tasks) as cluster:
        print(f"cluster: {cluster.description}", flush=True)

        def settings_for(engine: str, work: str):
            base = load_settings({"KALLA_WORK_DIR": work})
            values = {"KALLA_ENGINE": engine, "KALLA_BALLISTA_URL": cluster.url,
                      "KALLA_SHARED_DIR": data_root, "KALLA_BALLISTA_PYTHON": cluster.python}
            return settings_with(base, values, os.environ.__setitem__)

        for n in (int(s) for s in args.sizes.split(",")):
            data = os.path.join(data_root, f"n{n}")
            if not os.path.exists(os.path.join(data, "payments.parquet")):
                datagen.generate(data, n)
            inv, pay = os.path.join(data, "invoices.parquet"), os.path.join(data, "payments.parquet")
            expected = datagen.expected_counts(data)
            samples = {engine: [] for engine in ENGINES}
            for _ in range(args.runs):
                for engine in ENGINES:          # interleaved: drift hits both alike
                    samples[engine].append(run_once(engine, settings_for, inv, pay, data_root,
                                                    expected, seconds_log))
            entry = {"rows": n, "expected": expected, "engines": {}}
            for engine, runs in samples.items():
                entry["engines"][engine] = summarize(runs)
            results.append(entry)
            print_entry(entry)
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "platform": platform.platform()},
              "cluster": {"schedulers": 1, "executors": 1, "concurrent_tasks": args.concurrent_tasks},
              "results": results, "model": model(results)}
    print_model(report["model"])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "ballista.json"), "w") as fh:
        json.dump(report, fh, indent=2)


def summarize(runs: list[dict]) -> dict:
    seconds = [s["seconds"] for s in runs]
    out = {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds),
           "stages_median_s": {k: statistics.median(s["stages"][k] for s in runs)
                               for k in runs[0]["stages"]}}
    if "cluster" in runs[0]:
        out["cluster_median_s"] = {k: statistics.median(s["cluster"][k] for s in runs)
                                   for k in runs[0]["cluster"]}
    return out


def print_entry(entry: dict) -> None:
    print(f"\n{entry['rows']:,} invoices ({entry['expected']['matched']:,} matched)")
    print(f"  {'engine':<9} {'median s':>9} {'min-max s':>15}  stages (median s)")
    for engine, r in entry["engines"].items():
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages_median_s"].items())
        print(f"  {engine:<9} {r['median_s']:>9.2f} {r['min_s']:>7.2f}-{r['max_s']:<7.2f}  {stages}")
        if "cluster_median_s" in r:
            print("  " + " " * 36 + "cluster / host: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in r["cluster_median_s"].items()))
    local, remote = entry["engines"]["local"], entry["engines"]["ballista"]
    print(f"  ballista / local: {remote['median_s'] / local['median_s']:.2f}x median, "
          f"{remote['min_s'] / local['min_s']:.2f}x fastest", flush=True)


def model(results: list[dict]) -> dict:
    # The fastest run of each: on a shared machine other work only ever adds time.
    per_engine = {engine: fit([(r["rows"], r["engines"][engine]["min_s"]) for r in results])
                  for engine in ENGINES}
    largest = max(results, key=lambda r: r["rows"])
    host = largest["engines"]["ballista"]["cluster_median_s"]["host publish"] / largest["rows"]
    local, remote = per_engine["local"], per_engine["ballista"]
    return {"fit_seconds": {e: {"fixed": a, "per_million_rows": b * 1e6}
                            for e, (a, b) in per_engine.items()},
            "host_publish_per_million_rows": host * 1e6,
            "crossover_rows": {str(k): crossover(local, remote, k, host) for k in EXECUTORS},
            "crossover_rows_if_all_scaled": {str(k): crossover(local, remote, k) for k in EXECUTORS}}


def print_model(m: dict) -> None:
    print("\nfit of the fastest runs: time = fixed + per-row cost (one executor)")
    for engine, f in m["fit_seconds"].items():
        print(f"  {engine:<9} {f['fixed']:.2f} s + {f['per_million_rows']:.2f} s per million rows")
    print(f"  of Ballista's, {m['host_publish_per_million_rows']:.2f} s per million rows is spent "
          "on Kalla's host copying the parts into the output files")
    print("rows beyond which N executors would beat local: the cluster's per-row cost split evenly")
    print("among them (the host's part not / also split):")
    for k, rows in m["crossover_rows"].items():
        both = (rows, m["crossover_rows_if_all_scaled"][k])
        print(f"  {k:>2} executors: " + " / ".join(f"{r:,.0f}" if r is not None else "never"
                                                   for r in both))


if __name__ == "__main__":
    main()
