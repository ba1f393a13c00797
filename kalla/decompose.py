"""Decompose a matching rule into its join keys and its conditions, for explained breaks.

A rule is decomposable when it has the shape

    SELECT ... FROM <source> [AS] a [INNER] JOIN <source> [AS] b ON <cond> [WHERE <cond>]

between the left and the right source (ORDER BY / LIMIT are ignored): DataFusion's plan
confirms one inner join and no aggregation, and the text gives each condition exactly as the
user wrote it. ``=`` conditions between one side and the other are the join keys; every other
condition is a check that a candidate sharing the keys can fail. Anything else (subqueries,
more joins, GROUP BY, UNION, no equality between the sides) is not decomposed: its breaks are
reported as ``unexplained`` rather than guessed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .sqltext import _call_args, code_positions

_KEYWORDS = ("select", "from", "join", "inner", "on", "where", "group", "having", "union",
             "order", "limit", "left", "right", "full", "cross", "outer", "natural", "using",
             "intersect", "except", "with", "as", "offset", "window", "qualify")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DELTA_FUNCTIONS = ("tolerance_match", "tolerance_pct", "date_within")


@dataclass(frozen=True)
class Condition:
    text: str             # as the user wrote it
    delta: str | None     # SQL for the signed difference, for numeric comparisons


@dataclass(frozen=True)
class Rule:
    tables: dict          # SQL alias -> source alias, e.g. {"l": "invoices", "r": "payments"}
    keys: tuple           # ((left-side expr, right-side expr), ...) keyed by SQL alias order
    conditions: tuple     # Condition, ...
    aliases: tuple        # (SQL alias of the left source, SQL alias of the right source)


class NotDecomposable(Exception):
    """The rule's shape is outside what explain can take apart; the message says why."""


def tokens(sql: str) -> list[tuple[int, int, str]]:
    """Top-level words (depth 0, outside strings and comments) as (start, end, lower word)."""
    out, depth = [], 0
    for i in code_positions(sql):
        ch = sql[i]
        depth += (ch == "(") - (ch == ")")
        m = _WORD.match(sql, i)
        # a word starts where the previous character cannot belong to a name
        if m and depth == 0 and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_.")):
            out.append((i, m.end(), m.group(0).lower()))
    return out


def split_and(cond: str) -> list[str]:
    """Split a condition on its top-level ANDs (the AND of BETWEEN x AND y stays)."""
    parts, start, pending_between = [], 0, False
    for s, e, word in tokens(cond):
        if word == "between":
            pending_between = True
        elif word == "and":
            if pending_between:
                pending_between = False
                continue
            parts.append(cond[start:s].strip())
            start = e
    parts.append(cond[start:].strip())
    return [_unwrap(p) for p in parts if p]


def _unwrap(text: str) -> str:
    """Drop parentheses around a whole condition: ``(a AND b)`` stays split-able."""
    while text.startswith("(") and _call_args(text, 0)[1] == len(text):
        inner = text[1:-1].strip()
        if len(split_and(inner)) > 1:
            return text       # keep a parenthesised conjunction as one condition
        text = inner
    return text


def _clauses(sql: str) -> dict[str, str]:
    words = tokens(sql)
    names = [w for _, _, w in words]
    for bad in ("group", "having", "union", "intersect", "except", "with", "left", "right",
                "full", "cross", "natural", "using", "window", "qualify"):
        if bad in names:
            raise NotDecomposable(f"the rule uses {bad.upper()}")
    if names.count("join") != 1 or names.count("from") != 1 or names.count("on") != 1:
        raise NotDecomposable("the rule is not one join of two sources")
    positions = {w: (s, e) for s, e, w in words if w in ("from", "join", "on", "where", "order", "limit")}
    cut = [positions[w][0] for w in ("where", "order", "limit") if w in positions] + [len(sql)]

    def between(a: str, b_list: list[str]) -> str:
        start = positions[a][1]
        end = min([positions[b][0] for b in b_list if b in positions] + [len(sql)])
        return sql[start:end].strip()

    return {"from": between("from", ["join"]), "join": between("join", ["on"]),
            "on": sql[positions["on"][1]:min(c for c in cut if c > positions["on"][0])].strip(),
            "where": between("where", ["order", "limit"]) if "where" in positions else ""}


def _table(text: str) -> tuple[str, str]:
    words = [w for w in re.split(r"\s+", text.strip()) if w and w.lower() not in ("as", "inner")]
    if not words or len(words) > 2 or not all(_WORD.fullmatch(w.strip('"')) for w in words):
        raise NotDecomposable(f"cannot read the table reference {text!r}")
    table = words[0].strip('"')
    return (words[1].strip('"') if len(words) == 2 else table), table


def _sides(expr: str, aliases: tuple[str, str]) -> set[str]:
    found = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_.])\"?([A-Za-z_][A-Za-z0-9_]*)\"?\.", _strip_strings(expr)):
        if m.group(1).lower() in aliases:
            found.add(m.group(1).lower())
    return found


def _strip_strings(sql: str) -> str:
    """sql with every string literal, quoted identifier and comment blanked out."""
    code = set(code_positions(sql))
    return "".join(ch if i in code else " " for i, ch in enumerate(sql))


def _equality(cond: str) -> tuple[str, str] | None:
    text = _strip_strings(cond)
    depth, hits = 0, []
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if ch == "=" and depth == 0 and text[i - 1:i] not in ("<", ">", "!", "=") and text[i + 1:i + 2] != "=":
            hits.append(i)
    if len(hits) != 1:
        return None
    return cond[:hits[0]].strip(), cond[hits[0] + 1:].strip()


def _delta(cond: str) -> str | None:
    m = _WORD.match(cond)
    if not m or m.group(0).lower() not in _DELTA_FUNCTIONS:
        return None
    rest = cond[m.end():].lstrip()
    if not rest.startswith("("):
        return None
    args, end = _call_args(rest, 0)
    if rest[end:].strip() or len(args) != 3:
        return None
    a, b = args[0], args[1]
    if m.group(0).lower() == "date_within":
        micros = "CAST(arrow_cast(({}), 'Timestamp(Microsecond, None)') AS BIGINT)"
        return f"CAST({micros.format(a)} - {micros.format(b)} AS DOUBLE) / 86400000000.0"
    return f"CAST(({a}) - ({b}) AS DOUBLE)"


def decompose(sql: str, left: str, right: str) -> Rule:
    """Take a rule apart, or raise NotDecomposable saying why."""
    clauses = _clauses(sql)
    first, second = _table(clauses["from"]), _table(clauses["join"])
    tables = {first[0].lower(): first[1], second[0].lower(): second[1]}
    by_source = {source.lower(): alias for alias, source in tables.items()}
    if set(by_source) != {left.lower(), right.lower()}:
        raise NotDecomposable("the rule does not join the left source with the right source")
    aliases = (by_source[left.lower()], by_source[right.lower()])
    keys, conditions = [], []
    for cond in split_and(clauses["on"]) + (split_and(clauses["where"]) if clauses["where"] else []):
        pair = _equality(cond)
        if pair:
            sides = [_sides(x, aliases) for x in pair]
            if sides == [{aliases[0]}, {aliases[1]}]:
                keys.append(pair)
                continue
            if sides == [{aliases[1]}, {aliases[0]}]:
                keys.append(pair[::-1])
                continue
        conditions.append(Condition(cond, _delta(cond)))
    if not keys:
        raise NotDecomposable("the rule has no equality between the left and the right source")
    return Rule(tables, tuple(keys), tuple(conditions), aliases)
