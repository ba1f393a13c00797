"""Where a job may read and write: KALLA_OUTPUT_ROOT and KALLA_DATA_ROOTS cannot be escaped
(``..``, absolute paths, symlinks planted inside a root), through the service (400) and
the CLI (exit 2), and what Kalla creates is closed to other users."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from security.hostile import assert_plain_400, no_partial_files, wait_until
from support import KALLA_RUN


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A directory outside every root, holding a 'secret' a job must not reach."""
    root = tmp_path_factory.mktemp("outside")
    (root / "secret.csv").write_text("id,card\n1,4111111111111111\n")
    pq.write_table(pa.table({"id": [1], "card": ["4111111111111111"]}), root / "secret.parquet")
    return root


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------- output root


@pytest.mark.parametrize("output_path", [
    "../escaped", "../../../../../../tmp/escaped", "a/../../escaped", "/tmp/escaped-abs",
    "/etc", "/", "..", "./../escaped",
])
def test_output_path_outside_the_root_is_400(guarded, output_path):
    job = guarded.jobs.make(output_path=output_path)
    assert_plain_400(guarded.server.submit(job), "output_path: resolves outside KALLA_OUTPUT_ROOT")
    assert not Path("/tmp/escaped-abs").exists()


def test_symlinks_planted_inside_the_output_root_are_followed_and_refused(guarded, outside):
    root = guarded.out_root
    (root / "to-outside").symlink_to(outside, target_is_directory=True)
    (root / "to-etc").symlink_to("/etc")
    for output_path in ("to-outside", "to-outside/run", "to-etc/cron.d",
                        str(root / "to-outside" / "run")):
        job = guarded.jobs.make(output_path=output_path)
        resp = guarded.server.submit(job)
        assert resp.status == 400 and resp.text.startswith("output_path"), (output_path, resp.text)
    assert sorted(os.listdir(outside)) == ["secret.csv", "secret.parquet"]


def test_a_symlink_loop_in_the_output_root_fails_the_job_cleanly(guarded):
    root = guarded.out_root
    (root / "loop").symlink_to(root / "loop")
    job = guarded.jobs.make(output_path="loop/x")
    resp = guarded.server.submit(job)          # realpath cannot resolve a loop: not outside
    if resp.status == 200:
        final = guarded.listener.terminal(job["run_id"])
        assert "output directory" in final.get("error", ""), final
    else:
        assert_plain_400(resp, "output_path")


def test_paths_inside_the_root_are_accepted(guarded):
    root = guarded.out_root
    (root / "inner").mkdir()
    (root / "alias").symlink_to(root / "inner", target_is_directory=True)
    for output_path in (f"nested/deeper/{time.monotonic_ns()}", str(root / "absolute-inside"),
                        "alias/run"):
        job = guarded.jobs.make(output_path=output_path)
        final = guarded.run(job)
        assert final.get("matched_count") == 90, final
        for path in final["output_paths"].values():
            assert os.path.realpath(path).startswith(str(root) + os.sep)


def test_a_directory_swapped_for_a_symlink_after_submission_is_refused(guarded, outside):
    """Checked again when the job starts: a queued job whose output directory was replaced
    by a symlink pointing out of the root fails instead of writing there."""
    root = guarded.out_root
    swap = root / "swap"
    swap.mkdir()
    blockers = [guarded.jobs.make("slow") for _ in range(2)]       # both workers busy
    for job in blockers:
        assert guarded.server.submit(job).status == 200
    for job in blockers:
        assert wait_until(lambda: guarded.server.status(job["run_id"])["status"] == "running")
    victim = guarded.jobs.make(output_path="swap/run")
    assert guarded.server.submit(victim).status == 200
    swap.rmdir()
    swap.symlink_to(outside, target_is_directory=True)
    for job in blockers:
        guarded.server.request("DELETE", f"/api/jobs/{job['run_id']}")
    final = guarded.listener.terminal(victim["run_id"])
    assert "output_path" in final.get("error", ""), final
    assert sorted(os.listdir(outside)) == ["secret.csv", "secret.parquet"]


# ---------------------------------------------------------------------- data roots


@pytest.mark.parametrize("uri", [
    "/etc/passwd", "/etc/hostname", "file:///etc/passwd", "/proc/self/environ",
    "{data}/../../../../../../etc/passwd", "{outside}/secret.csv", "{outside}/*.csv",
    "{outside}/secret.parquet", "relative/../../secret.csv",
])
def test_local_sources_outside_the_data_roots_are_400(guarded, outside, data_root, uri):
    uri = uri.format(data=data_root, outside=outside)
    job = guarded.jobs.make()
    job["sources"][0]["uri"] = uri
    assert_plain_400(guarded.server.submit(job), "sources[0].uri")
    assert not (guarded.out_root / job["output_path"]).exists()


def test_a_symlink_inside_a_data_root_pointing_out_is_refused(guarded, outside, data_root):
    (data_root / "innocent.csv").symlink_to("/etc/passwd")
    (data_root / "cards.parquet").symlink_to(outside / "secret.parquet")
    for name in ("innocent.csv", "cards.parquet"):
        job = guarded.jobs.make()
        job["sources"][0]["uri"] = str(data_root / name)
        assert_plain_400(guarded.server.submit(job), "sources[0].uri")


