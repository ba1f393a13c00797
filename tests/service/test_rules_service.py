"""Rules, one-to-one passes and expect through a real `kalla serve`: validation (400 naming
the field), the completion callback's rule counts and verdict, progress naming each rule."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from service.shared_fixtures import jobs, listener, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.service

# tests/service/conftest.py's tiny data: l(id, amount = 1.5 id) and r(pid, ref, paid);
# 90 refs equal an id, 10 are 999 but still carry paid = 1.5 * id.
RULES = [
    {"name": "exact", "match_sql": "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref AND l.amount = r.paid"},
    {"name": "by_amount", "one_to_one": True,
     "match_sql": "SELECT l.id, r.pid FROM l JOIN r ON l.amount = r.paid"},
]


def rules_job(jobs, **overrides) -> dict:
    job = jobs.make()
    del job["match_sql"]
    return {**job, "rules": RULES, **overrides}


def test_completion_carries_rule_counts_and_a_failed_verdict(server, listener, jobs):
    job = rules_job(jobs, expect={"max_unmatched_left": 0, "min_matched": 101})
    assert server.submit(job).status == 200
    final = listener.terminal(job["run_id"])
    assert (final["matched_count"], final["unmatched_left_count"], final["unmatched_right_count"]) == (100, 0, 0)
    assert final["rule_counts"] == {"exact": 90, "by_amount": 10}
    assert final["ambiguous"] == {"by_amount": 0}
    assert final["passed"] is False
    assert final["failed_checks"] == [{"check": "min_matched", "expected": 101, "actual": 100, "passed": False}]
    table = pq.read_table(final["output_paths"]["matched"])
    assert table.column("match_rule").value_counts().to_pylist() == [
        {"values": "exact", "counts": 90}, {"values": "by_amount", "counts": 10}]
    progress = [b for b in listener.bodies(job["run_id"]) if b.get("stage") == "matching"]
    assert {b["rule"] for b in progress if "rule" in b} <= {"exact", "by_amount"}
    assert progress[-1] == {"stage": "matching", "run_id": job["run_id"], "progress": 1.0,
                            "matched_count": 100}
    assert server.wait_delivered(job["run_id"])["status"] == "completed"   # it ran: not failed


def test_passing_verdict(server, listener, jobs):
    job = rules_job(jobs, expect={"min_match_rate": 1.0})
    assert server.submit(job).status == 200
    final = listener.terminal(job["run_id"])
    assert final["passed"] is True and final["failed_checks"] == []


def test_plain_job_completion_has_no_new_fields(server, listener, jobs):
    job = jobs.make()
    assert server.submit(job).status == 200
    final = listener.terminal(job["run_id"])
    assert not {"rule_counts", "ambiguous", "passed", "failed_checks"} & set(final)


@pytest.mark.parametrize("overrides,fragment", [
    ({"match_sql": "SELECT 1"}, "rules: give either match_sql or rules, not both"),
    ({"rules": [{**RULES[0], "one_to_one": "yes"}]}, "rules[0].one_to_one: must be a boolean"),
    ({"rules": [RULES[0], RULES[0]]}, "rules[1].name: 'exact' is already the name of rules[0]"),
    ({"expect": {"nope": 1}}, "expect.nope: unknown check"),
    ({"expect": {"min_match_rate": 2}}, "expect.min_match_rate: is a fraction between 0 and 1"),
])
def test_invalid_rules_or_expect_is_400_naming_the_field(server, jobs, overrides, fragment):
    resp = server.submit(rules_job(jobs, **overrides))
    assert resp.status == 400, resp.text
    assert fragment in resp.text
