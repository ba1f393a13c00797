"""bin/kalla-run end to end: exit codes, summaries, JSON, recipes and callbacks."""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest

from casefiles import load_case
from support import KALLA_RUN, CallbackListener


def kalla_run(*args, env, timeout=120):
    return subprocess.run([KALLA_RUN, *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def listener():
    server = CallbackListener()
    yield server
    server.close()


def write_job(tmp_path, job, name="job.json"):
    path = tmp_path / name
    path.write_text(json.dumps(job))
    return path


def test_summary_and_exit_zero(tmp_path, cli_env):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    proc = kalla_run(write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "matched" in proc.stdout and "3" in proc.stdout
    assert proc.stderr == ""     # progress is quiet when stderr is not a terminal
    assert sorted(os.listdir(job["output_path"])) == [
        "matched.parquet", "summary.json", "unmatched_left.parquet", "unmatched_right.parquet"]


def test_bad_input_exits_two(tmp_path, cli_env):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    job["sources"][0]["alias"] = "not valid"
    proc = kalla_run(write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 2
    assert "sources[0].alias" in proc.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert kalla_run(broken, env=cli_env).returncode == 2
    assert kalla_run(tmp_path / "missing.json", env=cli_env).returncode == 2


def test_bad_filter_column_exits_two_before_reading(tmp_path, cli_env):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    job["sources"][1]["filters"] = [{"column": "no_such", "op": "eq", "value": 1}]
    proc = kalla_run(write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 2
    assert "source 'payments' has no column 'no_such'" in proc.stderr
    assert not os.path.exists(job["output_path"])


def test_bad_filter_value_names_source_column_and_value(tmp_path, cli_env):
    job, _ = load_case("filters_all_ops", tmp_path)
    job["sources"][0]["filters"] = [{"column": "booked", "op": "gte", "value": "yesterday"}]
    proc = kalla_run(write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 2
    assert "source 'l', column 'booked'" in proc.stderr and "'yesterday'" in proc.stderr


def test_failed_job_exits_one_and_worst_status_wins(tmp_path, cli_env):
    good, _ = load_case("one_to_one_tolerance", tmp_path)
    bad, _ = load_case("refused_sql", tmp_path)
    proc = kalla_run(write_job(tmp_path, good, "a.json"), write_job(tmp_path, bad, "b.json"),
                     env=cli_env)
    assert proc.returncode == 1
    assert "failed in matching" in proc.stderr
    assert os.path.exists(os.path.join(good["output_path"], "matched.parquet"))
    assert not os.path.exists(bad["output_path"]) or os.listdir(bad["output_path"]) == []


def test_invalid_settings_exit_two(tmp_path, cli_env):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    proc = kalla_run(write_job(tmp_path, job), env={**cli_env, "KALLA_WORKER_MEMORY": "lots"})
    assert proc.returncode == 2 and "KALLA_WORKER_MEMORY" in proc.stderr


def test_callbacks_from_the_cli(tmp_path, cli_env, listener):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    job["callback_url"] = listener.url
    job["run_id"] = "a1b2c3d4-e5f6-7890-abcd-ef1234567890"
    proc = kalla_run("--json", write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    bodies = listener.bodies()
    progress, final = bodies[:-1], bodies[-1]
    assert {b["stage"] for b in progress} == {"staging", "matching"}
    for alias in ("invoices", "payments"):
        assert [b["progress"] for b in progress if b.get("source") == alias][-1] == 1.0
    assert progress[-1] == {"stage": "matching", "run_id": job["run_id"], "progress": 1.0,
                            "matched_count": 3}
    assert final["run_id"] == job["run_id"]
    assert (final["matched_count"], final["unmatched_left_count"], final["unmatched_right_count"]) == (3, 2, 2)
    assert final["output_paths"] == {
        name: os.path.join(job["output_path"], f"{name}.parquet")
        for name in ("matched", "unmatched_left", "unmatched_right")}
    assert json.loads(proc.stdout)["matched_count"] == 3


def test_error_callback_names_the_stage(tmp_path, cli_env, listener):
    job, _ = load_case("missing_key_column", tmp_path)
    job["callback_url"] = listener.url
    proc = kalla_run(write_job(tmp_path, job), env=cli_env)
    assert proc.returncode == 1
    final = listener.bodies()[-1]
    assert final["stage"] == "matching" and "r__rid" in final["error"]
    assert set(final) >= {"run_id", "error"}


def test_recipe_with_file_bindings(tmp_path, cli_env):
    job, _ = load_case("one_to_one_tolerance", tmp_path)
    recipe = {"recipe_id": "inv-pay", "name": "Invoices vs payments", "description": "demo",
              "match_sql": job["match_sql"], "match_description": "reference and amount within 0.02",
              "sources": {"left": {"alias": "invoices", "type": "file",
                                   "schema": ["invoice_id", "amount"], "primary_key": ["invoice_id"]},
                          "right": {"alias": "payments", "type": "file",
                                    "schema": ["payment_id", "reference_number", "paid_amount"],
                                    "primary_key": ["payment_id"]}}}
    path = write_job(tmp_path, recipe, "recipe.json")
    out = tmp_path / "recipe-out"
    proc = kalla_run(path, "--source", f"invoices={job['sources'][0]['uri']}",
                     "--source", f"payments={job['sources'][1]['uri']}", "--output", out, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert pq.ParquetFile(out / "matched.parquet").metadata.num_rows == 3
    recipe["sources"]["right"]["schema"].append("memo")
    write_job(tmp_path, recipe, "recipe.json")
    proc = kalla_run(path, "--source", f"invoices={job['sources'][0]['uri']}",
                     "--source", f"payments={job['sources'][1]['uri']}", "--output", out, env=cli_env)
    assert proc.returncode == 2 and "lacks columns ['memo']" in proc.stderr
