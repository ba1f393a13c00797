"""Faults: the disk fills up, PostgreSQL drops the connection, the S3 endpoint vanishes or
stalls, a worker grows past its memory cap or is SIGKILLed, the whole service is SIGKILLed.
Each time: one clean error callback (or, for the service, every accepted job completing
exactly once after a restart), no partial file, and a service that keeps serving.

Marked ``faults`` (CI runs them: `pytest -m faults`). The disk-full tests mount small tmpfs
file systems, so they need root; without root they skip, unless CI is set.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from security.hostile import (Proxy, free_port_closed, is_terminal, no_partial_files,
                              scratch_is_empty, wait_until)

pytestmark = pytest.mark.faults

BIG_OUTPUT_SQL = ("SELECT l.id, r.pid, md5(CAST(l.id * 10007 + r.pid AS VARCHAR)) AS h "
                  "FROM l JOIN r ON l.g = r.g")


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the disk-full tests mount tmpfs and must run as root in CI")
        pytest.skip("mounting a tmpfs needs root")


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about ``leave_bytes`` free on path's file system."""
    filler = path / "filler.bin"
    stat = os.statvfs(path)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def worker_pids(server) -> set[int]:
    return server.worker_pids()


# ---------------------------------------------------------------------- disk full


@pytest.fixture(scope="module")
def disk(harness_factory, tmp_path_factory):
    need_root()
    base = tmp_path_factory.mktemp("disks")
    out, work = base / "out", base / "work"
    mount_tmpfs(out, "4m")
    mount_tmpfs(work, "16m")
    try:
        harness = harness_factory({"KALLA_OUTPUT_ROOT": str(out), "KALLA_WORK_DIR": str(work),
                                   "KALLA_WORKERS": "1"}, name="diskfull")
        yield harness, out, work
        harness.server.close()
    finally:
        unmount(out)
        unmount(work)


def assert_clean_failure(harness, job, final, stage_options, volume: Path, free_before: int):
    assert "error" in final, final
    assert "No space left on device" in final["error"] or "space" in final["error"], final
    assert final["stage"] in stage_options, final
    assert not no_partial_files(harness.out_root / job["output_path"]), \
        no_partial_files(harness.out_root / job["output_path"])
    assert wait_until(lambda: scratch_is_empty(harness.server))
    assert wait_until(lambda: free_bytes(volume) >= free_before - 64 * 1024), \
        (free_bytes(volume), free_before)       # the space the job took was given back


def test_outputs_filling_the_disk(disk):
    harness, out, _ = disk
    pids = worker_pids(harness.server)
    before = free_bytes(out)
    job = harness.jobs.make("medium", match_sql=BIG_OUTPUT_SQL)
    final = harness.run(job, timeout=120)
    assert_clean_failure(harness, job, final, ("matching",), out, before)
    assert worker_pids(harness.server) == pids          # the worker survived and serves on
    harness.assert_serving()


def test_disk_full_at_publish_time(disk):
    """Space for a few KB: the small outputs (or summary.json) no longer fit."""
    harness, out, _ = disk
    filler = fill(out, 2048)
    try:
        before = free_bytes(out)
        job = harness.jobs.make()
        final = harness.run(job)
        assert_clean_failure(harness, job, final, ("staging", "matching", "unmatched", "publish"),
                             out, before)
        assert filler.stat().st_size > 0
    finally:
        filler.unlink()
    harness.assert_serving()


def test_scratch_filling_the_disk(disk):
    harness, _, work = disk
    filler = fill(work, 16 * 1024)
    try:
        before = free_bytes(work)
        job = harness.jobs.make("medium")
        final = harness.run(job)
        assert_clean_failure(harness, job, final, ("staging", "matching"), work, before)
    finally:
        filler.unlink()
    harness.assert_serving()


# ---------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def pg_slow_view(pg):
    """A view that streams 400 rows over about 4 seconds."""
    view = pg.qualified("slow_stream")
    # a volatile call in the select list runs once per row, as the rows stream out
    pg.execute(f"CREATE VIEW {view} AS SELECT 1000 + g AS pid, g AS ref, "
               f"pg_sleep(0.01)::text AS pause FROM generate_series(0, 399) g")
    return view


@pytest.fixture(scope="module")
def plain(harness_factory):
    return harness_factory({"KALLA_WORKERS": "2"}, name="faults")


