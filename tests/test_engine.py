"""The DataFusion side: read-only SQL, tolerance_match semantics and plans, streaming, spilling."""
from __future__ import annotations

import decimal
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datafusion import DataFrame

from kalla.engine import BARRIER_COLUMN, explain, make_context, plan_match
from kalla.errors import MatchError
from kalla.jobs import parse_job
from kalla.pipeline import run_job


@pytest.fixture(params=[True, False], ids=["hash", "sort-merge"])
def ctx(request, tmp_path):
    return make_context(memory_bytes=128 << 20, spill_dir=str(tmp_path / "spill"),
                        hash_join=request.param)


def register(ctx, name, **columns):
    ctx.register_record_batches(name, [[pa.record_batch(columns)]])


def values(df: DataFrame, column: str) -> list:
    return df.to_pydict()[column]


REFUSED = [
    ("CREATE TABLE x AS SELECT 1", "DDL not supported"),
    ("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'", "DDL not supported"),
    ("DROP TABLE l", "DDL not supported"),
    ("COPY l TO '/tmp/kalla-leak.csv'", "DML not supported: COPY"),
    ("INSERT INTO l VALUES (1, 2.0)", "DML not supported"),
    ("SET datafusion.execution.batch_size = 1", "Statement not supported"),
    ("SELECT * FROM '/etc/passwd'", "not found"),
    ("SELECT * FROM read_csv('/etc/passwd')", "not found"),
    ("SELECT 1; DROP TABLE l", "single SQL statement"),
    ("SELECT * FROM information_schema.tables", "not found"),
    ("EXPLAIN SELECT * FROM l", "EXPLAIN is not a matching query"),
    ("SELECT * FROM other_jobs_table", "not found"),
]


@pytest.mark.parametrize("sql,message", REFUSED)
def test_match_sql_may_only_read(ctx, sql, message, tmp_path):
    register(ctx, "l", k=[1], amount=[1.0])
    with pytest.raises(MatchError) as info:
        plan_match(ctx, sql)
    assert message in str(info.value)
    assert info.value.stage == "matching"
    assert not (tmp_path / "kalla-leak.csv").exists()


def test_duplicate_output_names_are_refused(ctx):
    register(ctx, "l", k=[1])
    register(ctx, "r", k=[1])
    with pytest.raises(MatchError, match="two columns named 'k'"):
        plan_match(ctx, "SELECT l.k, r.k FROM l JOIN r ON l.k = r.k")


BOUNDARY = [  # (left, right, threshold, expected)
    ("100.00", "100.01", "0.01", True),
    ("100.01", "100.00", "0.01", True),
    ("100.00", "100.02", "0.01", False),
    ("0.10", "0.11", "0.01", True),
    ("1.000", "1.011", "0.01", False),
    ("5", "5", "0", True),
    ("1000000.00", "1000000.02", "0.01", False),
]


@pytest.mark.parametrize("kind", ["float64", "decimal"])
def test_tolerance_match_boundary(ctx, kind):
    def column(texts):
        if kind == "float64":
            return pa.array([float(t) for t in texts])
        return pa.array([decimal.Decimal(t) for t in texts], pa.decimal128(12, 3))
    register(ctx, "t", a=column([b[0] for b in BOUNDARY]), b=column([b[1] for b in BOUNDARY]),
             i=list(range(len(BOUNDARY))))
    cases = " UNION ALL ".join(
        f"SELECT {i} AS i, tolerance_match(a, b, {case[2]}) AS ok FROM t WHERE i = {i}"
        for i, case in enumerate(BOUNDARY))
    table = plan_match(ctx, f"SELECT * FROM ({cases}) ORDER BY i").to_pydict()
    got = dict(zip(table["i"], table["ok"]))
    assert [got[i] for i in range(len(BOUNDARY))] == [b[3] for b in BOUNDARY]


def test_tolerance_match_null_is_no_match(ctx):
    register(ctx, "t", a=pa.array([1.0, None, 1.0]), b=pa.array([1.0, 1.0, None]))
    assert values(plan_match(ctx, "SELECT tolerance_match(a, b, 1) AS ok FROM t"), "ok") == [True, None, None]
    assert values(plan_match(ctx, "SELECT tolerance_match(a, b, NULL) AS ok FROM t"), "ok") == [None] * 3


