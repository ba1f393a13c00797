"""Explained breaks: why did each unmatched record not match?

For each unmatched record of a side, with the rule decomposed (kalla.decompose):

* ``null_key``     - the record's primary key has a NULL: it can never be identified;
* ``no_candidate`` - no record on the other side shares its join-key values;
* ``rule_failed``  - candidates share the keys, but a condition failed; the *closest*
  candidate is the one with the fewest failed conditions, then the smallest absolute
  delta, then the smallest primary key (so the choice is deterministic);
* ``ambiguous``    - the closest candidate passes every condition, but a one-to-one rule
  held the pair back because one of them paired more than once;
* ``unexplained``  - the rule could not be decomposed (the summary says why).

Columns added: ``_kalla_reason``, ``_kalla_failed`` (the failed conditions as written, joined
with `` AND ``), ``_kalla_candidate`` (the closest candidate's primary key as text:
``value`` or ``col=value, col=value`` for composite keys), ``_kalla_delta`` (the signed
difference ``a - b`` of the first tolerance_match / tolerance_pct / date_within condition
against that candidate; days for date_within), and ``_kalla_rule`` (the rule explained
against). Everything runs as DataFusion SQL over the staged files: nothing is collected.
"""
from __future__ import annotations

import os
from typing import Sequence

import pyarrow.compute as pc

from .decompose import NotDecomposable, Rule, decompose
from .engine import make_context, read_only_options, register_parquet
from .outputs import BackgroundWriter, row_group_bytes
from .sqltext import rewrite_functions

REASONS = ("null_key", "no_candidate", "rule_failed", "ambiguous", "unexplained")
COLUMNS = ("_kalla_reason", "_kalla_failed", "_kalla_candidate", "_kalla_delta", "_kalla_rule")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _candidate_sql(rule: Rule, side: int, name: str, keys, other_keys, one_to_one: bool) -> str:
    """Best candidate per unmatched key of `side` (0 = left, 1 = right) under one rule."""
    me, other = rule.aliases[side], rule.aliases[1 - side]
    # The unmatched file holds the full rows of this side: candidates are looked up for
    # exactly those rows, with no second scan of the source.
    other_table = rule.tables[other]
    on = " AND ".join(f"{pair[side]} = {pair[1 - side]}" for pair in rule.keys)
    checks = [f"COALESCE({rewrite_functions(c.text)}, false)" for c in rule.conditions]
    failed_n = " + ".join(f"CASE WHEN {c} THEN 0 ELSE 1 END" for c in checks) or "0"
    failed = ", ".join(f"CASE WHEN {c} THEN NULL ELSE {_quote(cond.text)} END"
                       for c, cond in zip(checks, rule.conditions))
    deltas = [c.delta for c in rule.conditions if c.delta]
    delta = rewrite_functions(deltas[0]) if deltas else "CAST(NULL AS DOUBLE)"
    mine = ", ".join(f"{me}.{_ident(k)} AS __k{i}" for i, k in enumerate(keys))
    theirs = ", ".join(f"{other}.{_ident(k)} AS __c{i}" for i, k in enumerate(other_keys))
    candidate = (f"CAST({other}.{_ident(other_keys[0])} AS VARCHAR)" if len(other_keys) == 1 else
                 "concat_ws(', ', " + ", ".join(
                     f"concat({_quote(k + '=')}, COALESCE(CAST({other}.{_ident(k)} AS VARCHAR), 'NULL'))"
                     for k in other_keys) + ")")
    order = ", ".join(f"__c{i}" for i in range(len(other_keys)))
    reason = "'ambiguous'" if one_to_one else "'unexplained'"
    return _first_per_key(f"""
          SELECT {mine}, {theirs}, ({failed_n}) AS __failed_n,
                 {f"concat_ws(' AND ', {failed})" if failed else "CAST(NULL AS VARCHAR)"} AS __failed,
                 {delta} AS __delta, {candidate} AS __candidate,
                 CASE WHEN ({failed_n}) = 0 THEN {reason} ELSE 'rule_failed' END AS __reason,
                 {_quote(name)} AS __rule
          FROM __kalla_unmatched {me}
          JOIN {_ident(other_table.lower())} {other} ON {on}""",
        len(keys), f"__failed_n, abs(__delta) NULLS LAST, {order}")


def _first_per_key(sql: str, nkeys: int, order: str) -> str:
    """The first row of each key __k0..__kN of `sql` in the given order.

    One sort by key then `order`, and a row is first when the previous row's key differs
    (``lag``). DataFusion's partitioned ``row_number()`` does the same but keeps state per
    partition: with a partition per key it cost three times as much.
    """
    keys = [f"__k{i}" for i in range(nkeys)]
    prev = ", ".join(f"lag({k}) OVER (ORDER BY {', '.join(keys)}, {order}) AS __p{i}"
                     for i, k in enumerate(keys))
    first = " OR ".join(f"({k} IS DISTINCT FROM __p{i})" for i, k in enumerate(keys))
    lags = ", ".join(f"__p{i}" for i in range(nkeys))
    return f"SELECT * EXCLUDE ({lags}) FROM (SELECT *, {prev} FROM ({sql})) WHERE {first}"


