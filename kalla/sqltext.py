"""Small, careful text operations on match_sql: find function calls outside strings,
quoted identifiers and comments, and rewrite Kalla's functions to native expressions.

Rewriting (rather than a Python UDF) keeps a join on ``a.k = b.k AND
tolerance_match(...)`` an equi-join with a native residual filter, keeps decimals exact,
and leaves nothing a distributed engine could not run.
"""
from __future__ import annotations

import re
from typing import Callable

from .errors import MatchError

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
INTEGER_TYPES = "('Int8', 'Int16', 'Int32', 'Int64', 'UInt8', 'UInt16', 'UInt32', 'UInt64')"
FLOAT_TYPES = "('Float16', 'Float32', 'Float64')"


def _skip(sql: str, i: int) -> int:
    """If a string literal, quoted identifier or comment starts at i, return its end."""
    ch = sql[i]
    if ch in ("'", '"'):
        j = i + 1
        while j < len(sql):
            if sql[j] == ch:
                if j + 1 < len(sql) and sql[j + 1] == ch:   # '' or "" escapes the quote
                    j += 2
                    continue
                return j + 1
            j += 1
        raise MatchError(f"match_sql has an unterminated {ch}-quoted text starting at offset {i}")
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", i):
        end = sql.find("*/", i + 2)
        if end < 0:
            raise MatchError(f"match_sql has an unterminated /* comment starting at offset {i}")
        return end + 2
    return i


def code_positions(sql: str, start: int = 0):
    """Indexes of the characters of sql from start that are code: outside string literals,
    quoted identifiers and comments.

    >>> "".join("x" if i in set(code_positions("a 'b' c")) else "." for i in range(7))
    'xx...xx'
    """
    i = start
    while i < len(sql):
        j = _skip(sql, i)
        if j != i:
            i = j
            continue
        yield i
        i += 1


def _call_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """Split the arguments of a call whose '(' is at open_paren; return (args, end)."""
    depth, start, args = 0, open_paren + 1, []
    for i in code_positions(sql, open_paren):
        ch = sql[i]
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i].strip())
                return ([] if args == [""] else args), i + 1
        elif ch == "," and depth == 1:
            args.append(sql[start:i].strip())
            start = i + 1
    raise MatchError("match_sql has an unbalanced '(': a function call is not closed")


def rewrite_calls(sql: str, rewriters: dict[str, Callable[[list[str]], str]]) -> str:
    """Replace calls ``name(args)`` (name case-insensitive) using ``rewriters[name](args)``.

    >>> rewrite_calls("SELECT twice(a) FROM t WHERE b = 'twice(x)'",
    ...               {"twice": lambda a: f"({a[0]} * 2)"})
    "SELECT (a * 2) FROM t WHERE b = 'twice(x)'"
    """
    out, i, n = [], 0, len(sql)
    while i < n:
        j = _skip(sql, i)
        if j != i:
            out.append(sql[i:j])
            i = j
            continue
        m = _WORD.match(sql, i)
        if not m or (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] in "_.$")):
            out.append(sql[i])
            i += 1
            continue
        name, k = m.group(0).lower(), m.end()
        while k < n and sql[k].isspace():
            k += 1
        if name in rewriters and k < n and sql[k] == "(":
            args, end = _call_args(sql, k)
            args = [rewrite_calls(a, rewriters) for a in args]
            out.append(rewriters[name](args))
            i = end
        else:
            out.append(m.group(0))
            i = m.end()
    return "".join(out)


def _arity(name: str, args: list[str], count: int) -> None:
    if len(args) != count:
        raise MatchError(f"{name} takes {count} arguments, got {len(args)}: "
                         f"{name}({', '.join(args)})")


def tolerance_match(args: list[str]) -> str:
    """``tolerance_match(a, b, t)``: ``abs(a - b) <= t``, exact for decimals.

    On float inputs (checked per batch with arrow_typeof, which DataFusion evaluates once
    per batch, not per row) the threshold grows by ``1e-9 * max(1, |a|, |b|)`` so that
    binary rounding (100.01 - 100.00 = 0.010000000000005116) is no false negative.
    NULL in any argument gives NULL, i.e. no match.
    """
    _arity("tolerance_match", args, 3)
    a, b, t = (f"({x})" for x in args)
    slack = f"{_slack(a, b)} * CAST({_is_float(a, b)} AS DOUBLE)"
    return f"(abs({a} - {b}) <= {t} + {slack})"


