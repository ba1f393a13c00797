"""The data-driven cases of tests/cases, run on a real Ballista cluster and locally:
the same expected results, and outputs equal row for row (types included) to local mode.
"""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest
from casefiles import load_case
from test_cases import VARIANTS, check_outputs

from kalla.errors import KallaError
from kalla.jobs import parse_job
from kalla.pipeline import run_job

pytestmark = pytest.mark.ballista

OUTPUTS = ("matched", "unmatched_left", "unmatched_right")
# Fields of summary.json that legitimately differ between two runs or two engines.
VOLATILE = {"run_id", "output_paths", "stage_seconds", "started_at", "finished_at",
            "join_strategy", "checks"}


def run(job: dict, settings, name: str):
    """Run a job into its own output folder; return (result or error, events, job)."""
    job = {**job, "output_path": os.path.join(os.path.dirname(job["output_path"]), name)}
    events = []
    try:
        return run_job(parse_job(job, batch=True), settings, events.append), events, job
    except KallaError as exc:
        return exc, events, job


def table_rows(path: str):
    table = pq.read_table(path)
    return table.schema, sorted(map(repr, table.to_pylist()))


def summary(job: dict) -> dict:
    with open(os.path.join(job["output_path"], "summary.json")) as fh:
        return {k: v for k, v in json.load(fh).items() if k not in VOLATILE}


@pytest.mark.parametrize("name,variant", VARIANTS)
def test_case_on_ballista_matches_local(name, variant, tmp_path, engine_settings):
    job, expected = load_case(name, tmp_path, variant)
    local, local_events, local_job = run(job, engine_settings(KALLA_ENGINE="local"), "local")
    remote, remote_events, remote_job = run(job, engine_settings(), "ballista")

    if "rules" in job:         # multi-pass matching is refused on the cluster, up front
        assert isinstance(remote, KallaError) and remote.stage == "matching"
        assert "rules" in str(remote) or ("error" in expected and isinstance(local, KallaError))
        assert not [e for e in remote_events if e["stage"] == "matching"]
        return
    if "error" in expected:
        for outcome in (local, remote):
            assert isinstance(outcome, KallaError), outcome
            assert outcome.stage == expected["error"]["stage"]
            assert expected["error"]["contains"] in str(outcome)
        return
    assert not isinstance(remote, KallaError), f"{remote} (stage {remote.stage})"
    check_outputs(remote, expected, remote_job)
    for output in OUTPUTS:         # row for row, and the same Arrow types
        local_schema, local_rows = table_rows(local["output_paths"][output])
        remote_schema, remote_rows = table_rows(remote["output_paths"][output])
        assert remote_schema == local_schema, output
        assert remote_rows == local_rows, output
    for count in ("matched_count", "unmatched_left_count", "unmatched_right_count", "source_rows"):
        assert remote[count] == local[count]
    assert summary(remote_job) == summary(local_job)
    # callbacks: each source's staging ends at 1.0; matching ends with matched_count
    assert remote_events[-1] == {**local_events[-1], "run_id": remote_events[-1]["run_id"]}
    assert remote_events[-1]["matched_count"] == remote["matched_count"]
    assert {e["source"] for e in remote_events if e["stage"] == "staging" and e["progress"] == 1.0} \
        == {s["alias"] for s in job["sources"]}
