"""Process lifecycle of `kalla serve`: full queue, SIGTERM drain, restart, fast stop, boot
failure, and what the supervising process may load. Each test starts its own server."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import pytest

pytestmark = pytest.mark.service

DATA_STACK = ("libarrow", "datafusion", "polars")


def is_terminal(body: dict) -> bool:
    return "error" in body or "unmatched_left_count" in body


def journal_statuses(server) -> dict[str, str]:
    with sqlite3.connect(server.root / "state" / "journal.sqlite3") as db:
        return dict(db.execute("SELECT run_id, status FROM jobs"))


def test_full_queue_answers_500_with_retry_after(make_server, listener, jobs):
    server = make_server({"KALLA_WORKERS": "1", "KALLA_QUEUE_SIZE": "1"})
    running, waiting, refused = jobs.make("slow"), jobs.make(), jobs.make()
    assert server.submit(running).status == 200
    server.wait_running(running["run_id"], stage="staging")
    assert server.submit(waiting).status == 200
    resp = server.submit(refused)
    assert resp.status == 500 and "queue is full" in resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert int(resp.headers["Retry-After"]) > 0
    ready = server.get("/ready")
    assert ready.status == 503 and "queue is full" in ready.text
    metrics = server.metrics()
    assert metrics["kalla_runner_active_jobs"] == 1 and metrics["kalla_runner_queued_jobs"] == 1
    assert metrics['kalla_runner_jobs_rejected_total{reason="queue_full"}'] == 1
    assert server.get(f"/api/jobs/{refused['run_id']}").status == 404    # never recorded

    assert server.request("DELETE", f"/api/jobs/{waiting['run_id']}").status == 200
    assert server.get("/ready").status == 200
    assert server.request("DELETE", f"/api/jobs/{running['run_id']}").status == 200
    assert server.submit(refused).status == 200
    assert listener.terminal(refused["run_id"])["matched_count"] == 90


def test_sigterm_drains_a_running_job_then_exits_0(make_server, listener, jobs):
    server = make_server()
    job = jobs.make("medium")
    assert server.submit(job).status == 200
    server.wait_running(job["run_id"])
    server.signal(signal.SIGTERM)
    server.wait_notice("STOPPING=1")
    ready = server.get("/ready")
    assert ready.status == 503 and "shutting down" in ready.text
    refused = server.submit(jobs.make())
    assert refused.status == 503 and "shutting down" in refused.text
    assert server.status(job["run_id"])["status"] == "running"
    assert server.proc.wait(60) == 0
    final = listener.terminal(job["run_id"], timeout=0.1)    # delivered before the exit
    assert final["matched_count"] == 4000 * 4000
    assert journal_statuses(server)[job["run_id"]] == "completed"


def test_restart_runs_jobs_left_queued_or_interrupted(make_server, listener, jobs):
    server = make_server({"KALLA_WORKERS": "1", "KALLA_STOP_TIMEOUT": "0.3"})
    interrupted, queued = jobs.make("medium"), [jobs.make(), jobs.make()]
    for job in (interrupted, *queued):
        assert server.submit(job).status == 200
    server.wait_running(interrupted["run_id"])
    assert server.stop(signal.SIGTERM) == 0
    everyone = [interrupted, *queued]
    assert all(journal_statuses(server)[j["run_id"]] == "queued" for j in everyone)
    journal = server.root / "state" / "journal.sqlite3"      # it holds source credentials
    assert journal.stat().st_mode & 0o777 == 0o600
    assert not any(is_terminal(b) for j in everyone for b in listener.bodies(j["run_id"]))
    partial = os.path.join(interrupted["output_path"], f".kalla-{interrupted['run_id']}.partial")
    assert not os.path.exists(partial)

    server.start()
    for job in everyone:
        final = listener.terminal(job["run_id"])
        assert "error" not in final, final
        assert sum(map(is_terminal, listener.bodies(job["run_id"]))) == 1
    assert server.status(interrupted["run_id"])["attempts"] == 2
    for job in everyone:
        server.wait_delivered(job["run_id"])
    assert server.stop() == 0

    server.env["KALLA_RETENTION_DAYS"] = "0"       # finished jobs are pruned at start
    server.start()
    assert server.get(f"/api/jobs/{queued[0]['run_id']}").status == 404
    assert server.stop() == 0


def test_second_signal_stops_fast_and_keeps_the_job(make_server, jobs):
    server = make_server({"KALLA_WORKERS": "1", "KALLA_STOP_TIMEOUT": "60"})
    job = jobs.make("slow")
    assert server.submit(job).status == 200
    server.wait_running(job["run_id"])
    server.signal(signal.SIGTERM)
    server.wait_notice("STOPPING=1")
    started = time.monotonic()
    assert server.stop(signal.SIGINT, timeout=15) == 0
    assert time.monotonic() - started < 10
    assert journal_statuses(server)[job["run_id"]] == "queued"


def test_worker_that_cannot_boot_stops_the_service(make_server, tmp_path):
    broken = tmp_path / "broken"
    (broken / "datafusion").mkdir(parents=True)
    (broken / "datafusion" / "__init__.py").write_text(
        "raise ImportError('datafusion is broken on this machine')\n")
    server = make_server(start=False)
    server.env["PYTHONPATH"] = f"{broken}:{server.env['PYTHONPATH']}"
    server.start(wait_ready=False)
    code = server.proc.wait(60)
    assert code == 3, server.log()
    log = server.log()
    assert "worker process could not start" in log and "datafusion is broken" in log
    assert log.count("Traceback") <= 2       # one per initial worker, no respawn loop


def test_supervisor_never_loads_the_data_stack(make_server, listener, jobs):
    server = make_server()
    job = jobs.make()
    assert server.submit(job).status == 200
    listener.terminal(job["run_id"])
    with open(f"/proc/{server.pid}/maps") as fh:
        maps = fh.read()
    assert not [lib for lib in DATA_STACK if lib in maps]
    worker = next(iter(server.worker_pids()))
    with open(f"/proc/{worker}/maps") as fh:
        assert "libarrow" in fh.read()          # the check can see it where it is loaded
    code = ("import sys, kalla.cli, kalla.service.supervisor, kalla.service.httpd, "
            "kalla.service.jobqueue, kalla.service.journal, kalla.worker, kalla.callbacks; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('pyarrow', 'datafusion', 'polars', 'kalla.pipeline')))")
    out = subprocess.run([server.python, "-c", code], env=server.env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------- guarded server

@pytest.fixture
def strict(make_server):
    return make_server({"KALLA_API_TOKEN": "t0ken", "KALLA_READ_TIMEOUT": "1",
                        "KALLA_CALLBACK_STYLE": "suffix", "KALLA_WORKERS": "1"})


def test_bearer_token_guards_the_api_only(strict, listener, jobs):
    job = jobs.make()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "t0ken"}):
        resp = strict.submit(job, headers=headers)
        assert resp.status == 401 and "bearer token" in resp.text
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert strict.get(f"/api/jobs/{job['run_id']}").status == 401
    assert strict.get("/api/jobs").status == 401
    for path in ("/health", "/ready", "/metrics"):
        assert strict.get(path).status == 200
    auth = {"Authorization": "Bearer t0ken"}
    assert strict.submit(job, headers=auth).status == 200
    listener.terminal(job["run_id"])
    assert strict.get(f"/api/jobs/{job['run_id']}", headers=auth).status == 200


def test_callback_suffix_style(strict, listener, jobs):
    auth = {"Authorization": "Bearer t0ken"}
    ok, bad = jobs.make(), jobs.make("fail")
    for job in (ok, bad):
        assert strict.submit(job, headers=auth).status == 200
        listener.terminal(job["run_id"])
    paths = {r["path"] for r in listener.records if r["body"]["run_id"] == ok["run_id"]}
    assert paths == {"/cb/progress", "/cb/complete"}
    paths = [r["path"] for r in listener.records if r["body"]["run_id"] == bad["run_id"]]
    assert paths[-1] == "/cb/error"


def test_slow_client_cannot_hold_a_thread(strict):
    import socket
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", strict.port)) as slow:
        slow.settimeout(10)
        received = b""
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            assert strict.get("/health").status == 200     # others are served meanwhile
            time.sleep(0.2)
            if time.monotonic() - started > 3:
                break
        try:
            while chunk := slow.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    assert received.startswith(b"HTTP/1.1 408"), received
    assert time.monotonic() - started < 3
    with socket.create_connection(("127.0.0.1", strict.port)) as idle:   # sends nothing
        idle.settimeout(5)
        assert idle.recv(4096).startswith(b"HTTP/1.1 408")


def test_crashed_supervisor_leaves_no_orphans_and_its_job_runs_after_restart(
        make_server, listener, jobs):
    import psutil
    server = make_server({"KALLA_WORKERS": "1"})
    job = jobs.make("medium")
    assert server.submit(job).status == 200
    server.wait_running(job["run_id"])
    workers = [psutil.Process(pid) for pid in server.worker_pids()]
    crashed = server.pid
    server.proc.kill()                                   # no drain, no cleanup: a crash
    server.proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, "workers outlived their supervisor"
    assert journal_statuses(server)[job["run_id"]] == "running"
    server.start()
    final = listener.terminal(job["run_id"])
    assert final["matched_count"] == 4000 * 4000
    assert sum(map(is_terminal, listener.bodies(job["run_id"]))) == 1
    assert server.status(job["run_id"])["attempts"] == 2
    assert not os.listdir(server.root / "work")          # the crashed run's scratch is gone
    metrics_dirs = os.listdir(server.env.get("TMPDIR", "/tmp"))
    assert f"kalla-metrics-{crashed}" not in metrics_dirs
    assert f"kalla-metrics-{server.pid}" in metrics_dirs
