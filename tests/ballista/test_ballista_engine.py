"""The Ballista engine beyond the data-driven cases: tolerance_match at the float and
decimal boundary, refusals, and failures that must read plainly (unreachable scheduler,
no executor, storage the executors do not share, a Python without ballista)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.errors import JobCancelled, KallaError
from kalla.jobs import parse_job
from kalla.pipeline import run_job

pytestmark = pytest.mark.ballista
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_sources(folder, amount_type: pa.DataType) -> tuple[str, str]:
    """Pairs at, just inside and just outside a 0.01 tolerance, as floats or decimals."""
    left = {"id": [1, 2, 3, 4, 5, 6, 7], "amount": ["100.00", "100.00", "100.00", "0.10",
                                                     "1000000.00", None, "-5.00"]}
    right = {"id": [1, 2, 3, 4, 5, 6, 7], "amount": ["100.01", "100.02", "99.99", "0.11",
                                                      "1000000.02", "5.00", "-5.01"]}
    paths = []
    for name, data in (("left", left), ("right", right)):
        values = pa.array(data["amount"], pa.string()).cast(amount_type)
        path = os.path.join(folder, f"{name}.parquet")
        pq.write_table(pa.table({"id": pa.array(data["id"], pa.int64()), "amount": values}), path)
        paths.append(path)
    return paths[0], paths[1]


def tolerance_job(folder, left: str, right: str, output: str, sql_condition: str) -> dict:
    return {"match_sql": "SELECT l.id AS l__id, r.id AS r__id FROM l JOIN r ON l.id = r.id "
                         f"AND {sql_condition}",
            "sources": [{"alias": "l", "uri": left}, {"alias": "r", "uri": right}],
            "primary_keys": {"l": ["id"], "r": ["id"]},
            "output_path": os.path.join(str(folder), output)}


def matched_ids(result) -> list[int]:
    return sorted(pq.read_table(result["output_paths"]["matched"])["l__id"].to_pylist())


@pytest.mark.parametrize("amount_type", [pa.float64(), pa.decimal128(12, 2), pa.decimal128(18, 4)],
                         ids=["float64", "decimal(12,2)", "decimal(18,4)"])
def test_tolerance_match_boundary(amount_type, tmp_path, engine_settings):
    left, right = write_sources(str(tmp_path), amount_type)
    condition = "tolerance_match(l.amount, r.amount, 0.01)"
    remote = run_job(parse_job(tolerance_job(tmp_path, left, right, "ballista", condition), batch=True),
                     engine_settings())
    # 100.00~100.01, 100.00~99.99, 0.10~0.11, -5.00~-5.01 are exactly 0.01 apart: a match,
    # floats included; 100.02 and 1000000.02 differ by 0.02: never; NULL: never.
    assert matched_ids(remote) == [1, 3, 4, 7]
    local = run_job(parse_job(tolerance_job(tmp_path, left, right, "local", condition), batch=True),
                    engine_settings(KALLA_ENGINE="local"))
    assert matched_ids(local) == matched_ids(remote)
    assert remote["unmatched_left_count"] == local["unmatched_left_count"] == 3


def test_native_functions_run_on_the_cluster(tmp_path, engine_settings):
    left, right = write_sources(str(tmp_path), pa.decimal128(12, 2))
    condition = ("tolerance_pct(l.amount, r.amount, 0.0001) AND "
                 "normalize_ref(CAST(l.id AS VARCHAR)) = normalize_ref(CAST(r.id AS VARCHAR))")
    remote = run_job(parse_job(tolerance_job(tmp_path, left, right, "ballista", condition), batch=True),
                     engine_settings())
    local = run_job(parse_job(tolerance_job(tmp_path, left, right, "local", condition), batch=True),
                    engine_settings(KALLA_ENGINE="local"))
    assert matched_ids(remote) == matched_ids(local) == [1, 3, 5]   # 0.01 <= 0.0001 * 100.01


def test_sources_already_in_the_shared_dir_are_read_in_place(cluster, tmp_path, engine_settings,
                                                             monkeypatch):
    from kalla.engines import ballista
    monkeypatch.setattr(ballista, "_shared_copy", lambda *a: pytest.fail("a source was copied"))
    folder = os.path.join(cluster.shared_dir, f"inplace-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(folder)
    left, right = write_sources(folder, pa.decimal128(12, 2))
    job = tolerance_job(tmp_path, left, right, "out", "tolerance_match(l.amount, r.amount, 0.01)")
    result = run_job(parse_job(job, batch=True), engine_settings(KALLA_WORK_DIR=folder))
    assert matched_ids(result) == [1, 3, 4, 7]
    assert sorted(os.listdir(folder)) == ["left.parquet", "right.parquet"]   # job files removed


def plain_job(tmp_path, sql: str | None = None, **extra) -> dict:
    left, right = write_sources(str(tmp_path), pa.float64())
    job = tolerance_job(tmp_path, left, right, "out", "tolerance_match(l.amount, r.amount, 0.01)")
    if sql:
        job["match_sql"] = sql
    return {**job, **extra}


def expect_failure(job: dict, settings, *fragments: str) -> KallaError:
    events = []
    with pytest.raises(KallaError) as info:
        run_job(parse_job(job, batch=True), settings, events.append)
    error = info.value
    assert error.stage == "matching", error
    for fragment in fragments:
        assert fragment in str(error)
    assert not os.path.exists(job["output_path"]) or not os.listdir(job["output_path"])
    return error


def test_jaro_winkler_is_refused_up_front(tmp_path, offline_settings):
    sql = ("SELECT l.id AS l__id, r.id AS r__id FROM l JOIN r ON l.id = r.id "
           "AND jaro_winkler(CAST(l.amount AS VARCHAR), CAST(r.amount AS VARCHAR)) > 0.9")
    error = expect_failure(plain_job(tmp_path, sql), offline_settings(),
                           "jaro_winkler", "KALLA_ENGINE=local")
    assert "cannot reach" not in str(error)     # refused before any contact


def test_jaro_winkler_inside_a_string_is_not_refused(tmp_path, offline_settings):
    sql = ("SELECT l.id AS l__id, r.id AS r__id, 'jaro_winkler(a, b)' AS note "
           "FROM l JOIN r ON l.id = r.id")
    # passes the refusal, then fails on the (unreachable) scheduler: proof it got that far
    expect_failure(plain_job(tmp_path, sql), offline_settings(),
                   "cannot import ballista")


def test_rules_are_refused_up_front(tmp_path, offline_settings):
    job = plain_job(tmp_path)
    rules = [{"name": "exact", "match_sql": job.pop("match_sql")}]
    expect_failure({**job, "rules": rules}, offline_settings(), "'rules'",
                   "KALLA_ENGINE=local")


@pytest.mark.parametrize("setting,value,fragment", [
    ("KALLA_BALLISTA_URL", "", "KALLA_BALLISTA_URL=df://HOST:PORT"),
    ("KALLA_BALLISTA_URL", "http://scheduler:50050", "expected df://HOST:PORT"),
    ("KALLA_SHARED_DIR", "/nonexistent/kalla-shared", "KALLA_SHARED_DIR"),
    ("KALLA_BALLISTA_PYTHON", "", "KALLA_BALLISTA_PYTHON"),
    ("KALLA_BALLISTA_PYTHON", "/nonexistent/python3", "cannot be run: No such file"),
])
def test_settings_are_checked_before_staging(setting, value, fragment, tmp_path, offline_settings):
    events = []
    with pytest.raises(KallaError) as info:
        run_job(parse_job(plain_job(tmp_path), batch=True),
                offline_settings(**{setting: value}), events.append)
    assert info.value.stage == "matching" and fragment in str(info.value)
    assert not [e for e in events if e["stage"] == "staging"]      # nothing was read


def test_python_without_ballista_is_named(tmp_path, offline_settings):
    expect_failure(plain_job(tmp_path), offline_settings(),
                   "cannot import ballista", "KALLA_BALLISTA_PYTHON")


def test_unreachable_scheduler_is_a_clear_matching_error(tmp_path, engine_settings):
    error = expect_failure(plain_job(tmp_path), engine_settings(KALLA_BALLISTA_URL="df://127.0.0.1:9"),
                           "cannot reach the Ballista scheduler at df://127.0.0.1:9",
                           "Connection refused")
    assert error.to_dict()["retryable"] is True and error.to_dict()["stage"] == "matching"


def test_storage_the_executors_do_not_see_is_detected(cluster, tmp_path, engine_settings):
    """The client sees a directory the executors do not: Ballista itself then reads
    zero rows without an error, so Kalla compares counts."""
    if not cluster.wrap:
        pytest.skip("a native Ballista Python sees every directory the executors see")
    private = tmp_path / "client-only"
    private.mkdir()
    python = cluster.python.replace("--bind", f"--bind {private} --bind", 1)
    expect_failure(plain_job(tmp_path), engine_settings(KALLA_SHARED_DIR=str(private),
                                                        KALLA_BALLISTA_PYTHON=python),
                   "the Ballista executors read 0 rows of source 'l' where Kalla staged 7")


@pytest.fixture
def lonely_scheduler(cluster, stop_node):
    """A second scheduler, in the cluster's network, that no executor joins."""
    proc = cluster.start_node("scheduler", "--bind", "127.0.0.1:50060", log_name="lonely.log")
    try:
        yield "df://127.0.0.1:50060", proc
    finally:
        stop_node(proc)


