"""Kalla's function library: edge cases (NULLs, decimals, floats, dates, text) and plans.

Every function is checked through plan_match on a real DataFusion context, in both join
strategies, and in a join's ON clause the plan must stay an equi-join (no nested loop).
"""
from __future__ import annotations

import datetime as dt
import decimal
import random

import numpy as np
import pyarrow as pa
import pytest

from kalla import functions
from kalla.engine import explain, make_context, plan_match
from kalla.errors import MatchError
from kalla.functions import jaro_winkler, jaro_winkler_arrow, register_functions


@pytest.fixture(params=[True, False], ids=["hash", "sort-merge"])
def ctx(request, tmp_path):
    ctx = make_context(memory_bytes=128 << 20, spill_dir=str(tmp_path / "spill"),
                       hash_join=request.param)
    register_functions(ctx)
    return ctx


def register(ctx, name, **columns):
    ctx.register_record_batches(name, [[pa.record_batch(columns)]])


def evaluate(ctx, expression: str, **columns) -> list:
    """The expression over a one-table input, row by row, in input order."""
    n = len(next(iter(columns.values())))
    ctx.deregister_table("t")
    register(ctx, "t", i=pa.array(range(n), pa.int64()), **columns)
    return plan_match(ctx, f"SELECT i, {expression} AS v FROM t ORDER BY i").to_pydict()["v"]


def dec(*texts, scale=2):
    return pa.array([None if t is None else decimal.Decimal(t) for t in texts], pa.decimal128(14, scale))


def flt(*texts):
    return pa.array([None if t is None else float(t) for t in texts], pa.float64())


def assert_equi_join(df) -> None:
    plan = explain(df)
    join = next(line for line in plan.splitlines() if "Join" in line)
    assert "HashJoinExec" in join or "SortMergeJoinExec" in join, plan
    assert "on=[(" in join, plan
    assert "NestedLoopJoinExec" not in plan and "CrossJoinExec" not in plan, plan


# ------------------------------------------------------------------------- tolerance_pct

PCT_CASES = [  # (a, b, pct, expected) - the same truth for decimal and float columns
    ("100.00", "101.00", "0.01", True),      # 1.00 <= 0.01 * 101.00
    ("101.00", "100.00", "0.01", True),      # symmetric
    ("100.00", "101.03", "0.01", False),     # 1.03 > 0.01 * 101.03 = 1.0103
    ("100.00", "71.00", "0.29", True),       # 29.00 <= 0.29 * 100: exact, not 28.999999999999996
    ("0.00", "0.00", "0", True),             # equal zeros pass any pct
    ("0.00", "0.01", "0.5", False),          # 0.01 > 0.5 * 0.01
    ("-100.00", "-101.00", "0.01", True),    # magnitudes: max(|a|, |b|)
    ("-100.00", "100.00", "1", False),       # 200 > 1 * 100
    ("-100.00", "100.00", "2", True),        # 200 <= 2 * 100
    ("5.00", "5.00", "0", True),
    ("5.00", "5.01", "0", False),
]


@pytest.mark.parametrize("kind", ["decimal", "float64"])
def test_tolerance_pct_cases(ctx, kind):
    column = dec if kind == "decimal" else flt
    pct = ", ".join(str(c[2]) for c in PCT_CASES)
    got = evaluate(ctx, f"tolerance_pct(a, b, (make_array({pct}))[i + 1])",
                   a=column(*[c[0] for c in PCT_CASES]), b=column(*[c[1] for c in PCT_CASES]))
    assert got == [c[3] for c in PCT_CASES]


def test_tolerance_pct_integers_and_nulls(ctx):
    got = evaluate(ctx, "tolerance_pct(a, b, 0.01)", a=pa.array([100, None, 100, 100]),
                   b=pa.array([101, 100, None, 102]))
    assert got == [True, None, None, False]
    assert evaluate(ctx, "tolerance_pct(a, a, NULL)", a=pa.array([1.0])) == [None]


def test_tolerance_pct_float_binary_rounding_is_no_false_negative(ctx):
    # float: 0.29 * 100.0 = 28.999999999999996 < 29.0; the relative slack absorbs it
    assert evaluate(ctx, "tolerance_pct(a, b, 0.29)", a=flt("100.0"), b=flt("71.0")) == [True]
    # ... and never admits a real difference
    assert evaluate(ctx, "tolerance_pct(a, b, 0.29)", a=flt("100.0"), b=flt("70.99")) == [False]


def test_tolerance_pct_mixed_decimal_and_float(ctx):
    got = evaluate(ctx, "tolerance_pct(a, b, 0.01)", a=dec("100.00", "100.00"), b=flt("101.0", "101.5"))
    assert got == [True, False]


# ------------------------------------------------------------------------- date_within

def dates(*values):
    return pa.array([None if v is None else dt.date.fromisoformat(v) for v in values], pa.date32())


