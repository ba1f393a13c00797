"""The benchmark script runs end to end on tiny data (no timing is asserted: it must not rot).

benchmarks/run.py checks every tool's three counts against an independent numpy model and
fails if one differs, so this also cross-checks Kalla against DuckDB and Polars, and on the
1:N and M:1 variants against DuckDB."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from support import ROOT


def test_benchmark_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--smoke",
                           "--data", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(ROOT, "benchmarks", "results", "smoke.json")))
    tools = report["results"][0]["tools"]
    assert set(tools) == {"kalla", "duckdb", "polars"}
    assert set(tools["kalla"]["stages_median_s"]) >= {"staging", "matching", "unmatched"}
    floors = report["results"][0]["floors"]
    assert floors["read_s"] > 0 and floors["write_s"] > 0
    # the 1:N and M:1 variants ran, and both tools agreed (the script checks, M:1 against
    # the generator's own expectation)
    assert report["split_payments"]["counts"]["matched"] > 0
    assert report["batch_payments"]["counts"]["matched"] > 0


def test_explain_benchmark_smoke(tmp_path):
    """bench_explain.py checks every explained run's break reasons against its numpy model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
    out = tmp_path / "explain.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_explain.py"),
                           "--rows", "20000", "--runs", "1", "--data", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["expected"]["left"]["no_candidate"] > 0 and report["expected"]["right"]["rule_failed"] > 0
    assert report["explain"]["stages_median_s"]["unmatched"] > 0
