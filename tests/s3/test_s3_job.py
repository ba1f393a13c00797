"""Whole jobs with an S3 CSV source and a local Parquet source: bin/kalla-run and `kalla serve`."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support import CallbackListener

from .conftest import SECRET_KEY

pytestmark = pytest.mark.s3

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() \
    else sys.executable
KALLA_RUN = str(REPO / "bin" / "kalla-run")
MATCH_SQL = ("SELECT i.invoice_id, p.payment_id FROM invoices i JOIN payments p "
             "ON i.invoice_id = p.invoice_ref AND tolerance_match(i.amount, p.paid, 0.01)")


def invoices_csv(rows: int) -> bytes:
    """CRLF lines, a quoted memo with commas and escaped quotes, no final newline."""
    lines = [b"invoice_id,customer,amount,memo"]
    for i in range(rows):
        lines.append(b'INV-%07d,"Cust %d, Ltd",%d.%02d,"net 30, ""ok"" %d"'
                     % (i, i % 97, 100 + i % 5000, i % 100, i))
    return b"\r\n".join(lines)


def payments_table(rows: int, orphans: int) -> pa.Table:
    """A payment for every invoice whose number is not a multiple of 4, 1 cent off at times."""
    paid = [i for i in range(rows) if i % 4]
    ids = [f"PAY-{i:07d}" for i in paid] + [f"PAY-X{j}" for j in range(orphans)]
    refs = [f"INV-{i:07d}" for i in paid] + [f"INV-NONE-{j}" for j in range(orphans)]
    amounts = [round(100 + i % 5000 + (i % 100) / 100 + (0.01 if i % 7 == 0 else 0), 2)
               for i in paid] + [1.0] * orphans
    return pa.table({"payment_id": ids, "invoice_ref": refs, "paid": amounts})


@pytest.fixture
def job_env(s3_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KALLA_", "AWS_"))}
    env.update(s3_env)
    env.update({"KALLA_WORK_DIR": str(tmp_path / "work"), "KALLA_WORKER_MEMORY": "512MiB",
                "PYTHONPATH": str(REPO)})
    (tmp_path / "work").mkdir()
    return env


def write_job(tmp_path: Path, invoices_uri: str, payments_path: str, **extra) -> Path:
    job = {"match_sql": MATCH_SQL,
           "sources": [{"alias": "invoices", "uri": invoices_uri, **extra},
                       {"alias": "payments", "uri": payments_path}],
           "output_path": str(tmp_path / "out"),
           "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}}
    path = tmp_path / f"job-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(job))
    return path


def test_kalla_run_matches_an_s3_csv_against_local_parquet(bucket, tmp_path, job_env):
    rows = 170_000            # ~9.5 MiB: the 8 MiB head, then a byte range
    uri = bucket.put("in/invoices.csv", invoices_csv(rows))
    pq.write_table(payments_table(rows, orphans=7), tmp_path / "payments.parquet")
    job = write_job(tmp_path, uri, str(tmp_path / "payments.parquet"))
    done = subprocess.run([KALLA_RUN, "--json", "--quiet", str(job)], env=job_env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["matched_count"] == rows - rows // 4
    assert result["unmatched_left_count"] == rows // 4
    assert result["unmatched_right_count"] == 7
    matched = pq.read_table(result["output_paths"]["matched"])
    assert matched.num_rows == result["matched_count"]
    assert len(set(matched.column("invoice_id").to_pylist())) == matched.num_rows
    assert SECRET_KEY not in done.stdout + done.stderr


def test_kalla_run_reports_a_missing_object_by_source_name(bucket, tmp_path, job_env):
    pq.write_table(payments_table(10, orphans=1), tmp_path / "payments.parquet")
    job = write_job(tmp_path, f"s3://{bucket.name}/missing.csv", str(tmp_path / "payments.parquet"))
    done = subprocess.run([KALLA_RUN, "--quiet", str(job)], env=job_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "invoices" in done.stderr and f"no object s3://{bucket.name}/missing.csv" in done.stderr
    assert SECRET_KEY not in done.stdout + done.stderr
    assert not (tmp_path / "out" / "matched.parquet").exists()


# ---------------------------------------------------------------------------- the service

class Callbacks(CallbackListener):
    """The shared callback listener, plus the staging progress of one source."""

    def progress(self, run_id: str, source: str) -> list[float]:
        return [b["progress"] for b in self.bodies() if b.get("run_id") == run_id
                and b.get("stage") == "staging" and b.get("source") == source]



@pytest.fixture
def service(job_env, tmp_path):
    env = {**job_env, "KALLA_BIND": "127.0.0.1:0", "KALLA_WORKERS": "1",
           "KALLA_STATE_DIR": str(tmp_path / "state"), "KALLA_PROGRESS_INTERVAL": "0"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PYTHON, "-m", "kalla", "serve"], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (port := re.findall(r"listening on http://127\.0\.0\.1:(\d+)",
                                      log_path.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port[-1]}", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def submit(base: str, job: dict) -> dict:
    request = urllib.request.Request(f"{base}/api/jobs", data=json.dumps(job).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def service_job(callbacks: Callbacks, tmp_path: Path, invoices_uri: str, **extra) -> dict:
    job = json.loads(write_job(tmp_path, invoices_uri, str(tmp_path / "payments.parquet"),
                               **extra).read_text())
    return {**job, "run_id": str(uuid.uuid4()), "callback_url": callbacks.url}


@pytest.mark.service
def test_the_service_runs_an_s3_job_and_reports_its_errors(bucket, tmp_path, service):
    base, log_path = service
    callbacks = Callbacks()
    rows = 4000
    uri = bucket.put("svc/invoices.csv", invoices_csv(rows))
    pq.write_table(payments_table(rows, orphans=3), tmp_path / "payments.parquet")

    job = service_job(callbacks, tmp_path, uri,
                      filters=[{"column": "amount", "op": "gte", "value": 2000}])
    assert submit(base, job)["status"] == "accepted"
    done = callbacks.terminal(job["run_id"])
    kept = [i for i in range(rows) if 100 + i % 5000 + (i % 100) / 100 >= 2000]
    assert "error" not in done, done
    assert done["matched_count"] == sum(1 for i in kept if i % 4)
    assert done["unmatched_left_count"] == sum(1 for i in kept if i % 4 == 0)
    progress = callbacks.progress(job["run_id"], "invoices")
    assert progress and progress[-1] == 1.0 and progress == sorted(progress)

    failing = service_job(callbacks, tmp_path, "s3://no-such-bucket-kalla/invoices.csv")
    submit(base, failing)
    error = callbacks.terminal(failing["run_id"])
    assert "invoices" in error["error"] and "does not exist" in error["error"]
    everything = json.dumps(callbacks.bodies()) + log_path.read_text(errors="replace")
    assert SECRET_KEY not in everything
