"""Cancelling jobs, killing a worker mid-job, and callbacks that need retries."""
from __future__ import annotations

import os
import signal
import time

import pytest

from service.shared_fixtures import jobs, listener, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.service


def is_terminal(body: dict) -> bool:
    return "error" in body or "unmatched_left_count" in body


def partial_dir(job: dict) -> str:
    return os.path.join(job["output_path"], f".kalla-{job['run_id']}.partial")


def test_cancel_queued_and_running_jobs(server, listener, jobs):
    slow = [jobs.make("slow"), jobs.make("slow")]
    for job in slow:
        assert server.submit(job).status == 200
    queued = jobs.make()
    assert server.submit(queued).status == 200
    assert server.status(queued["run_id"])["status"] == "queued"

    resp = server.request("DELETE", f"/api/jobs/{queued['run_id']}")
    assert resp.status == 200 and resp.json()["status"] == "cancelled"
    final = listener.terminal(queued["run_id"])
    assert final["run_id"] == queued["run_id"] and "cancelled" in final["error"]
    assert listener.bodies(queued["run_id"]) == [final]         # it never started

    for job in slow:
        running = server.wait_running(job["run_id"])
        assert os.path.isdir(partial_dir(job))                  # writing matched.parquet
        resp = server.request("DELETE", f"/api/jobs/{job['run_id']}")
        assert resp.status == 200, resp.text
        assert resp.json()["status"] == "cancelled"
        final = listener.terminal(job["run_id"])
        assert "cancelled" in final["error"] and final["stage"] == "matching"
        bodies = listener.bodies(job["run_id"])
        assert bodies[-1] == final and sum(map(is_terminal, bodies)) == 1
        assert not os.path.exists(partial_dir(job))
        assert not os.path.exists(os.path.join(job["output_path"], "matched.parquet"))
        # the worker stopped the job itself: it is still the same process
        assert running["worker_pid"] in server.worker_pids()
        status = server.wait_delivered(job["run_id"])
        assert status["status"] == "cancelled" and "cancelled" in status["error"]
    again = server.request("DELETE", f"/api/jobs/{slow[0]['run_id']}")
    assert again.status == 409 and "already finished" in again.text
    assert not os.listdir(server.root / "work")                 # no scratch left behind

    after = jobs.make()
    assert server.submit(after).status == 200
    assert listener.terminal(after["run_id"])["matched_count"] == 90


def test_sigkilled_worker_is_replaced_and_its_job_fails(server, listener, jobs):
    deaths = server.metrics().get("kalla_runner_worker_deaths_total", 0)
    job = jobs.make("slow")
    assert server.submit(job).status == 200
    pid = server.wait_running(job["run_id"])["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    final = listener.terminal(job["run_id"])
    assert "worker" in final["error"] and "SIGKILL" in final["error"], final
    assert final["stage"] == "matching"
    assert sum(map(is_terminal, listener.bodies(job["run_id"]))) == 1
    assert server.status(job["run_id"])["status"] == "failed"
    assert not os.path.exists(partial_dir(job))

    deadline = time.monotonic() + 30
    while len(server.worker_pids()) != 2 or server.get("/ready").status != 200:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert pid not in server.worker_pids()
    for _ in range(3):                     # both workers, old and new, take jobs
        after = jobs.make()
        assert server.submit(after).status == 200
        assert listener.terminal(after["run_id"])["matched_count"] == 90
    assert server.metrics()["kalla_runner_worker_deaths_total"] == deaths + 1


def test_completion_survives_a_callback_receiver_that_is_down_then_failing(
        server, jobs, make_listener, unused_port):
    """Receiver down ~2.5 s, then 500, 500, then 200: the completion still arrives once."""
    job = jobs.make(callback_url=f"http://127.0.0.1:{unused_port}/cb")
    started = time.monotonic()
    assert server.submit(job).status == 200
    time.sleep(max(0.0, started + 2.5 - time.monotonic()))
    late = make_listener(unused_port, script=[500, 500])
    final = late.terminal(job["run_id"], timeout=60)
    assert final["matched_count"] == 90
    attempts = [r for r in late.records if r["body"].get("run_id") == job["run_id"]]
    assert [r["status"] for r in attempts] == [500, 500, 200]
    assert all(is_terminal(r["body"]) for r in attempts)
    status = server.wait_delivered(job["run_id"])
    assert status["callback"]["state"] == "delivered"
    assert status["callback"]["attempts"] == 6 and status["callback"]["http_status"] == 200


def test_cancel_kills_a_worker_that_does_not_stop(server, listener, jobs):
    """A worker that cannot react (here: SIGSTOPped) is killed after the grace period."""
    deaths = server.metrics().get("kalla_runner_worker_deaths_total", 0)
    job = jobs.make("slow")
    assert server.submit(job).status == 200
    pid = server.wait_running(job["run_id"])["worker_pid"]
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    resp = server.request("DELETE", f"/api/jobs/{job['run_id']}")
    assert resp.status == 200 and resp.json()["status"] == "cancelled", resp.text
    assert 4 <= time.monotonic() - started < 15
    final = listener.terminal(job["run_id"])
    assert "cancelled" in final["error"]
    assert sum(map(is_terminal, listener.bodies(job["run_id"]))) == 1
    assert not os.path.exists(partial_dir(job))
    deadline = time.monotonic() + 30
    while len(server.worker_pids()) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert pid not in server.worker_pids()
    assert server.metrics().get("kalla_runner_worker_deaths_total", 0) == deaths   # on purpose