def explain_side(staged: dict, sources: tuple, primary_keys: dict, rules: Sequence,
                 side: int, unmatched_path: str, out_path: str, *, spill_dir: str,
                 memory_bytes: int) -> dict:
    """Write out_path = unmatched rows + explanation columns; return {reason: count}."""
    left, right = sources[0], sources[1]
    me = (left, right)[side]
    keys, other_keys = primary_keys[me], primary_keys[(right, left)[side]]
    ctx = make_context(memory_bytes=memory_bytes, spill_dir=spill_dir)
    for alias, files in staged.items():
        register_parquet(ctx, alias, files[0])
    ctx.register_parquet("__kalla_unmatched", unmatched_path)
    decomposed, why = [], {}
    for rule in rules:
        try:
            decomposed.append((rule, decompose(rule.match_sql, left, right)))
        except NotDecomposable as exc:
            why[rule.name] = str(exc)
    sql = _final_sql(decomposed, side, keys, other_keys, why, rules)
    counts = _stream(ctx.sql_with_options(sql, read_only_options()), out_path, row_group_bytes(memory_bytes))
    return {"reasons": {r: counts[r] for r in REASONS if counts.get(r)}, "unexplained_rules": why}


def _final_sql(decomposed, side, keys, other_keys, why, rules) -> str:
    null_key = " OR ".join(f"u.{_ident(k)} IS NULL" for k in keys)
    if not decomposed:
        last = rules[-1].name
        return (f"SELECT u.*, CASE WHEN {null_key} THEN 'null_key' ELSE 'unexplained' END AS _kalla_reason, "
                f"CAST(NULL AS VARCHAR) AS _kalla_failed, CAST(NULL AS VARCHAR) AS _kalla_candidate, "
                f"CAST(NULL AS DOUBLE) AS _kalla_delta, {_quote(last)} AS _kalla_rule "
                f"FROM __kalla_unmatched u")
    # The last rule that could have taken the record: later rules win when they have a candidate.
    parts = [f"SELECT *, {i} AS __order FROM ({_candidate_sql(rule, side, spec.name, keys, other_keys, spec.one_to_one)})"
             for i, (spec, rule) in enumerate(decomposed)]
    if len(parts) == 1:
        best = parts[0]
    else:
        union = " UNION ALL ".join(parts)
        best = _first_per_key(union, len(keys), "__order DESC")
    on = " AND ".join(f"u.{_ident(k)} = b.__k{i}" for i, k in enumerate(keys))
    last = decomposed[-1][0].name
    return f"""
      SELECT u.*,
             CASE WHEN {null_key} THEN 'null_key' WHEN b.__reason IS NULL THEN 'no_candidate'
                  ELSE b.__reason END AS _kalla_reason,
             CASE WHEN {null_key} THEN NULL ELSE b.__failed END AS _kalla_failed,
             CASE WHEN {null_key} THEN NULL ELSE b.__candidate END AS _kalla_candidate,
             CASE WHEN {null_key} THEN NULL ELSE b.__delta END AS _kalla_delta,
             COALESCE(b.__rule, {_quote(last)}) AS _kalla_rule
      FROM __kalla_unmatched u LEFT JOIN ({best}) b ON {on}"""


def _stream(df, out_path: str, buffer_bytes: int) -> dict[str, int]:
    """Write the query's rows to out_path (encoded on a writer thread); count the reasons."""
    counts: dict[str, int] = {}
    with BackgroundWriter(out_path, df.schema(), row_group_bytes=buffer_bytes) as writer:
        for batch in df.execute_stream():
            rb = batch.to_pyarrow()
            if rb.num_rows:
                writer.write_batch(rb)
                for row in pc.value_counts(rb.column("_kalla_reason")).to_pylist():
                    counts[row["values"]] = counts.get(row["values"], 0) + row["counts"]
    return counts


def explain_file(job, rules: Sequence, side: int) -> dict:
    """Rewrite one side's unmatched file with explanation columns; return its break reasons.

    Called for each side as soon as that side's unmatched file is written, so one side's
    explanation overlaps the other side's anti-join.
    """
    path = job.outputs.partial(("unmatched_left", "unmatched_right")[side])
    explained = path + ".explained"
    result = explain_side(job.staged, (job.spec.left.alias, job.spec.right.alias),
                          job.spec.primary_keys, rules, side, path, explained,
                          spill_dir=os.path.join(job.scratch, "spill"),
                          memory_bytes=int(job.memory_bytes * 0.3))   # two sides at once
    os.replace(explained, path)
    return result