def test_a_glob_matching_a_symlink_that_points_out_is_refused(guarded, outside, data_root):
    folder = data_root / "globbed"
    folder.mkdir()
    pq.write_table(pa.table({"id": [2], "card": ["none"]}), folder / "a.parquet")
    (folder / "b.parquet").symlink_to(outside / "secret.parquet")
    job = guarded.jobs.make(match_sql="SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref",
                            primary_keys={"l": ["id"], "r": ["pid"]})
    job["sources"][0]["uri"] = str(folder / "*.parquet")
    resp = guarded.server.submit(job)
    if resp.status == 200:                          # let it finish before failing the test
        guarded.listener.terminal(job["run_id"])
    assert_plain_400(resp, "sources[0].uri")


# ---------------------------------------------------------------------- permissions


def test_outputs_and_the_directories_kalla_creates_are_closed_to_others(guarded):
    job = guarded.jobs.make(output_path=f"perm/{time.monotonic_ns()}/run")
    final = guarded.run(job)
    assert final.get("matched_count") == 90, final
    run_dir = guarded.out_root / job["output_path"]
    for path in [*final["output_paths"].values(), final["summary_path"]]:
        assert mode(path) == 0o640, (path, oct(mode(path)))
    for directory in (run_dir, run_dir.parent, run_dir.parent.parent):     # intermediates too
        assert mode(directory) & 0o007 == 0, (directory, oct(mode(directory)))
    assert not no_partial_files(run_dir) or all(not n.startswith(".kalla-")
                                                for n in no_partial_files(run_dir))


def test_state_scratch_and_metrics_are_private(guarded):
    server = guarded.server
    assert mode(server.root / "state") == 0o700
    assert mode(server.root / "state" / "journal.sqlite3") == 0o600
    for path in (server.root / "state").iterdir():        # the WAL holds credentials too
        assert mode(path) & 0o077 == 0, (path, oct(mode(path)))
    job = guarded.jobs.make("slow")
    assert server.submit(job).status == 200
    server.wait_running(job["run_id"], stage="matching")
    scratch = [p for p in (server.root / "work").iterdir() if p.name.startswith("kalla-")]
    assert scratch and all(mode(p) == 0o700 for p in scratch), [(p, oct(mode(p))) for p in scratch]
    metrics_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"kalla-metrics-{server.pid}"
    assert mode(metrics_dir) == 0o700
    server.request("DELETE", f"/api/jobs/{job['run_id']}")
    assert wait_until(lambda: not [p for p in (server.root / "work").iterdir()
                                   if p.name.startswith("kalla-")])


# ---------------------------------------------------------------------- the CLI


def run_cli(job: dict, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return subprocess.run([KALLA_RUN, "--quiet", str(path)], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.fixture
def confined_env(cli_env, data_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return {**cli_env, "KALLA_OUTPUT_ROOT": str(out), "KALLA_DATA_ROOTS": str(data_root)}


def cli_job(data_root: Path, **overrides) -> dict:
    job = {"match_sql": "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref",
           "sources": [{"alias": "l", "uri": str(data_root / "left.csv")},
                       {"alias": "r", "uri": str(data_root / "right.csv")}],
           "output_path": "run", "primary_keys": {"l": ["id"], "r": ["pid"]}}
    job.update(overrides)
    return job


@pytest.mark.parametrize("change,field", [
    ({"output_path": "../escaped"}, "output_path"),
    ({"output_path": "/etc"}, "output_path"),
    ({"sources": [{"alias": "l", "uri": "/etc/passwd"},
                  {"alias": "r", "uri": "{data}/right.csv"}]}, "sources[0].uri"),
    ({"sources": [{"alias": "l", "uri": "{data}/left.csv"},
                  {"alias": "r", "uri": "{data}/../../../../../../etc/passwd"}]},
     "sources[1].uri"),
])
def test_cli_refuses_paths_outside_the_roots_with_exit_2(tmp_path, confined_env, data_root,
                                                         change, field):
    text = json.dumps(change).replace("{data}", str(data_root))
    job = cli_job(data_root, **json.loads(text))
    proc = run_cli(job, tmp_path, confined_env)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert field in proc.stderr, proc.stderr
    assert not (Path(confined_env["KALLA_OUTPUT_ROOT"]) / "run").exists()


def test_cli_cannot_copy_etc_passwd_into_an_output(tmp_path, confined_env, data_root):
    """The classic: read /etc/passwd as a CSV, match everything, publish it."""
    job = cli_job(data_root, match_sql="SELECT * FROM l", primary_keys={"l": ["root:x:0:0:root:/root:/bin/bash"], "r": ["pid"]},
                  sources=[{"alias": "l", "uri": "/etc/passwd"},
                           {"alias": "r", "uri": str(data_root / "right.csv")}])
    proc = run_cli(job, tmp_path, confined_env)
    assert proc.returncode == 2 and "KALLA_DATA_ROOTS" in proc.stderr, proc.stderr
    assert not list(Path(confined_env["KALLA_OUTPUT_ROOT"]).rglob("*"))


def test_cli_inside_the_roots_works(tmp_path, confined_env, data_root):
    proc = run_cli(cli_job(data_root), tmp_path, confined_env)
    assert proc.returncode == 0, proc.stderr
    out = Path(confined_env["KALLA_OUTPUT_ROOT"]) / "run"
    assert mode(out / "matched.parquet") == 0o640 and mode(out) & 0o007 == 0