def stamps(*values, unit="us", tz=None):
    return pa.array([None if v is None else dt.datetime.fromisoformat(v) for v in values],
                    pa.timestamp(unit, tz))


def test_date_within_dates(ctx):
    got = evaluate(ctx, "date_within(a, b, 3)", a=dates("2024-01-01", "2024-01-05", "2024-01-01", None),
                   b=dates("2024-01-04", "2024-01-01", "2024-01-05", "2024-01-01"))
    assert got == [True, False, False, None]   # order of the arguments does not matter


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_date_within_timestamps_to_the_microsecond(ctx, unit):
    a = stamps("2024-01-01T00:00:00", "2024-01-01T00:00:00", "2024-03-30T12:00:00", unit=unit)
    b = stamps("2024-01-04T00:00:00", "2024-01-04T00:00:01", "2024-04-02T11:59:59", unit=unit)
    assert evaluate(ctx, "date_within(a, b, 3)", a=a, b=b) == [True, False, True]


def test_date_within_mixes_dates_timestamps_and_fractional_days(ctx):
    a = dates("2024-01-01", "2024-01-01")
    b = stamps("2024-01-02T12:00:00", "2024-01-02T12:00:01")
    assert evaluate(ctx, "date_within(a, b, 1.5)", a=a, b=b) == [True, False]
    assert evaluate(ctx, "date_within(a, b, 1)", a=a, b=b) == [False, False]


def test_date_within_time_zones_compare_instants(ctx):
    utc = stamps("2024-01-01T23:00:00+00:00", unit="us", tz="UTC")
    paris = stamps("2024-01-02T00:30:00+01:00", unit="us", tz="Europe/Paris")   # 23:30 UTC
    # 30 minutes apart as instants (0.0208 days), though 1 h 30 apart on the wall clock
    assert evaluate(ctx, "date_within(a, b, 0.021)", a=utc, b=paris) == [True]
    assert evaluate(ctx, "date_within(a, b, 0.02)", a=utc, b=paris) == [False]


def test_date_within_far_dates_and_nulls(ctx):
    got = evaluate(ctx, "date_within(a, b, 1)", a=dates("9999-12-31", "2024-01-01"),
                   b=dates("9999-12-30", "2024-01-01"))
    assert got == [True, True]
    assert evaluate(ctx, "date_within(a, a, NULL)", a=dates("2024-01-01")) == [None]
    assert evaluate(ctx, "date_within(a, a, -1)", a=dates("2024-01-01")) == [False]


def test_date_within_iso_text(ctx):
    got = evaluate(ctx, "date_within(a, b, 2)", a=pa.array(["2024-01-01", "2024-01-01T10:00:00"]),
                   b=pa.array(["2024-01-03", "2024-01-03T10:00:01"]))
    assert got == [True, False]


# ------------------------------------------------------------------------- normalize_ref

def test_normalize_ref(ctx):
    got = evaluate(ctx, "normalize_ref(a)",
                   a=pa.array(["inv-00123 ", "INV00123", " In v/001-23", "---", "", None, "Société n°5"]))
    assert got == ["INV00123", "INV00123", "INV00123", "", "", None, "SOCIÉTÉN5"]
    assert evaluate(ctx, "normalize_ref(a)", a=pa.array([123, None])) == ["123", None]
    # integers take a shortcut (no regular expression); it must agree with the general path
    for typ in (pa.int8(), pa.int32(), pa.int64(), pa.uint16(), pa.uint64()):
        values = [0, 7, 120, None] + ([-5, -128] if pa.types.is_signed_integer(typ) else [255])
        expected = [None if v is None else str(abs(v)) for v in values]
        assert evaluate(ctx, "normalize_ref(a)", a=pa.array(values, typ)) == expected
    assert evaluate(ctx, "normalize_ref(a)", a=pa.array([-9223372036854775808], pa.int64())) == \
        ["9223372036854775808"]
    assert evaluate(ctx, "normalize_ref(a) = normalize_ref(b)", a=pa.array([-12, 12]),
                    b=pa.array(["12", "1-2"])) == [True, True]
    assert evaluate(ctx, "normalize_ref(a) = normalize_ref('inv 00123')",
                    a=pa.array(["INV-00123"], pa.large_string())) == [True]


# ------------------------------------------------------------------------- jaro_winkler