def _is_float(a: str, b: str) -> str:
    return f"(arrow_typeof({a}) IN {FLOAT_TYPES} OR arrow_typeof({b}) IN {FLOAT_TYPES})"


def _slack(a: str, b: str) -> str:
    """Absorbs binary rounding of float inputs; never admits a real difference."""
    return f"1e-9 * greatest(1.0, abs(CAST({a} AS DOUBLE)), abs(CAST({b} AS DOUBLE)))"


def tolerance_pct(args: list[str]) -> str:
    """``tolerance_pct(a, b, pct)``: ``abs(a - b) <= pct * max(|a|, |b|)``, exact for decimals.

    pct is cast to DECIMAL(20, 10), so on decimal and integer inputs both sides are decimals
    and compare exactly (``0.29 * 100.00`` is 29, not the float 28.999999999999996). On
    float inputs the second branch adds the same relative slack as tolerance_match.
    """
    _arity("tolerance_pct", args, 3)
    a, b, p = (f"({x})" for x in args)
    bound = f"CAST({p} AS DECIMAL(20, 10)) * greatest(abs({a}), abs({b}))"
    exact = f"abs({a} - {b}) <= {bound}"
    inexact = (f"({_is_float(a, b)} AND abs(CAST({a} AS DOUBLE) - CAST({b} AS DOUBLE)) <= "
               f"CAST({p} AS DOUBLE) * greatest(abs(CAST({a} AS DOUBLE)), abs(CAST({b} AS DOUBLE)))"
               f" + {_slack(a, b)})")
    return f"(({exact}) OR {inexact})"


# Microseconds since the epoch as an integer: exact for dates and timestamps of any unit
# (nanoseconds truncate to microseconds), and, unlike nanoseconds, no overflow for the
# 9999-12-31 "open end" dates common in ledgers. Time zones compare as instants (UTC).
_MICROS = "CAST(arrow_cast({}, 'Timestamp(Microsecond, None)') AS BIGINT)"
MICROS_PER_DAY = 86_400_000_000


def date_within(args: list[str]) -> str:
    """``date_within(d1, d2, days)``: dates or timestamps at most ``days`` days apart."""
    _arity("date_within", args, 3)
    d1, d2, days = (f"({x})" for x in args)
    return (f"(abs({_MICROS.format(d1)} - {_MICROS.format(d2)}) <= "
            f"{days} * {MICROS_PER_DAY})")


# Unicode letters and decimal digits survive; Rust's regex (DataFusion's) knows \p{..}.
_NOT_ALNUM = r"[^\p{L}\p{Nd}]"


def normalize_ref(args: list[str]) -> str:
    """``normalize_ref(x)``: upper case, only letters and digits (``inv-00123 `` -> ``INV00123``)."""
    _arity("normalize_ref", args, 1)
    x = f"({args[0]})"
    # An integer's text holds only digits and a leading '-': trimming it is the same result
    # as the regular expression, at ~60 % of the cost (arrow_typeof is one value per batch).
    return (f"(CASE WHEN arrow_typeof({x}) IN {INTEGER_TYPES} THEN ltrim(CAST({x} AS VARCHAR), '-') "
            f"ELSE regexp_replace(upper(CAST({x} AS VARCHAR)), '{_NOT_ALNUM}', '', 'g') END)")


def jaro_winkler(args: list[str]) -> str:
    """``jaro_winkler(a, b)``: the vectorised function in kalla.functions, on text arguments."""
    _arity("jaro_winkler", args, 2)
    a, b = args
    return f"jaro_winkler(CAST(({a}) AS VARCHAR), CAST(({b}) AS VARCHAR))"


FUNCTIONS: dict[str, Callable[[list[str]], str]] = {
    "tolerance_match": tolerance_match, "tolerance_pct": tolerance_pct,
    "date_within": date_within, "normalize_ref": normalize_ref, "jaro_winkler": jaro_winkler}


def rewrite_functions(sql: str) -> str:
    return rewrite_calls(sql, FUNCTIONS)


def strip_statement_end(sql: str) -> str:
    """Drop one trailing ';' (and whitespace) so the query can be planned alone."""
    stripped = sql.rstrip()
    return stripped[:-1].rstrip() if stripped.endswith(";") else stripped