def test_no_executor_is_a_clear_error(lonely_scheduler, tmp_path, engine_settings):
    url, proc = lonely_scheduler
    started = time.monotonic()
    error = expect_failure(plain_job(tmp_path), engine_settings(KALLA_BALLISTA_URL=url,
                                                                KALLA_BALLISTA_START_TIMEOUT="3"),
                           "did not finish within 3 s", "executor")
    assert error.to_dict()["retryable"] is True
    assert time.monotonic() - started < 60
    # the launcher passes SIGTERM on: the node stops cleanly
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


def test_cancel_stops_the_cluster_client(lonely_scheduler, cluster, tmp_path, engine_settings):
    url, _ = lonely_scheduler       # no executor: the client waits until it is stopped
    settings = engine_settings(KALLA_BALLISTA_URL=url, KALLA_BALLISTA_START_TIMEOUT="600")
    spec = parse_job(plain_job(tmp_path), batch=True)
    cancel = threading.Event()
    timer = threading.Timer(2.0, cancel.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(JobCancelled) as info:
        run_job(spec, settings, cancel=cancel)
    timer.cancel()
    assert info.value.stage == "matching" and "cancelled" in str(info.value)
    assert time.monotonic() - started < 30
    assert not [d for d in os.listdir(cluster.shared_dir) if spec.run_id in d]   # cleaned up


def test_an_execution_error_on_the_cluster_is_reported(tmp_path, engine_settings):
    sql = ("SELECT l.id AS l__id, r.id AS r__id, l.id / (r.id - r.id) AS boom "
           "FROM l JOIN r ON l.id = r.id")
    expect_failure(plain_job(tmp_path, sql), engine_settings(),
                   "the match failed on the Ballista cluster", "DivideByZero")


def test_kalla_imports_on_the_clusters_python(cluster):
    """Kalla must run on Python 3.13 too: every module compiles there, and the modules
    that need no data library import (the remote program needs only ballista's own)."""
    import shlex
    code = f"""
import pathlib, sys
sys.path.insert(0, {REPO!r})
for path in sorted(pathlib.Path({REPO!r}, "kalla").rglob("*.py")):
    compile(path.read_text(), str(path), "exec")
import kalla, kalla.cli, kalla.config, kalla.errors, kalla.sqltext, kalla.keys
import kalla.engines, kalla.engines.ballista, kalla.engines.ballista_remote
print(sys.version_info[:2])
"""
    proc = subprocess.run([*shlex.split(cluster.python), "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if not os.environ.get("KALLA_TEST_BALLISTA_PYTHON"):
        assert proc.stdout.strip().endswith("(3, 13)")


def test_wired_into_the_pipeline(tmp_path, engine_settings, monkeypatch):
    """Without this folder's stage patch: kalla/matching.py itself dispatches."""
    import inspect

    from kalla import matching
    if "ballista" not in inspect.getsource(matching.run_match):
        pytest.skip("kalla/matching.py does not dispatch to kalla.engines yet")
    monkeypatch.undo()
    settings = engine_settings()
    result = run_job(parse_job(plain_job(tmp_path), batch=True), settings)
    with open(os.path.join(os.path.dirname(result["output_paths"]["matched"]), "summary.json")) as fh:
        assert '"join_strategy": "ballista"' in fh.read()


def integrated() -> bool:
    import inspect

    from kalla import matching
    from kalla.config import SETTINGS_BY_NAME
    return "KALLA_ENGINE" in SETTINGS_BY_NAME and "ballista" in inspect.getsource(matching.run_match)


@pytest.mark.parametrize("outcome", ["completed", "unreachable"])
def test_kalla_run_callbacks(outcome, cluster, tmp_path):
    """`kalla run` end to end, settings from the environment: the completion callback, or
    an unreachable scheduler's error callback with stage matching."""
    if not integrated():
        pytest.skip("kalla/config.py and kalla/matching.py do not know KALLA_ENGINE yet")
    import json

    from support import KALLA_RUN, CallbackListener
    listener = CallbackListener()
    try:
        job = {**plain_job(tmp_path), "callback_url": listener.url}
        job_file = tmp_path / "job.json"
        job_file.write_text(json.dumps(job))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KALLA_")}
        env.update({"KALLA_ENGINE": "ballista", "KALLA_SHARED_DIR": cluster.shared_dir,
                    "KALLA_BALLISTA_PYTHON": cluster.python, "KALLA_WORK_DIR": str(tmp_path),
                    "KALLA_BALLISTA_URL": cluster.url if outcome == "completed" else "df://127.0.0.1:9"})
        proc = subprocess.run([KALLA_RUN, "--json", "--quiet", str(job_file)], capture_output=True,
                              text=True, env=env, timeout=300)
        last = listener.bodies()[-1]
    finally:
        listener.close()
    if outcome == "completed":
        assert proc.returncode == 0, proc.stderr
        assert last["matched_count"] == 4 and last["unmatched_left_count"] == 3
    else:
        assert proc.returncode == 1
        assert last["stage"] == "matching"
        assert "cannot reach the Ballista scheduler at df://127.0.0.1:9" in last["error"]