def reference_jaro_winkler(s: str, t: str) -> float:
    """Textbook Jaro-Winkler, written independently of kalla.functions, for comparison."""
    if not s and not t:
        return 1.0
    if not s or not t:
        return 0.0
    window = max(max(len(s), len(t)) // 2 - 1, 0)
    used = [False] * len(t)
    s_matched = []
    for i, ch in enumerate(s):
        for j in range(max(0, i - window), min(len(t), i + window + 1)):
            if not used[j] and t[j] == ch:
                used[j] = True
                s_matched.append(ch)
                break
    m = len(s_matched)
    if m == 0:
        return 0.0
    t_matched = [t[j] for j in range(len(t)) if used[j]]
    transpositions = sum(a != b for a, b in zip(s_matched, t_matched)) // 2
    jaro = (m / len(s) + m / len(t) + (m - transpositions) / m) / 3
    prefix = 0
    for a, b in zip(s[:4], t[:4]):
        if a != b:
            break
        prefix += 1
    return jaro + prefix * 0.1 * (1 - jaro) if jaro > 0.7 else jaro


KNOWN = [("MARTHA", "MARHTA", 0.961111), ("DWAYNE", "DUANE", 0.84), ("DIXON", "DICKSONX", 0.813333),
         ("CRATE", "TRACE", 0.733333), ("abc", "abc", 1.0), ("abc", "ABC", 0.0), ("", "", 1.0),
         ("a", "", 0.0), ("ab", "ba", 0.0), ("Müller", "Mueller", 0.804286)]


def test_jaro_winkler_known_values():
    got = jaro_winkler(np.array([k[0] for k in KNOWN]), np.array([k[1] for k in KNOWN]))
    assert np.round(got, 6).tolist() == [k[2] for k in KNOWN]
    assert [round(reference_jaro_winkler(a, b), 6) for a, b, _ in KNOWN] == [k[2] for k in KNOWN]


def test_jaro_winkler_agrees_with_the_reference_on_random_text(monkeypatch):
    rng = random.Random(8)
    alphabet = "abcdeé "
    pairs = [("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))),
              "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))) for _ in range(3000)]
    pairs += [("x" * 300, "x" * 299 + "y")]          # long strings go through their own chunks
    monkeypatch.setattr(functions, "CHUNK_CELLS", 2000)
    got = jaro_winkler_arrow(pa.array([a for a, _ in pairs]), pa.array([b for _, b in pairs]))
    expected = [reference_jaro_winkler(a, b) for a, b in pairs]
    assert np.allclose(got.to_numpy(zero_copy_only=False), expected, rtol=0, atol=1e-12)


def test_jaro_winkler_in_sql(ctx):
    got = evaluate(ctx, "round(jaro_winkler(a, b), 4)", a=pa.array(["MARTHA", None, "x", "12"]),
                   b=pa.array(["MARHTA", "x", None, "12"], pa.large_string()))
    assert got == [0.9611, None, None, 1.0]
    assert evaluate(ctx, "jaro_winkler(a, a)", a=pa.array([42])) == [1.0]
    assert evaluate(ctx, "levenshtein(a, 'MARHTA')", a=pa.array(["MARTHA"])) == [2]


# ------------------------------------------------------------------------- plans and arity

JOIN_USES = [
    "ON l.k = r.k AND tolerance_pct(l.amount, r.amount, 0.01)",
    "ON l.k = r.k AND date_within(l.day, r.day, 3)",
    "ON normalize_ref(l.ref) = normalize_ref(r.ref)",
    "ON l.k = r.k AND jaro_winkler(l.who, r.who) >= 0.9",
    "ON l.k = r.k WHERE tolerance_pct(l.amount, r.amount, 0.01) AND date_within(l.day, r.day, 3)",
]


@pytest.mark.parametrize("condition", JOIN_USES)
def test_functions_keep_the_equi_join(ctx, condition):
    register(ctx, "l", k=[1, 2], amount=dec("100.00", "5.00"), day=dates("2024-01-01", "2024-01-01"),
             ref=["inv-1", "inv-2"], who=["MARTHA", "JONES"])
    register(ctx, "r", k=[1, 2], amount=dec("100.50", "6.00"), day=dates("2024-01-03", "2024-01-09"),
             ref=["INV 1", "INV9"], who=["MARHTA", "SMITH"])
    df = plan_match(ctx, f"SELECT l.k, r.k AS rk FROM l JOIN r {condition}")
    assert_equi_join(df)
    assert df.to_pydict()["rk"] == [1]


@pytest.mark.parametrize("call,message", [
    ("tolerance_pct(a, b)", "tolerance_pct takes 3 arguments, got 2"),
    ("date_within(a, b)", "date_within takes 3 arguments, got 2"),
    ("normalize_ref(a, b)", "normalize_ref takes 1 arguments, got 2"),
    ("jaro_winkler(a)", "jaro_winkler takes 2 arguments, got 1"),
])
def test_wrong_arity_is_refused(ctx, call, message):
    register(ctx, "t", a=[1.0], b=[2.0])
    with pytest.raises(MatchError, match=message):
        plan_match(ctx, f"SELECT {call} FROM t")


def test_names_in_strings_and_comments_are_left_alone(ctx):
    register(ctx, "t", a=["x"])
    got = plan_match(ctx, "SELECT 'normalize_ref(a)' AS v /* jaro_winkler(a) */ FROM t").to_pydict()
    assert got["v"] == ["normalize_ref(a)"]
