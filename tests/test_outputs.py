"""Publishing: atomic, all-or-nothing, safe permissions, nothing partial after a failure."""
from __future__ import annotations

import os
import stat
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kalla.errors import KallaError
from kalla.jobs import parse_job
from kalla.pipeline import run_job


def make_job(tmp_path, out, n=1000, sql=None):
    left, right = tmp_path / "l.parquet", tmp_path / "r.parquet"
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"id": np.arange(n), "memo": [f"memo-{i:08d}-{rng.integers(1e9)}" for i in range(n)]}), left)
    pq.write_table(pa.table({"rid": np.arange(n), "ref": np.arange(n)}), right)
    return parse_job({"match_sql": sql or "SELECT l.id, l.memo, r.rid FROM l JOIN r ON l.id = r.ref",
                      "sources": [{"alias": "l", "uri": str(left)}, {"alias": "r", "uri": str(right)}],
                      "output_path": str(out), "primary_keys": {"l": ["id"], "r": ["rid"]}}, batch=True)


def test_outputs_are_owner_and_group_only(tmp_path, settings):
    result = run_job(make_job(tmp_path, tmp_path / "out"), settings)
    for path in [*result["output_paths"].values(), result["summary_path"]]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert sorted(os.listdir(tmp_path / "out")) == [
        "matched.parquet", "summary.json", "unmatched_left.parquet", "unmatched_right.parquet"]


def test_failed_job_keeps_previous_outputs_and_leaves_nothing_partial(tmp_path, settings):
    out = tmp_path / "out"
    first = run_job(make_job(tmp_path, out), settings)
    before = {name: os.stat(path).st_mtime_ns for name, path in first["output_paths"].items()}
    bad = make_job(tmp_path, out, sql="SELECT l.id, r.rid, CAST(l.memo AS INT) AS n FROM l JOIN r ON l.id = r.ref")
    with pytest.raises(KallaError) as info:
        run_job(bad, settings)
    assert info.value.stage == "matching"
    assert sorted(os.listdir(out)) == ["matched.parquet", "summary.json", "unmatched_left.parquet",
                                       "unmatched_right.parquet"]
    assert {name: os.stat(path).st_mtime_ns for name, path in first["output_paths"].items()} == before
    assert not os.listdir(settings.work_dir)      # scratch removed too


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root and must be able to mount a small tmpfs")
        pytest.skip("needs root to mount a size-limited tmpfs")
    yield mount
    unmounted = subprocess.run(["umount", str(mount)], capture_output=True, text=True)
    # "target is busy": a writer left a file on the full disk open
    assert unmounted.returncode == 0, unmounted.stderr


def test_disk_full_while_writing_outputs(tmp_path, settings, tiny_disk):
    job = make_job(tmp_path, tiny_disk / "out", n=100_000)
    with pytest.raises(KallaError) as info:
        run_job(job, settings)
    assert "No space left on device" in str(info.value) or "space" in str(info.value).lower()
    assert os.listdir(tiny_disk / "out") == []          # no partial file, no partial directory
    # the same process keeps working once there is room
    result = run_job(make_job(tmp_path, tmp_path / "roomy", n=100_000), settings)
    assert result["matched_count"] == 100_000


@pytest.mark.parametrize("explain", [False, True])
def test_unmatched_sides_one_after_the_other_write_the_same_files(tmp_path, settings, monkeypatch, explain):
    """Under a tight budget the two anti-joins run one after the other: same files."""
    import kalla.unmatched as unmatched
    decisions = []
    real = unmatched.fits_side_by_side
    monkeypatch.setattr(unmatched, "fits_side_by_side", lambda *a: decisions.append(real(*a)) or decisions[-1])

    def run(out):
        job = make_job(tmp_path, out, n=3000, sql="SELECT l.id, r.rid FROM l JOIN r ON l.id = r.ref WHERE l.id % 3 = 0")
        job = job.__class__(**{**job.__dict__, "explain": explain})
        result = run_job(job, settings)
        return result, {side: pq.read_table(result["output_paths"][side])
                        for side in ("unmatched_left", "unmatched_right")}

    together, files = run(tmp_path / "together")
    monkeypatch.setattr(unmatched, "UNMATCHED_SHARE", 0.0)
    apart, files_apart = run(tmp_path / "apart")
    assert decisions == [True, False]
    assert apart["unmatched_left_count"] == together["unmatched_left_count"] == 2000
    for side in files:     # (explain's join may order rows differently: compare sorted)
        key = files[side].schema.names[0]
        assert files_apart[side].sort_by(key).equals(files[side].sort_by(key))


def test_outputs_have_large_row_groups_not_one_per_batch(tmp_path, settings, monkeypatch):
    """DataFusion streams batches of at most 32768 rows; matched.parquet gathers them into
    row groups (here of at least 70,000 rows: only gathering makes one that large)."""
    import kalla.outputs as outputs
    monkeypatch.setattr(outputs.RowGroups.__init__, "__defaults__", (70_000, outputs.ROW_GROUP_BYTES))
    result = run_job(make_job(tmp_path, tmp_path / "out", n=200_000), settings)
    matched = pq.ParquetFile(result["output_paths"]["matched"])
    assert matched.metadata.num_rows == 200_000
    sizes = [matched.metadata.row_group(i).num_rows for i in range(matched.num_row_groups)]
    assert len(sizes) >= 2 and all(size >= 70_000 for size in sizes[:-1]), sizes