@pytest.mark.postgres
def test_postgres_connection_dropped_mid_read(plain, pg, pg_slow_view):
    job = plain.jobs.make()
    job["sources"][1] = {"alias": "r", "uri": pg.uri(pg_slow_view, user="postgres", password=None)}
    assert plain.server.submit(job).status == 200
    name = pg_slow_view.split(".")[-1]
    active = f"""SELECT pid FROM pg_stat_activity WHERE application_name = 'kalla'
                 AND state = 'active' AND query LIKE '%{name}%' AND pid <> pg_backend_pid()"""
    assert wait_until(lambda: pg.execute(active), timeout=30), "the read never started"
    time.sleep(0.5)                                         # well inside the stream
    killed = pg.execute(f"SELECT pg_terminate_backend(pid) FROM ({active}) a")
    assert killed and all(row[0] for row in killed)
    final = plain.listener.terminal(job["run_id"], timeout=60)
    assert "error" in final and final["stage"] == "staging", final
    assert "connection to PostgreSQL" in final["error"] and "lost" in final["error"], final
    assert not no_partial_files(plain.out_root / job["output_path"])
    assert wait_until(lambda: scratch_is_empty(plain.server))
    assert not pg.execute(active)                           # nothing left running
    plain.assert_serving()


# ---------------------------------------------------------------------- S3


@pytest.fixture
def s3_behind_proxy(plain):
    """A moto server of this test's own, reached through a throttling proxy (1 MB/s), and a
    server whose AWS_ENDPOINT_URL points at the proxy."""
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port_closed()
    moto = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                          aws_access_key_id="AKIAFAULTS", aws_secret_access_key="faults-secret")
    client.create_bucket(Bucket="kalla-faults")
    body = "pid,ref\n" + "".join(f"{1000 + i},{i % 100}\n" for i in range(600_000))
    client.put_object(Bucket="kalla-faults", Key="right.csv", Body=body.encode())
    proxy = Proxy(("127.0.0.1", port), bytes_per_second=1_000_000)
    server = plain.server
    server.stop()
    saved = dict(server.env)
    server.env.update({"AWS_ACCESS_KEY_ID": "AKIAFAULTS", "AWS_SECRET_ACCESS_KEY": "faults-secret",
                       "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": proxy.url,
                       "AWS_ALLOW_HTTP": "true", "KALLA_PARTITIONS": "2"})
    server.start()
    yield proxy, moto
    proxy.close()
    try:
        moto.stop()
    except Exception:   # already stopped by the test
        pass
    server.stop()
    server.env.clear()
    server.env.update(saved)
    server.start()


def s3_job(plain) -> dict:
    job = plain.jobs.make()
    job["sources"][1] = {"alias": "r", "uri": "s3://kalla-faults/right.csv"}
    return job


@pytest.mark.s3
def test_s3_endpoint_vanishing_mid_read(plain, s3_behind_proxy):
    proxy, moto = s3_behind_proxy
    job = s3_job(plain)
    assert plain.server.submit(job).status == 200
    assert wait_until(lambda: proxy.bytes_down > 500_000, timeout=30), "the read never started"
    proxy.vanish()
    moto.stop()
    started = time.monotonic()
    final = plain.listener.terminal(job["run_id"], timeout=60)
    assert "error" in final and final["stage"] == "staging", final
    assert "cannot reach" in final["error"] and "s3://kalla-faults/right.csv" in final["error"]
    assert time.monotonic() - started < 20
    assert not no_partial_files(plain.out_root / job["output_path"])
    assert wait_until(lambda: scratch_is_empty(plain.server))
    plain.assert_serving()


@pytest.mark.s3
def test_a_stalled_s3_read_can_still_be_cancelled(plain, s3_behind_proxy):
    """An endpoint that stops sending (a network partition) blocks the read inside the S3
    client; a cancel still ends the job within the grace period (the worker is replaced)."""
    proxy, _ = s3_behind_proxy
    job = s3_job(plain)
    assert plain.server.submit(job).status == 200
    assert wait_until(lambda: proxy.bytes_down > 500_000, timeout=30)
    proxy.stall()
    time.sleep(0.5)
    started = time.monotonic()
    resp = plain.server.request("DELETE", f"/api/jobs/{job['run_id']}", timeout=30)
    assert resp.status == 200 and resp.json()["status"] == "cancelled", resp.text
    assert time.monotonic() - started < 12
    final = plain.listener.terminal(job["run_id"])
    assert "cancelled" in final["error"]
    assert not no_partial_files(plain.out_root / job["output_path"])
    assert wait_until(lambda: len(worker_pids(plain.server)) == 2, 30)
    plain.assert_serving()


# ---------------------------------------------------------------------- workers


