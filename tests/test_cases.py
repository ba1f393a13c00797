"""Data-driven reconciliation cases: tests/cases/NAME/{job.json, inputs, expected.json}.

Expected results were worked out by hand from the inputs (see each case's data).
"""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from casefiles import assert_output_rows, case_names, has_decimal_variant, load_case
from support import KALLA_RUN

from kalla.errors import KallaError
from kalla.jobs import parse_job
from kalla.pipeline import run_job

VARIANTS = [(name, "csv") for name in case_names()] + \
           [(name, "parquet") for name in case_names() if has_decimal_variant(name)] + \
           [("one_to_one_tolerance", "parquet"), ("composite_keys", "parquet")]


def check_outputs(result: dict, expected: dict, job: dict) -> None:
    paths = result["output_paths"]
    assert_output_rows(paths, expected, job)
    # counts always equal the files' row counts
    for name, count in (("matched", "matched_count"), ("unmatched_left", "unmatched_left_count"),
                        ("unmatched_right", "unmatched_right_count")):
        assert pq.ParquetFile(paths[name]).metadata.num_rows == result[count]
    summary = json.load(open(os.path.join(job["output_path"], "summary.json")))
    assert summary["matched_count"] == result["matched_count"]
    for alias, n in expected.get("source_rows", {}).items():
        assert summary["source_rows"][alias] == n
    for alias, n in expected.get("null_key_rows", {}).items():
        assert summary["null_key_rows"][alias] == n
    check_rules_and_expectations(result, summary, expected, job)


NEW_FIELDS = ("rule_counts", "ambiguous", "passed", "failed_checks")


def check_rules_and_expectations(result: dict, summary: dict, expected: dict, job: dict) -> None:
    """Rules and expect add fields; a job without them has exactly the fields it had."""
    matched_names = pq.read_schema(result["output_paths"]["matched"]).names
    assert ("match_rule" in matched_names) == ("rules" in job)
    if "rules" not in job and "expect" not in job:
        assert not set(NEW_FIELDS) & (set(result) | set(summary))
    for name in ("rule_counts", "ambiguous", "passed"):
        if name in expected:
            assert result[name] == summary[name] == expected[name]
    if "failed_checks" in expected:
        for body in (result, summary):
            assert [c["check"] for c in body["failed_checks"]] == expected["failed_checks"]


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_case(name, variant, tmp_path, settings):
    job, expected = load_case(name, tmp_path, variant)
    spec = parse_job(job, batch=True)
    events = []
    if "error" in expected:
        with pytest.raises(KallaError) as info:
            run_job(spec, settings, events.append)
        assert info.value.stage == expected["error"]["stage"]
        assert expected["error"]["contains"] in str(info.value)
        assert not os.path.exists(job["output_path"]) or not os.listdir(job["output_path"])
        return
    result = run_job(spec, settings, events.append)
    check_outputs(result, expected, job)
    staged = [e for e in events if e["stage"] == "staging"]
    for source in job["sources"]:
        assert [e["progress"] for e in staged if e["source"] == source["alias"]][-1] == 1.0
    assert events[-1] == {"stage": "matching", "run_id": spec.run_id, "progress": 1.0,
                          "matched_count": result["matched_count"]}


@pytest.mark.parametrize("name", ["one_to_one_tolerance", "refused_sql"])
def test_case_through_cli(name, tmp_path, cli_env):
    job, expected = load_case(name, tmp_path)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([KALLA_RUN, "--json", str(job_file)], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in expected:
        assert proc.returncode == expected["exit"]
        assert result["status"] == "failed" and result["stage"] == expected["error"]["stage"]
        assert expected["error"]["contains"] in result["error"]
        return
    assert proc.returncode == 0, proc.stderr
    check_outputs(result, expected, job)
