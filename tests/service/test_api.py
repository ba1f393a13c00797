"""Routes, status codes and callbacks of a real `kalla serve` (one server for the module)."""
from __future__ import annotations

import concurrent.futures
import os
import uuid

import pyarrow.parquet as pq
import pytest

from service.shared_fixtures import jobs, listener, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.service

REFERENCE_COMPLETE = {"run_id", "matched_count", "unmatched_left_count",
                      "unmatched_right_count", "output_paths"}


def assert_plain_text(resp, status: int, *fragments: str):
    assert resp.status == status, (resp.status, resp.text)
    assert resp.headers["Content-Type"].startswith("text/plain"), resp.headers["Content-Type"]
    for fragment in fragments:
        assert fragment in resp.text, resp.text


# ---------------------------------------------------------------------- health and routing

def test_health_is_plain_ok(server):
    resp = server.get("/health")
    assert_plain_text(resp, 200)
    assert resp.text == "ok\n"
    assert server.request("HEAD", "/health").status == 200


def test_ready_when_workers_are_up(server):
    assert_plain_text(server.get("/ready"), 200, "ready")


def test_unknown_path_is_404(server):
    assert_plain_text(server.get("/nope"), 404, "not found")
    assert_plain_text(server.get("/api/jobs/x/y"), 404)


@pytest.mark.parametrize("method,path,allowed", [
    ("POST", "/health", "GET"), ("PUT", "/api/jobs", "POST"), ("DELETE", "/api/jobs", "GET"),
    ("POST", f"/api/jobs/{uuid.uuid4()}", "DELETE"), ("PATCH", "/metrics", "GET")])
def test_wrong_method_is_405(server, method, path, allowed):
    resp = server.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
    assert_plain_text(resp, 405, "not allowed")
    assert allowed in resp.headers["Allow"]


def test_unknown_run_is_404(server):
    assert_plain_text(server.get(f"/api/jobs/{uuid.uuid4()}"), 404, "unknown run_id")
    assert_plain_text(server.get("/api/jobs/not-a-uuid"), 404, "unknown run_id")
    assert_plain_text(server.request("DELETE", f"/api/jobs/{uuid.uuid4()}"), 404)


# ---------------------------------------------------------------------- submission errors

def test_bad_json_is_400(server):
    assert_plain_text(server.submit(b"{not json"), 400, "request body", "JSON")
    assert_plain_text(server.submit(b"[1, 2]"), 400, "JSON object")


@pytest.mark.parametrize("change,field", [
    ({"match_sql": None}, "match_sql: is required"),
    ({"run_id": "123"}, "run_id: must be a UUID"),
    ({"callback_url": "ftp://x/y"}, "callback_url"),
    ({"sources": [{"alias": "l", "uri": "/no/such/file.csv"},
                  {"alias": "r", "uri": "/no/such/other.csv"}]}, "sources[0].uri"),
    ({"primary_keys": {"l": ["id"]}}, "primary_keys.r"),
])
def test_invalid_job_is_400_naming_the_field(server, jobs, change, field):
    job = jobs.make()
    job.update(change)
    job = {k: v for k, v in job.items() if v is not None}
    assert_plain_text(server.submit(job), 400, field)


def test_body_over_the_cap_is_413(server, jobs):
    job = jobs.make(match_sql="SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref --"
                    + "x" * 1_100_000)
    assert_plain_text(server.submit(job), 413, "KALLA_MAX_BODY_BYTES")


def test_post_without_length_is_411(server):
    conn_resp = server.request("POST", "/api/jobs", body=iter([b"{}"]),
                               headers={"Transfer-Encoding": "chunked"})
    assert_plain_text(conn_resp, 411, "Content-Length")


# ---------------------------------------------------------------------- a job end to end

def test_successful_job_callbacks_status_and_files(server, listener, jobs):
    job = jobs.make()
    resp = server.submit(job)
    assert resp.status == 200, resp.text
    assert resp.json() == {"run_id": job["run_id"], "status": "accepted"}
    final = listener.terminal(job["run_id"])
    bodies = listener.bodies(job["run_id"])
    assert bodies[-1] is final and sum(map(is_terminal, bodies)) == 1
    assert_progress_contract(bodies[:-1], job["run_id"], ["l", "r"], final["matched_count"])
    assert REFERENCE_COMPLETE <= set(final)
    out = job["output_path"]
    assert final["run_id"] == job["run_id"]
    assert (final["matched_count"], final["unmatched_left_count"],
            final["unmatched_right_count"]) == (90, 10, 10)
    assert final["output_paths"] == {
        "matched": f"{out}/matched.parquet", "unmatched_left": f"{out}/unmatched_left.parquet",
        "unmatched_right": f"{out}/unmatched_right.parquet"}
    for name, count in (("matched", 90), ("unmatched_left", 10), ("unmatched_right", 10)):
        assert pq.read_metadata(final["output_paths"][name]).num_rows == count
    status = server.wait_delivered(job["run_id"])
    assert status["status"] == "completed" and status["error"] is None
    assert (status["matched_count"], status["unmatched_left_count"],
            status["unmatched_right_count"]) == (90, 10, 10)
    assert status["output_paths"] == final["output_paths"]
    assert status["created_at"] <= status["started_at"] <= status["finished_at"]
    assert status["callback"]["kind"] == "complete" and status["callback"]["attempts"] == 1


