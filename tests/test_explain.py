"""Explained breaks: every reason, with the expected failed condition, candidate and delta
worked out by hand from tests/explain/*.csv (and the other case folders)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

from casefiles import load_case
from support import KALLA_RUN

from kalla.decompose import NotDecomposable, decompose, split_and
from kalla.jobs import parse_job
from kalla.pipeline import run_job

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "explain")
RULE = ("SELECT i.invoice_id, p.payment_id FROM invoices i JOIN payments p "
        "ON i.ref = p.ref AND tolerance_match(i.amount, p.paid, 0.02)")
EXPLAIN_COLUMNS = ["_kalla_reason", "_kalla_failed", "_kalla_candidate", "_kalla_delta", "_kalla_rule"]


def basic_job(tmp_path, **extra):
    for name in ("invoices.csv", "payments.csv"):
        shutil.copy(os.path.join(HERE, name), tmp_path / name)
    job = {"match_sql": RULE, "output_path": str(tmp_path / "out"),
           "sources": [{"alias": "invoices", "uri": str(tmp_path / "invoices.csv")},
                       {"alias": "payments", "uri": str(tmp_path / "payments.csv")}],
           "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}, **extra}
    return job


def explained(path, key):
    rows = pq.read_table(path).to_pylist()
    return {r[key]: {c: r[c] for c in EXPLAIN_COLUMNS} for r in rows}


def test_every_reason_with_candidate_and_delta(tmp_path, settings):
    result = run_job(parse_job(basic_job(tmp_path, explain=True), batch=True), settings)
    left = explained(result["output_paths"]["unmatched_left"], "invoice_id")
    tol = "tolerance_match(i.amount, p.paid, 0.02)"
    # invoice 2 (50.00): P2 pays 50.10 (delta -0.10), P5 pays 49.95 (delta +0.05): P5 is closest
    assert left[2]["_kalla_reason"] == "rule_failed" and left[2]["_kalla_failed"] == tol
    assert left[2]["_kalla_candidate"] == "P5" and left[2]["_kalla_delta"] == pytest.approx(0.05)
    assert left[3] == {"_kalla_reason": "no_candidate", "_kalla_failed": None, "_kalla_candidate": None,
                       "_kalla_delta": None, "_kalla_rule": "match_sql"}
    assert left[None]["_kalla_reason"] == "null_key"
    right = explained(result["output_paths"]["unmatched_right"], "payment_id")
    assert right["P2"]["_kalla_reason"] == "rule_failed" and right["P2"]["_kalla_candidate"] == "2"
    assert right["P2"]["_kalla_delta"] == pytest.approx(-0.10)
    assert right["P5"]["_kalla_delta"] == pytest.approx(0.05)
    assert right["P6"]["_kalla_reason"] == "no_candidate"
    assert result["break_reasons"] == {"left": {"rule_failed": 1, "no_candidate": 1, "null_key": 1},
                                       "right": {"rule_failed": 2, "no_candidate": 1}}
    summary = json.load(open(result["summary_path"]))
    assert summary["break_reasons"] == result["break_reasons"]
    # counts still equal file rows
    assert pq.ParquetFile(result["output_paths"]["unmatched_left"]).metadata.num_rows == \
        result["unmatched_left_count"] == 3


def test_without_explain_outputs_are_unchanged(tmp_path, settings):
    plain = run_job(parse_job(basic_job(tmp_path), batch=True), settings)
    schema = pq.read_schema(plain["output_paths"]["unmatched_left"])
    assert not any(name.startswith("_kalla_") for name in schema.names)
    assert "break_reasons" not in plain


def test_composite_keys_and_same_key_name(tmp_path, settings):
    job, _ = load_case("composite_keys", tmp_path)
    job["explain"] = True
    result = run_job(parse_job(job, batch=True), settings)
    right = {(r["region"], r["pay_no"]): r for r in pq.read_table(result["output_paths"]["unmatched_right"]).to_pylist()}
    # US/2 pays invoice US/2 (40.00) with 41.00: tolerance 0.5 fails; the candidate key is composite
    assert right[("US", 2)]["_kalla_reason"] == "rule_failed"
    assert right[("US", 2)]["_kalla_candidate"] == "region=US, inv_no=2"
    assert right[("US", 2)]["_kalla_delta"] == pytest.approx(-1.0)
    # EU/3 shares the keys with invoice EU/1 and the amount, but WHERE r.pay_no < 3 fails
    assert right[("EU", 3)]["_kalla_failed"] == "r.pay_no < 3"
    job2, _ = load_case("same_key_name", tmp_path / "s")
    job2["explain"] = True
    result = run_job(parse_job(job2, batch=True), settings)
    left = explained(result["output_paths"]["unmatched_left"], "id")
    assert left[3]["_kalla_reason"] == "no_candidate"   # ref Z exists nowhere on the right


def test_a_rule_that_cannot_be_decomposed_is_unexplained(tmp_path, settings):
    job, _ = load_case("split_payments", tmp_path)
    job["explain"] = True
    result = run_job(parse_job(job, batch=True), settings)
    reasons = {r["_kalla_reason"] for r in pq.read_table(result["output_paths"]["unmatched_left"]).to_pylist()}
    assert reasons == {"unexplained"}
    summary = json.load(open(result["summary_path"]))
    assert "is not one join of two sources" in json.dumps(summary["unexplained_rules"])


def test_cli_explain_flag_prints_top_reasons(tmp_path, cli_env):
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(basic_job(tmp_path)))
    proc = subprocess.run([KALLA_RUN, "--explain", str(job_file)], capture_output=True, text=True,
                          env=cli_env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rule_failed" in proc.stdout and "no_candidate" in proc.stdout
    schema = pq.read_schema(tmp_path / "out" / "unmatched_left.parquet")
    assert "_kalla_reason" in schema.names


@pytest.mark.parametrize("sql,why", [
    ("SELECT * FROM a JOIN b ON a.x > b.x", "no equality"),
    ("SELECT a.k FROM a JOIN b ON a.k = b.k GROUP BY a.k", "GROUP"),
    ("SELECT 1 FROM a JOIN b ON a.k = b.k JOIN c ON c.k = a.k", "not one join"),
    ("SELECT 1 FROM a LEFT JOIN b ON a.k = b.k", "LEFT"),
    ("SELECT 1 FROM a JOIN c ON a.k = c.k", "does not join the left source with the right"),
])
def test_not_decomposable(sql, why):
    with pytest.raises(NotDecomposable, match=why):
        decompose(sql, "a", "b")


def test_split_and_keeps_between_and_parentheses():
    assert split_and("a.x = b.x AND b.d BETWEEN a.d - 1 AND a.d + 1 AND (a.y = 1 OR b.y = 2)") == [
        "a.x = b.x", "b.d BETWEEN a.d - 1 AND a.d + 1", "a.y = 1 OR b.y = 2"]


def test_multi_pass_names_the_last_rule_and_ambiguous_pairs(tmp_path, settings):
    exact = ("SELECT i.invoice_id, p.payment_id FROM invoices i JOIN payments p "
             "ON i.ref = p.ref AND i.amount = p.paid")
    job = basic_job(tmp_path, explain=True,
                    rules=[{"name": "exact", "match_sql": exact, "one_to_one": True},
                           {"name": "tolerance", "match_sql": RULE, "one_to_one": True}])
    del job["match_sql"]
    # basic_job copied the shared data over ours: write this case's data again
    (tmp_path / "invoices.csv").write_text("invoice_id,ref,amount\n1,R1,100.00\n2,R2,50.00\n4,R4,10.00\n")
    (tmp_path / "payments.csv").write_text(
        "payment_id,ref,paid\nP1,R1,100.00\nP2,R2,50.10\nP7,R4,10.00\nP8,R4,10.00\n")
    result = run_job(parse_job(job, batch=True), settings)
    assert result["rule_counts"] == {"exact": 1, "tolerance": 0}
    left = explained(result["output_paths"]["unmatched_left"], "invoice_id")
    # invoice 2 has candidate P2 under both rules: explained against the last, "tolerance"
    assert left[2]["_kalla_rule"] == "tolerance" and left[2]["_kalla_reason"] == "rule_failed"
    assert left[2]["_kalla_failed"] == "tolerance_match(i.amount, p.paid, 0.02)"
    # invoice 4 pairs with P7 and P8 alike: one-to-one rules hold it back as ambiguous
    assert left[4]["_kalla_reason"] == "ambiguous" and left[4]["_kalla_failed"] in (None, "")
    right = explained(result["output_paths"]["unmatched_right"], "payment_id")
    assert right["P7"]["_kalla_reason"] == right["P8"]["_kalla_reason"] == "ambiguous"