@pytest.fixture(scope="module")
def capped(harness_factory):
    return harness_factory({"KALLA_WORKERS": "1", "KALLA_WORKER_MEMORY": "256MiB",
                            "KALLA_WORKER_MEMORY_LIMIT": "1GiB"}, name="capped")


def test_a_worker_past_its_memory_cap_fails_the_job_not_the_machine(capped):
    """repeat() builds its strings outside DataFusion's memory pool: 90 x 20 MB."""
    server = capped.server
    deaths = server.metrics().get("kalla_runner_worker_deaths_total", 0)
    job = capped.jobs.make(match_sql="SELECT l.id, r.pid, repeat('x', 20000000) AS big "
                                     "FROM l JOIN r ON l.id = r.ref")
    final = capped.run(job, timeout=60)
    # the stage is the last one the worker reported: "staging" when matching had not sent
    # its first progress event yet (see the report: a stage-start event would fix it)
    assert "error" in final and final["stage"] in ("staging", "matching"), final
    assert "KALLA_WORKER_MEMORY_LIMIT" in final["error"], final
    assert not no_partial_files(capped.out_root / job["output_path"])
    assert wait_until(lambda: server.get("/ready").status == 200, 30)
    capped.assert_serving()
    assert server.metrics()["kalla_runner_worker_deaths_total"] == deaths + 1
    assert "was stopped" in server.log()


def test_a_sigkilled_worker_fails_its_job_and_is_replaced(capped):
    """What the kernel's OOM killer does."""
    server = capped.server
    job = capped.jobs.make("slow")
    assert server.submit(job).status == 200
    pid = server.wait_running(job["run_id"], stage="matching")["worker_pid"]
    os.kill(pid, signal.SIGKILL)
    final = capped.listener.terminal(job["run_id"])
    assert "SIGKILL" in final["error"] and final["stage"] == "matching", final
    assert not no_partial_files(capped.out_root / job["output_path"])
    assert wait_until(lambda: server.get("/ready").status == 200, 30)
    capped.assert_serving()


# ---------------------------------------------------------------------- the whole service


def test_service_sigkilled_and_restarted_runs_every_job_to_one_result(harness_factory):
    harness = harness_factory({"KALLA_WORKERS": "2"}, name="crash")
    server, listener = harness.server, harness.listener
    kinds = ["ok", "ok", "medium", "ok", "ok", "medium", "ok", "ok", "medium", "ok"]
    jobs = [harness.jobs.make(kind) for kind in kinds]
    for job in jobs:
        assert server.submit(job).status == 200
    mediums = [j for j, k in zip(jobs, kinds) if k == "medium"]
    server.wait_running(mediums[0]["run_id"], stage="matching")
    server.proc.kill()                                       # no drain, no cleanup
    server.proc.wait()
    killed_at = time.monotonic()
    done_before = {j["run_id"] for j in jobs if any(map(is_terminal, listener.bodies(j["run_id"])))}
    assert len(done_before) < len(jobs), "every job finished before the crash: nothing tested"
    server.start()
    for job, kind in zip(jobs, kinds):
        final = listener.terminal(job["run_id"], timeout=120)
        assert "error" not in final, final
        assert final["matched_count"] == (3000 * 3000 if kind == "medium" else 90)
    for job in jobs:
        server.wait_delivered(job["run_id"])
    terminals = Counter(r["body"]["run_id"] for r in listener.records
                        if is_terminal(r["body"]) and r["status"] == 200)
    statuses = [server.status(j["run_id"]) for j in jobs]
    # Exactly one terminal callback per job - except the documented crash window
    # (docs/api.md): a callback the receiver got just before the SIGKILL, whose 200 the
    # service had not yet recorded, is sent again at restart. Then it is the same body, it
    # reached the receiver before the kill, and the job did not run a second time.
    for job, status in zip(jobs, statuses):
        got = [r for r in listener.records if r["body"].get("run_id") == job["run_id"]
               and is_terminal(r["body"]) and r["status"] == 200]
        assert 1 <= len(got) <= 2, terminals
        if len(got) == 2:    # in flight at the kill: received at most 2 s before it
            assert 0 <= killed_at - got[0]["at"] < 2.0 and got[1]["body"] == got[0]["body"], got
            assert status["attempts"] == 1, status
    assert all(s["status"] == "completed" for s in statuses)
    assert any(s["attempts"] == 2 for s in statuses)        # the interrupted one ran again
    assert wait_until(lambda: scratch_is_empty(server))
    for job in jobs:
        assert not [n for n in no_partial_files(harness.out_root / job["output_path"])
                    if n.startswith(".kalla-")]