def test_tolerance_match_wrong_arity(ctx):
    register(ctx, "t", a=[1.0])
    with pytest.raises(MatchError, match="tolerance_match takes 3 arguments, got 2"):
        plan_match(ctx, "SELECT tolerance_match(a, 1) FROM t")


def test_tolerance_match_keeps_the_equi_join(ctx):
    register(ctx, "l", k=[1, 2], amount=[100.0, 5.0])
    register(ctx, "r", k=[1, 2], amt=[100.01, 6.0])
    df = plan_match(ctx, "SELECT l.k, r.k AS rk FROM l JOIN r "
                         "ON l.k = r.k AND tolerance_match(l.amount, r.amt, 0.02)")
    plan = explain(df)
    join = next(line for line in plan.splitlines() if "Join" in line)
    assert ("HashJoinExec" in join or "SortMergeJoinExec" in join), plan
    assert "on=[(k@" in join and "filter=" in join, plan
    assert "NestedLoopJoinExec" not in plan and "CrossJoinExec" not in plan
    assert values(df, "rk") == [1]


def test_sort_merge_projection_bug_is_avoided(tmp_path):
    # apache/datafusion#24414: without Kalla's barrier column this returns no rows.
    ctx = make_context(memory_bytes=64 << 20, spill_dir=str(tmp_path), hash_join=False, partitions=2)
    df = plan_match(ctx, "SELECT t1.column2 AS left_b1, t2.column2 AS right_b1 "
                         "FROM (VALUES (100, 1, 0)) t1 JOIN (VALUES (10, 1)) t2 "
                         "ON t1.column2 = t2.column2 AND t1.column1 > t2.column1")
    assert df.to_pydict() == {"left_b1": [1], "right_b1": [1], BARRIER_COLUMN: [True]}


def make_pair(directory, n: int, seed: int = 3) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    amount = np.round(rng.uniform(1, 10_000, n), 2)
    perm = rng.permutation(n)
    paid = amount[perm] + np.where(rng.random(n) < 0.9, 0.0, 0.5)
    left, right = str(directory / "l.parquet"), str(directory / "r.parquet")
    pq.write_table(pa.table({"id": np.arange(n), "amount": amount}), left)
    pq.write_table(pa.table({"pid": np.arange(n), "ref": perm, "paid": paid}), right)
    expected = int((np.abs(amount[perm] - paid) <= 0.02).sum())
    return left, right, expected


def pair_job(left, right, out) -> dict:
    return {"match_sql": "SELECT l.id, r.pid FROM l JOIN r ON l.id = r.ref "
                         "AND tolerance_match(l.amount, r.paid, 0.02)",
            "sources": [{"alias": "l", "uri": left}, {"alias": "r", "uri": right}],
            "output_path": str(out), "primary_keys": {"l": ["id"], "r": ["pid"]}}


def test_match_streams_never_collects(tmp_path, settings, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the match result must be streamed, not collected")
    for name in ("collect", "to_arrow_table", "to_pandas", "to_pylist", "to_pydict", "to_polars"):
        monkeypatch.setattr(DataFrame, name, fail)
    left, right, expected = make_pair(tmp_path, 50_000)
    result = run_job(parse_job(pair_job(left, right, tmp_path / "out"), batch=True), settings)
    assert result["matched_count"] == expected
    assert result["unmatched_left_count"] == 50_000 - expected


@pytest.mark.slow
def test_2m_by_2m_spills_under_a_small_memory_limit(tmp_path, settings):
    left, right, expected = make_pair(tmp_path, 2_000_000)
    job = parse_job(pair_job(left, right, tmp_path / "out"), batch=True)
    small = settings.replace(worker_memory=100 << 20)       # DataFusion pool: 60 MB
    # The data does not fit the pool: the strategy is sort-merge, which spills, and the
    # job finishes within the limit (DataFusion fails the query if the pool is exceeded).
    result = run_job(job, small)
    assert json.load(open(result["summary_path"]))["join_strategy"] == "sort-merge (spilling)"
    assert result["matched_count"] == expected
    assert result["unmatched_left_count"] == 2_000_000 - expected
    assert result["unmatched_right_count"] == 2_000_000 - expected