def test_failing_job_sends_one_error_callback_with_stage(server, listener, jobs):
    job = jobs.make("fail")
    assert server.submit(job).status == 200
    final = listener.terminal(job["run_id"])
    bodies = listener.bodies(job["run_id"])
    assert bodies[-1] == final and sum(map(is_terminal, bodies)) == 1
    assert set(final) == {"run_id", "error", "stage"}
    assert final["run_id"] == job["run_id"] and "nope" in final["error"]
    assert final["stage"] in ("staging", "matching")   # match_sql is planned while staging
    status = server.wait_delivered(job["run_id"])
    assert status["status"] == "failed" and status["error"] == final["error"]
    assert status["stage"] == final["stage"] and status["callback"]["kind"] == "error"
    assert not os.path.exists(os.path.join(job["output_path"], "matched.parquet"))


def test_same_run_id_is_idempotent_and_a_different_body_conflicts(server, listener, jobs):
    job = jobs.make()
    assert server.submit(job).status == 200
    listener.terminal(job["run_id"])
    again = server.submit(job)
    assert again.status == 200 and again.json() == {"run_id": job["run_id"], "status": "accepted"}
    changed = dict(job, match_sql=job["match_sql"] + " WHERE l.id > 5")
    assert_plain_text(server.submit(changed), 409, job["run_id"])
    server.wait_delivered(job["run_id"])
    terminals = [b for b in listener.bodies(job["run_id"]) if is_terminal(b)]
    assert len(terminals) == 1                        # no second run
    assert server.status(job["run_id"])["attempts"] == 1


def test_forty_concurrent_jobs_all_complete_correctly(server, listener, jobs):
    batch = [jobs.make() for _ in range(40)]
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda j: server.submit(j).status, batch))
    assert statuses == [200] * 40
    for job in batch:
        final = listener.terminal(job["run_id"], timeout=120)
        assert (final["matched_count"], final["unmatched_left_count"],
                final["unmatched_right_count"]) == (90, 10, 10), final
        assert pq.read_metadata(final["output_paths"]["matched"]).num_rows == 90
        assert sum(map(is_terminal, listener.bodies(job["run_id"]))) == 1


def test_list_recent_jobs(server, listener, jobs):
    job = jobs.make()
    server.submit(job)
    listener.terminal(job["run_id"])
    listing = server.get("/api/jobs?limit=5").json()["jobs"]
    assert 1 <= len(listing) <= 5
    assert listing[0]["run_id"] == job["run_id"]
    assert {"run_id", "status", "stage", "progress", "created_at"} <= set(listing[0])
    failed = server.get("/api/jobs?status=failed").json()["jobs"]
    assert all(j["status"] == "failed" for j in failed)
    assert_plain_text(server.get("/api/jobs?limit=0"), 400, "limit")
    assert_plain_text(server.get("/api/jobs?status=odd"), 400, "status")


def test_credentials_never_leak(server, listener, jobs):
    secret = "Sup3rS3cretPw"
    job = jobs.make()
    job["sources"][1] = {"alias": "r",
                         "uri": f"postgres://kalla:{secret}@127.0.0.1:1/fin?table=payments"}
    assert server.submit(job).status == 200
    final = listener.terminal(job["run_id"])
    assert "error" in final and secret not in repr(final)
    server.wait_delivered(job["run_id"])
    for path in (f"/api/jobs/{job['run_id']}", "/api/jobs", "/metrics"):
        assert secret not in server.get(path).text
    assert secret not in server.log()


# ---------------------------------------------------------------------- metrics

def test_metrics_count_jobs_rows_and_callbacks(server, listener, jobs):
    before = server.metrics()
    batch = [jobs.make(), jobs.make(), jobs.make("fail")]
    for job in batch:
        assert server.submit(job).status == 200
    for job in batch:
        listener.terminal(job["run_id"])
        server.wait_delivered(job["run_id"])
    after = server.metrics()

    def delta(key):
        return after.get(key, 0) - before.get(key, 0)

    assert delta("kalla_runner_jobs_completed_total") == 2
    assert delta("kalla_runner_jobs_failed_total") == 1
    assert delta('kalla_runner_rows_read_total{kind="csv"}') == 2 * 2 * 100
    assert delta('kalla_runner_callbacks_total{kind="complete",outcome="delivered"}') == 2
    assert delta('kalla_runner_callbacks_total{kind="error",outcome="delivered"}') == 1
    assert delta('kalla_runner_stage_duration_seconds_count{stage="matching"}') == 2
    assert delta('kalla_runner_callbacks_total{kind="progress",outcome="delivered"}') >= 2 * 3
    assert after["kalla_runner_active_jobs"] == 0
    assert after["kalla_runner_queued_jobs"] == 0
    assert after["kalla_runner_workers"] == 2


# ---------------------------------------------------------------------- helpers

def is_terminal(body: dict) -> bool:
    return "error" in body or "unmatched_left_count" in body


def assert_progress_contract(progress: list, run_id: str, aliases: list, matched: int):
    """Exact reference shapes; each source ends at 1.0; matching reports matched_count."""
    staging = [p for p in progress if p.get("stage") == "staging"]
    matching = [p for p in progress if p.get("stage") == "matching"]
    assert len(staging) + len(matching) == len(progress), progress
    for body in staging:
        assert set(body) == {"stage", "run_id", "progress", "source"}, body
        assert body["run_id"] == run_id and 0 <= body["progress"] <= 1
    for body in matching:
        assert set(body) == {"stage", "run_id", "progress", "matched_count"}, body
        assert body["run_id"] == run_id and 0 <= body["progress"] <= 1
    for alias in aliases:
        mine = [p["progress"] for p in staging if p["source"] == alias]
        assert mine and mine[-1] == 1.0, (alias, mine)
    assert matching and matching[-1]["matched_count"] == matched
    assert progress.index(matching[0]) > max(progress.index(s) for s in staging)
