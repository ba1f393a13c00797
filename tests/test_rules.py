"""Multi-pass rules, one-to-one passes and expect thresholds, end to end.

The generated job's expected per-rule counts come from a plain-Python model of the
semantics (ordered passes over sets of record ids), not from Kalla.
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from datafusion import DataFrame

from casefiles import assert_output_rows, load_case
from support import KALLA_RUN

from kalla.engine import make_context
from kalla.errors import InvalidInput, MatchError
from kalla.jobs import parse_job, recipe_to_job
from kalla.pipeline import run_job

AMOUNT = pa.decimal128(12, 2)


def kalla_run(*args, env, cwd=None):
    return subprocess.run([KALLA_RUN, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


# ------------------------------------------------------------------ generated three-pass job

def normalise(ref: str) -> str:
    return re.sub(r"[^0-9A-Za-z]", "", ref).upper()


def generate(directory, n: int, seed: int = 8) -> tuple[str, str, list, list]:
    """Invoices and payments with every kind of pair the three rules tell apart."""
    rng = random.Random(seed)
    invoices = [(f"INV-{i:05d}", rng.randint(1_000, 900_000)) for i in range(n)]
    payments = []
    for ref, cents in invoices:
        kind = rng.random()
        messy = rng.choice([ref.lower(), ref.replace("-", " "), f" {ref.lower()}-"])
        if kind < 0.4:
            payments.append((ref, cents))                                  # exact
        elif kind < 0.55:
            payments.append((ref, cents + rng.choice([-5, -3, 2, 4, 9])))   # near (9: too far)
        elif kind < 0.7:
            payments.append((messy, cents + rng.choice([0, 3, -4])))       # messy reference
        elif kind < 0.78:
            payments += [(ref, cents + 1), (ref, cents - 2)]                # two near: ambiguous
        elif kind < 0.83:
            payments += [(ref, cents), (messy, cents + 1)]                  # exact plus a messy one
    payments += [(f"ORPHAN-{i}", rng.randint(1_000, 900_000)) for i in range(n // 10)]
    rng.shuffle(payments)
    payments = [(f"P{i:06d}", ref, cents) for i, (ref, cents) in enumerate(payments)]
    inv_path, pay_path = str(directory / "invoices.parquet"), str(directory / "payments.parquet")
    # small row groups: the passes' leftovers are cut from many row groups
    pq.write_table(pa.table({"invoice_id": [i for i, _ in invoices],
                             "amount": pa.array([Decimal(c) / 100 for _, c in invoices], AMOUNT)}),
                   inv_path, row_group_size=700)
    pq.write_table(pa.table({"payment_id": [p for p, _, _ in payments],
                             "reference": [r for _, r, _ in payments],
                             "paid": pa.array([Decimal(c) / 100 for _, _, c in payments], AMOUNT)}),
                   pay_path, row_group_size=900)
    return inv_path, pay_path, invoices, payments


THREE_RULES = [
    {"name": "exact", "match_sql": "SELECT i.invoice_id, p.payment_id FROM invoices i JOIN payments p "
                                   "ON i.invoice_id = p.reference AND i.amount = p.paid"},
    {"name": "tolerance", "one_to_one": True,
     "match_sql": "SELECT i.invoice_id, p.payment_id, p.paid - i.amount AS difference FROM invoices i "
                  "JOIN payments p ON i.invoice_id = p.reference AND tolerance_match(i.amount, p.paid, 0.05)"},
    {"name": "reference", "match_sql": "SELECT i.invoice_id, p.payment_id FROM invoices i JOIN payments p "
                                       "ON normalize_ref(i.invoice_id) = normalize_ref(p.reference) "
                                       "AND tolerance_match(i.amount, p.paid, 0.05)"},
]


def model(invoices, payments) -> dict:
    """The semantics of THREE_RULES, written plainly: ordered passes over unused records."""
    conditions = [lambda i, p: i[0] == p[1] and i[1] == p[2],
                  lambda i, p: i[0] == p[1] and abs(i[1] - p[2]) <= 5,
                  lambda i, p: normalise(i[0]) == normalise(p[1]) and abs(i[1] - p[2]) <= 5]
    by_norm = defaultdict(list)
    for p in payments:
        by_norm[normalise(p[1])].append(p)
    left, right = {i[0] for i in invoices}, {p[0] for p in payments}
    counts, ambiguous = {}, {}
    for rule, condition in zip(THREE_RULES, conditions):
        pairs = [(i[0], p[0]) for i in invoices if i[0] in left
                 for p in by_norm[normalise(i[0])] if p[0] in right and condition(i, p)]
        if rule.get("one_to_one"):
            lc, rc = Counter(l for l, _ in pairs), Counter(r for _, r in pairs)
            kept = [(l, r) for l, r in pairs if lc[l] == 1 and rc[r] == 1]
            ambiguous[rule["name"]] = len(pairs) - len(kept)
            pairs = kept
        counts[rule["name"]] = len(pairs)
        left -= {l for l, _ in pairs}
        right -= {r for _, r in pairs}
    return {"rule_counts": counts, "ambiguous": ambiguous, "unmatched_left": len(left),
            "unmatched_right": len(right)}


def rules_job(inv, pay, out, rules=THREE_RULES, **extra) -> dict:
    return {"rules": copy.deepcopy(rules), "output_path": str(out),
            "sources": [{"alias": "invoices", "uri": inv}, {"alias": "payments", "uri": pay}],
            "primary_keys": {"invoices": ["invoice_id"], "payments": ["payment_id"]}, **extra}


@pytest.mark.parametrize("strategy", ["hash", "sort-merge"])
def test_three_pass_counts_match_an_independent_model(tmp_path, settings, strategy):
    inv, pay, invoices, payments = generate(tmp_path, 4000)
    expected = model(invoices, payments)
    assert all(expected["rule_counts"].values()) and expected["ambiguous"]["tolerance"]
    events = []
    result = run_job(parse_job(rules_job(inv, pay, tmp_path / "out"), batch=True),
                     settings.replace(join_strategy=strategy), events.append)
    assert result["rule_counts"] == expected["rule_counts"]
    assert result["rule_counts"] == expected["rule_counts"]
    assert result["ambiguous"] == expected["ambiguous"]
    assert result["matched_count"] == sum(expected["rule_counts"].values())
    assert result["unmatched_left_count"] == expected["unmatched_left"]
    assert result["unmatched_right_count"] == expected["unmatched_right"]
    matched = pq.read_table(result["output_paths"]["matched"])
    # every record is matched by one rule at most (a rule that is not one_to_one may pair
    # it more than once), and match_rule says which
    for key in ("invoice_id", "payment_id"):
        rules_of = defaultdict(set)
        for row in matched.select([key, "match_rule"]).to_pylist():
            rules_of[row[key]].add(row["match_rule"])
        assert max(len(r) for r in rules_of.values()) == 1
    one_to_one = matched.filter(pc.equal(matched["match_rule"], "tolerance"))
    assert len(one_to_one["invoice_id"].unique()) == one_to_one.num_rows
    assert dict(Counter(matched.column("match_rule").to_pylist())) == expected["rule_counts"]
    # progress says which rule runs; the last event is the reference's plain one
    assert {e["rule"] for e in events if "rule" in e} == {r["name"] for r in THREE_RULES}
    assert events[-1] == {"stage": "matching", "run_id": result["run_id"], "progress": 1.0,
                          "matched_count": result["matched_count"]}
    assert [e["progress"] for e in events if e["stage"] == "matching"] == \
        sorted(e["progress"] for e in events if e["stage"] == "matching")


def test_union_by_column_name(tmp_path, settings):
    inv, pay, _, _ = generate(tmp_path, 300)
    result = run_job(parse_job(rules_job(inv, pay, tmp_path / "out"), batch=True), settings)
    table = pq.read_table(result["output_paths"]["matched"])
    assert table.schema.names == ["invoice_id", "payment_id", "difference", "match_rule"]
    assert table.schema.field("difference").type == pa.decimal128(13, 2)
    rows = table.to_pylist()
    assert all((r["difference"] is None) == (r["match_rule"] != "tolerance") for r in rows)
    assert [r["match_rule"] for r in rows] == sorted((r["match_rule"] for r in rows),
                                                     key=["exact", "tolerance", "reference"].index)


def test_rules_stream_and_never_collect(tmp_path, settings, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a pass must be streamed, not collected")
    for name in ("collect", "to_arrow_table", "to_pandas", "to_pylist", "to_pydict", "to_polars"):
        monkeypatch.setattr(DataFrame, name, fail)
    inv, pay, invoices, payments = generate(tmp_path, 1000)
    result = run_job(parse_job(rules_job(inv, pay, tmp_path / "out"), batch=True), settings)
    assert result["rule_counts"] == model(invoices, payments)["rule_counts"]


def test_later_rules_may_name_keys_differently(tmp_path, settings):
    inv, pay, invoices, payments = generate(tmp_path, 500)
    rules = copy.deepcopy(THREE_RULES)
    rules[2]["match_sql"] = rules[2]["match_sql"].replace(
        "SELECT i.invoice_id, p.payment_id",
        "SELECT i.invoice_id AS invoices__invoice_id, p.payment_id AS \"payments.payment_id\"")
    result = run_job(parse_job(rules_job(inv, pay, tmp_path / "out", rules), batch=True), settings)
    expected = model(invoices, payments)
    assert result["rule_counts"] == expected["rule_counts"]
    assert result["unmatched_left_count"] == expected["unmatched_left"]
    names = pq.read_schema(result["output_paths"]["matched"]).names
    assert "invoices__invoice_id" not in names and "payments.payment_id" not in names


def test_a_pass_over_nothing_left(tmp_path, settings):
    inv, pay, _, _ = generate(tmp_path, 50)
    everything = {"name": "everything", "match_sql": "SELECT i.invoice_id, p.payment_id FROM invoices i "
                                                     "CROSS JOIN payments p"}
    job = rules_job(inv, pay, tmp_path / "out", [everything, THREE_RULES[0]])
    result = run_job(parse_job(job, batch=True), settings)
    assert result["rule_counts"]["exact"] == 0
    assert result["unmatched_left_count"] == result["unmatched_right_count"] == 0


@pytest.mark.parametrize("sql,message", [
    ("SELECT i.invoice_id, p.payment_id, 'x' AS match_rule FROM invoices i JOIN payments p "
     "ON i.invoice_id = p.reference", "returns a column named 'match_rule'"),
    ("SELECT i.invoice_id AS invoices__invoice_id, p.reference AS invoice_id, p.payment_id "
     "FROM invoices i JOIN payments p ON i.invoice_id = p.reference", "returns a column 'invoice_id'"),
    ("SELECT i.invoice_id, p.payment_id, p.reference AS difference FROM invoices i JOIN payments p "
     "ON i.invoice_id = p.reference", "column 'difference' is decimal128(13, 2)"),
    ("SELECT i.invoice_id FROM invoices i", "rules[3] ('extra'): match_sql output has no column for "
                                            "source 'payments' key column 'payment_id'"),
])
def test_rules_that_cannot_share_matched_parquet_fail_before_running(tmp_path, settings, sql, message):
    inv, pay, _, _ = generate(tmp_path, 50)
    job = rules_job(inv, pay, tmp_path / "out", [*THREE_RULES, {"name": "extra", "match_sql": sql}])
    events = []
    with pytest.raises(MatchError, match=re.escape(message)):
        run_job(parse_job(job, batch=True), settings, events.append)
    assert not [e for e in events if "rule" in e]         # no rule ran
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_refused_rule_writes_nothing(tmp_path, settings):
    case, _ = load_case("rules_refused_rule", tmp_path)
    with pytest.raises(MatchError):
        run_job(parse_job(case, batch=True), settings)
    assert not os.path.exists("/tmp/kalla-rules-leak.csv")


def test_one_to_one_ignores_null_keys_and_counts_composite_keys(tmp_path, settings):
    # left keys (region, no); right key id. ("eu", 1) pairs with r1 and r2: ambiguous.
    # r0 has no id: its two pairs are not ambiguous on its side, and it stays unmatched.
    (tmp_path / "l.csv").write_text("region,no,amount\neu,1,10\neu,2,20\nus,1,30\nus,2,40\n")
    (tmp_path / "r.csv").write_text("id,region,no,amount\n,us,1,30\n,us,2,40\n1,eu,1,10\n2,eu,1,10\n3,eu,2,20\n")
    rule = {"name": "pairs", "one_to_one": True,
            "match_sql": "SELECT l.region AS l__region, l.no AS l__no, r.id AS r__id FROM l JOIN r "
                         "ON l.region = r.region AND l.no = r.no AND l.amount = r.amount"}
    job = {"rules": [rule], "output_path": str(tmp_path / "out"),
           "sources": [{"alias": "l", "uri": str(tmp_path / "l.csv")}, {"alias": "r", "uri": str(tmp_path / "r.csv")}],
           "primary_keys": {"l": ["region", "no"], "r": ["id"]}}
    result = run_job(parse_job(job, batch=True), settings)
    assert result["rule_counts"] == {"pairs": 3} and result["ambiguous"] == {"pairs": 2}
    pairs = pq.read_table(result["output_paths"]["matched"]).to_pylist()
    assert sorted((p["l__region"], p["l__no"], p["r__id"]) for p in pairs) == \
        [("eu", 2, 3), ("us", 1, None), ("us", 2, None)]
    assert result["unmatched_left_count"] == 1          # ("eu", 1): its pairs were held back
    assert result["unmatched_right_count"] == 4         # r1, r2 held back; two NULL ids


@pytest.mark.parametrize("cut", [20, 50])   # 50: the first pass takes most, its leftovers are copied
def test_rules_unmatched_keep_every_source_type_and_null_keys(tmp_path, settings, cut):
    """The unmatched files of a rules job come from the passes' leftovers (views or copies,
    kalla.passes.narrow): the source's exact schema, every leftover row once, NULL-key rows
    kept and counted."""
    n = 60
    left = pa.table({
        "id": pa.array([None if i % 17 == 5 else i for i in range(n)], pa.int32()),
        "name": pa.array([f"n{i}" for i in range(n)], pa.string()),
        "note": pa.array([f"long {i}" for i in range(n)], pa.large_string()),
        "day": pa.array([19000 + i for i in range(n)], pa.date32()),
        "at": pa.array([1_700_000_000_000_000 + i for i in range(n)], pa.timestamp("us", tz="UTC")),
        "clock": pa.array([i * 1_000_000 for i in range(n)], pa.time64("us")),
        "amount": pa.array([Decimal(i) / 4 for i in range(n)], pa.decimal128(9, 2)),
        "flag": pa.array([i % 2 == 0 for i in range(n)], pa.bool_()),
        "ratio": pa.array([i / 7 for i in range(n)], pa.float32()),
        "blob": pa.array([bytes([i]) for i in range(n)], pa.binary()),
    })
    right = pa.table({"rid": pa.array(range(n), pa.int64()), "ref": pa.array(range(n), pa.int64())})
    pq.write_table(left, tmp_path / "l.parquet")
    pq.write_table(right, tmp_path / "r.parquet")
    rules = [{"name": "low", "match_sql": f"SELECT l.id, r.rid FROM l JOIN r ON l.id = r.ref WHERE l.id < {cut}"},
             {"name": "even", "match_sql": "SELECT l.id, r.rid FROM l JOIN r ON l.id = r.ref WHERE l.id % 2 = 0"}]
    job = {"rules": rules, "output_path": str(tmp_path / "out"),
           "sources": [{"alias": "l", "uri": str(tmp_path / "l.parquet")},
                       {"alias": "r", "uri": str(tmp_path / "r.parquet")}],
           "primary_keys": {"l": ["id"], "r": ["rid"]}}
    result = run_job(parse_job(job, batch=True), settings)
    ids = [None if i % 17 == 5 else i for i in range(n)]
    taken = {i for i in ids if i is not None and (i < cut or i % 2 == 0)}
    low = sum(1 for i in ids if i is not None and i < cut)
    assert result["rule_counts"] == {"low": low, "even": len(taken) - low}
    unmatched = pq.read_table(result["output_paths"]["unmatched_left"])
    assert unmatched.schema == left.schema
    expected = [row for row in left.to_pylist() if row["id"] not in taken]
    assert sorted(unmatched.to_pylist(), key=lambda r: r["name"]) == sorted(expected, key=lambda r: r["name"])
    assert result["unmatched_left_count"] == len(expected)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["null_key_rows"] == {"l": 4, "r": 0}
    right_left = pq.read_table(result["output_paths"]["unmatched_right"])
    assert right_left.schema == right.schema
    assert sorted(right_left.column("rid").to_pylist()) == sorted(set(range(n)) - taken)


# ------------------------------------------------------------------ plain jobs are unchanged

def test_plain_match_sql_job_is_exactly_as_before(tmp_path, settings):
    job, _ = load_case("one_to_one_tolerance", tmp_path, "parquet")
    events = []
    result = run_job(parse_job(job, batch=True), settings, events.append)
    assert pq.read_schema(result["output_paths"]["matched"]) == pa.schema(
        [pa.field("invoice_id", pa.string()), pa.field("payment_id", pa.string())])
    summary = json.load(open(os.path.join(job["output_path"], "summary.json")))
    for body in (result, summary):
        assert not {"rule_counts", "ambiguous", "passed", "failed_checks", "checks"} & set(body)
    assert set(result) == {"run_id", "matched_count", "unmatched_left_count", "unmatched_right_count",
                           "output_paths", "summary_path", "source_rows", "stage_seconds"}
    assert not [e for e in events if "rule" in e]
    assert [set(e) for e in events if e["stage"] == "matching"] == \
        [{"stage", "run_id", "progress", "matched_count"}] * len([e for e in events if e["stage"] == "matching"])
    # the job's dict form (what the service journals) has no new fields either
    assert set(parse_job(job, batch=True).to_dict()) == {"run_id", "callback_url", "match_sql", "sources",
                                                          "output_path", "primary_keys"}


# ------------------------------------------------------------------ validation

BASE = {"output_path": "/tmp/kalla-never", "primary_keys": {"l": ["id"], "r": ["id"]},
        "sources": [{"alias": "l", "uri": "postgres://h/db?table=l"},
                    {"alias": "r", "uri": "postgres://h/db?table=r"}]}
RULE = {"name": "exact", "match_sql": "SELECT l.id AS l__id, r.id AS r__id FROM l JOIN r ON l.id = r.id"}

INVALID = [
    ({"match_sql": "SELECT 1", "rules": [RULE]}, "rules", "give either match_sql or rules, not both"),
    ({}, "match_sql", "is required"),
    ({"rules": "SELECT 1"}, "rules", "must be an array of rules, got a string"),
    ({"rules": []}, "rules", "must hold at least one rule"),
    ({"rules": [RULE] * 33}, "rules", "at most 32"),
    ({"rules": [RULE, RULE]}, "rules[1].name", "'exact' is already the name of rules[0]"),
    ({"rules": [{**RULE, "name": " "}]}, "rules[0].name", "must not be empty"),
    ({"rules": [{**RULE, "name": "x\n"}]}, "rules[0].name", "printable"),
    ({"rules": [{"name": "a"}]}, "rules[0].match_sql", "is required"),
    ({"rules": [{**RULE, "one_to_1": True}]}, "rules[0].one_to_1", "is not a rule field"),
    ({"rules": [{**RULE, "one_to_one": "yes"}]}, "rules[0].one_to_one", "must be a boolean"),
    ({"rules": ["SELECT 1"]}, "rules[0]", "must be an object"),
    ({"match_sql": "SELECT 1", "expect": [0.9]}, "expect", "must be an object"),
    ({"match_sql": "SELECT 1", "expect": {"min_rate": 0.9}}, "expect.min_rate", "unknown check; use one of"),
    ({"match_sql": "SELECT 1", "expect": {"min_match_rate": 95}}, "expect.min_match_rate", "between 0 and 1"),
    ({"match_sql": "SELECT 1", "expect": {"min_match_rate": "0.9"}}, "expect.min_match_rate", "must be a number"),
    ({"match_sql": "SELECT 1", "expect": {"max_unmatched_left": -1}}, "expect.max_unmatched_left", "whole number"),
    ({"match_sql": "SELECT 1", "expect": {"max_unmatched_left": 1.5}}, "expect.max_unmatched_left", "whole number"),
    ({"match_sql": "SELECT 1", "expect": {"min_matched": True}}, "expect.min_matched", "must be a number"),
]


@pytest.mark.parametrize("fields,field,problem", INVALID, ids=[i[1] + ":" + i[2] for i in INVALID])
def test_invalid_rules_and_expect_name_the_field(fields, field, problem):
    with pytest.raises(InvalidInput) as info:
        parse_job({**BASE, **fields}, batch=True)
    assert info.value.field == field and info.value.status == 400
    assert problem in str(info.value)


def test_rules_and_expect_round_trip():
    job = {**BASE, "rules": [RULE, {**RULE, "name": "again", "one_to_one": True}],
           "expect": {"min_match_rate": 0.95, "max_unmatched_left": 100}}
    spec = parse_job(job, batch=True)
    assert [r.name for r in spec.rules] == ["exact", "again"] and spec.rules[1].one_to_one
    assert spec.match_sql == RULE["match_sql"]        # what staging checks up front
    data = spec.to_dict()
    assert "match_sql" not in data and data["expect"] == job["expect"]
    assert parse_job(data, batch=True) == spec


def test_recipe_may_carry_rules_and_expect(tmp_path):
    recipe = {"recipe_id": "r", "name": "n", "description": "d", "match_description": "m",
              "rules": [RULE], "expect": {"min_matched": 1},
              "sources": {"left": {"alias": "l", "type": "postgres", "uri": "postgres://h/db?table=l",
                                   "primary_key": ["id"]},
                          "right": {"alias": "r", "type": "postgres", "uri": "postgres://h/db?table=r",
                                    "primary_key": ["id"]}}}
    spec = recipe_to_job(recipe, {}, str(tmp_path / "out"))
    assert spec.rules[0].name == "exact" and spec.expect == {"min_matched": 1}
    with pytest.raises(InvalidInput, match="rules: give either match_sql or rules"):
        recipe_to_job({**recipe, "match_sql": "SELECT 1"}, {}, None)
    del recipe["rules"]
    with pytest.raises(InvalidInput, match="match_sql: is required"):
        recipe_to_job(recipe, {}, None)


# ------------------------------------------------------------------ expectations through the CLI

def write(tmp_path, job, name):
    path = tmp_path / name
    path.write_text(json.dumps(job))
    return path


def test_expectations_pass_and_fail_through_the_cli(tmp_path, cli_env):
    job, _ = load_case("rules_expect_failed", tmp_path)
    failing = write(tmp_path, job, "failing.json")
    proc = kalla_run("--json", failing, env=cli_env)
    assert proc.returncode == 3, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "completed" and result["passed"] is False
    assert [c["check"] for c in result["failed_checks"]] == ["min_match_rate", "max_unmatched_left"]
    assert result["failed_checks"][0] == {"check": "min_match_rate", "expected": 0.5,
                                          "actual": round(4 / 13, 6), "passed": False}
    assert "failed its expectations: min_match_rate, max_unmatched_left" in proc.stderr
    assert os.path.exists(os.path.join(job["output_path"], "matched.parquet"))   # outputs published

    proc = kalla_run(failing, env=cli_env)            # the human summary names the failures
    assert proc.returncode == 3
    assert "expectations     FAILED" in proc.stdout and "min_match_rate: actual 0.307692" in proc.stdout

    job["expect"] = {"min_match_rate": 0.3, "max_unmatched_left": 4}
    job["output_path"] += "-2"
    proc = kalla_run("--json", write(tmp_path, job, "passing.json"), env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["passed"] is True and json.loads(proc.stdout)["failed_checks"] == []


def test_exit_status_severity_across_files(tmp_path, cli_env):
    failing, _ = load_case("rules_expect_failed", tmp_path)
    ok, _ = load_case("rules_three_pass", tmp_path)
    broken, _ = load_case("rules_refused_rule", tmp_path)
    bad = {**ok, "expect": {"nope": 1}, "output_path": ok["output_path"] + "-bad"}
    files = {name: write(tmp_path, job, f"{name}.json")
             for name, job in (("failing", failing), ("ok", ok), ("broken", broken), ("bad", bad))}
    assert kalla_run(files["ok"], env=cli_env).returncode == 0
    assert kalla_run(files["ok"], files["failing"], env=cli_env).returncode == 3
    assert kalla_run(files["failing"], files["broken"], env=cli_env).returncode == 1
    proc = kalla_run(files["failing"], files["bad"], env=cli_env)
    assert proc.returncode == 2 and "expect.nope: unknown check" in proc.stderr


# ------------------------------------------------------------------ the cookbook's examples

COOKBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cookbook")
EXAMPLES = sorted(d for d in os.listdir(COOKBOOK) if os.path.isdir(os.path.join(COOKBOOK, d)))


def engine_registers_functions(tmp_path) -> bool:
    """True once engine.make_context registers Kalla's UDFs (jaro_winkler) itself, so the
    staging checks can plan a job that uses them."""
    ctx = make_context(memory_bytes=16 << 20, spill_dir=str(tmp_path / "probe"))
    try:
        ctx.sql("SELECT jaro_winkler('a', 'b')")
        return True
    except Exception:   # DataFusion: "Invalid function 'jaro_winkler'"
        return False


@pytest.mark.parametrize("name", EXAMPLES)
def test_cookbook_example_runs(name, tmp_path, cli_env):
    if "jaro_winkler" in open(os.path.join(COOKBOOK, name, "job.json")).read() \
            and not engine_registers_functions(tmp_path):
        pytest.skip("needs engine.make_context to call kalla.functions.register_functions")
    folder = tmp_path / name
    shutil.copytree(os.path.join(COOKBOOK, name), folder)
    job = json.loads((folder / "job.json").read_text())
    expected = json.loads((folder / "expected.json").read_text())
    proc = kalla_run("--json", "job.json", env=cli_env, cwd=folder)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert_output_rows(result["output_paths"], expected, job)
    for field in ("rule_counts", "ambiguous", "passed"):
        assert result.get(field) == expected.get(field)
